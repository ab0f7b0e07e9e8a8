"""Sweeps and the learning-rate range test's job through the REST API (TestClient, a recording dispatcher): a grid's
validation, all or none, idempotency, owners, cancelling, the ranking of members whose outcomes are written in the
database as a worker would; a range-test job's request and what it refuses. Real workers: tests/e2e/test_sweeps.py."""

import itertools
import uuid

import pytest
from sqlmodel import Session

from cape.data.catalog import MP100Catalog
from cape.lr_range import LRRangeConfig, result
from service import job_state
from service.db import get_engine
from service.models import Job, JobStatus
from tests.helpers import KEY_A, KEY_B, auth, run_to, single

LRS = [1e-4, 5e-4, 1e-3]


@pytest.fixture(scope="module")
def catalog(synthetic_root):
    return MP100Catalog(synthetic_root)


def category_body(catalog, **overrides):
    body = {"mode": "category", "category_id": catalog.category_ids("train")[0], "epochs": 5}
    body.update(overrides)
    return body


def errors(response) -> list[dict]:
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def stored(client) -> tuple[int, int]:
    """How many jobs and sweeps the caller has."""
    return client.get("/jobs").json()["total"], client.get("/sweeps").json()["total"]


def created(client, body, **kwargs) -> dict:
    response = client.post("/sweeps", json=body, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def member_ids(sweep) -> dict[tuple, str]:
    """The members' job ids by their values, as a sorted tuple of (field, value)."""
    return {tuple(sorted(m["values"].items())): m["job"]["id"] for m in sweep["members"]}


def end_member(job_id: str, status: JobStatus | None = JobStatus.succeeded, **outcome) -> None:
    """Play the member's worker: claim it, write what its run left (memorised_epoch, best_pck, latest_loss...), and
    end it with ``status`` (None: leave it running)."""
    with Session(get_engine()) as session:
        assert job_state.claim(session, uuid.UUID(job_id), "w")
        job = session.get(Job, uuid.UUID(job_id))
        for field, value in outcome.items():
            setattr(job, field, value)
        session.add(job)
        session.commit()
        if status is not None:
            assert job_state.finish(session, uuid.UUID(job_id), status, worker="w")


# --- a sweep's members ---------------------------------------------------------------------------------------------


def test_a_sweep_is_one_dispatched_job_per_combination(client, catalog, dispatched):
    other = client.post("/jobs", json=single(catalog)).json()["id"]
    body = single(catalog, name="lr", tags=["s1"], grid={"lr": LRS, "seed": [0, 1]})
    response = client.post("/sweeps", json=body)
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert response.headers["location"] == f"/sweeps/{sweep['id']}"
    assert (sweep["name"], sweep["tags"], sweep["mode"], sweep["dataset"]) == (
        "lr",
        ["s1"],
        "single_image",
        "synthetic",
    )
    assert (sweep["metric"], sweep["better"], sweep["status"], sweep["best"]) == (
        "memorised_epoch",
        "lower",
        "queued",
        None,
    )
    assert sweep["grid"] == {"lr": LRS, "seed": [0, 1]}
    assert sweep["counts"] == {
        "queued": 6,
        "running": 0,
        "cancelling": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert "lr" not in sweep["config"] and "seed" not in sweep["config"], "the shared config leaves the grid out"
    assert (sweep["config"]["mode"], sweep["config"]["epochs"], sweep["config"]["image_index"]) == (
        "single_image",
        5,
        3,
    )

    members = member_ids(sweep)
    assert set(members) == {(("lr", lr), ("seed", seed)) for lr, seed in itertools.product(LRS, [0, 1])}
    assert [m["rank"] for m in sweep["members"]] == [1, 2, 3, 4, 5, 6]
    assert all(m["metric"] is None for m in sweep["members"])
    assert sorted(map(str, dispatched)) == sorted([other, *members.values()]), "every member is sent to a worker"
    for values, job_id in members.items():
        job = client.get(f"/jobs/{job_id}").json()
        lr, seed = dict(values)["lr"], dict(values)["seed"]
        assert (job["sweep_id"], job["sweep_values"]) == (sweep["id"], {"lr": lr, "seed": seed})
        assert (job["config"]["lr"], job["config"]["seed"], job["config"]["epochs"]) == (lr, seed, 5)
        assert job["name"] == f"lr · lr={lr:g}, seed={seed}" and job["tags"] == ["s1"]
        assert (job["mode"], job["status"], job["image"]["index"]) == ("single_image", "queued", 3)
    listed = client.get("/jobs", params={"sweep_id": sweep["id"]}).json()
    assert listed["total"] == 6 and {j["id"] for j in listed["items"]} == set(members.values())
    assert client.get(f"/jobs/{other}").json()["sweep_id"] is None
    assert client.get(f"/sweeps/{sweep['id']}").json() == sweep


def test_an_unnamed_sweep_names_its_members_sweep(client, catalog):
    sweep = created(client, category_body(catalog, grid={"weight_decay": [0, 0.01]}))
    names = sorted(client.get(f"/jobs/{m['job']['id']}").json()["name"] for m in sweep["members"])
    assert names == ["sweep · weight_decay=0", "sweep · weight_decay=0.01"]
    assert (sweep["metric"], sweep["better"]) == ("best_pck", "higher"), "a category sweep is ranked by best PCK"


# --- what a sweep refuses, all or none ---------------------------------------------------------------------------


def test_grid_values_out_of_bounds_are_named_by_their_index(client, catalog, dispatched):
    detail = errors(client.post("/sweeps", json=single(catalog, grid={"lr": [1e-3, 0, 2.0]})))
    found = {tuple(e["loc"]): e["msg"] for e in detail}
    assert found == {
        ("body", "grid", "lr", 1): "Input should be greater than 0",
        ("body", "grid", "lr", 2): "Input should be less than or equal to 1",
    }
    assert stored(client) == (0, 0) and dispatched == []


@pytest.mark.parametrize(
    "body, loc, expected",
    [
        ({"lr": 1e-3, "grid": {"lr": LRS}}, ["body", "lr"], "lr is swept by the grid: leave it out of the body"),
        (
            {"grid": {"lr": [i / 100 for i in range(1, 9)], "seed": list(range(9))}},
            ["body", "grid"],
            "8 lr x 9 seed = 72 combinations; a sweep has at most 64",
        ),
        ({"grid": {"seed": [1, 2, 1]}}, ["body", "grid", "seed"], "seed's values repeat: [1, 2, 1]"),
        ({"grid": {"epochs": [1, 2]}}, ["body", "grid", "epochs", "[key]"], "Input should be 'lr', 'clip_max_norm'"),
        ({"grid": {}}, ["body", "grid"], "Dictionary should have at least 1 item"),
        ({"grid": {"lr": []}}, ["body", "grid", "lr"], "List should have at least 1 item"),
        ({"grid": {"seed": list(range(17))}}, ["body", "grid", "seed"], "List should have at most 16 items"),
        ({"grid": {"batch_size": [1, 1.5]}}, ["body", "grid", "batch_size", 1], "Input should be a valid integer"),
        ({"grid": {"seed": [0]}, "metric": "accuracy"}, ["body", "metric"], "Input should be 'memorised_epoch'"),
        ({"grid": {"seed": [0]}, "mode": "lr_range_test"}, ["body", "mode"], "Input should be 'single_image'"),
        ({}, ["body", "grid"], "Field required"),
    ],
)
def test_a_refused_sweep_names_the_field_and_stores_nothing(client, catalog, dispatched, body, loc, expected):
    detail = errors(client.post("/sweeps", json=single(catalog, **body)))
    assert any(e["loc"] == loc and expected in e["msg"] for e in detail), detail
    assert stored(client) == (0, 0) and dispatched == []


def test_memorised_epoch_ranks_only_single_image_sweeps(client, catalog, dispatched):
    body = category_body(catalog, grid={"lr": LRS}, metric="memorised_epoch")
    [error] = errors(client.post("/sweeps", json=body))
    assert error["loc"] == ["body", "metric"]
    assert "a category sweep is ranked by best_pck, best_mpck or latest_loss" in error["msg"]
    assert stored(client) == (0, 0) and dispatched == []


def test_a_combination_the_dataset_refuses_is_named_and_nothing_is_stored(client, catalog, dispatched):
    """A category has 24 train images: an episode of 1 support and 30 queries cannot be drawn from it. The valid
    combinations before the refused one are not stored either."""
    grid = {"lr": [1e-3, 5e-4], "num_queries_per_episode": [1, 2, 30]}
    detail = errors(client.post("/sweeps", json=category_body(catalog, grid=grid)))
    assert len(detail) == 1, detail
    [error] = detail
    assert error["loc"] == ["body", "grid", "num_queries_per_episode", 2]
    assert error["msg"].startswith("lr=0.001, num_queries_per_episode=30: ")
    assert "1 supports + 30 queries need 31" in error["msg"]
    assert stored(client) == (0, 0) and dispatched == []


def test_a_refusal_of_a_field_outside_the_grid_keeps_its_loc_and_names_the_combination(client, catalog, dispatched):
    body = category_body(catalog, val_queries_per_episode=30, grid={"lr": [1e-3, 5e-4]})
    [error] = errors(client.post("/sweeps", json=body))
    assert error["loc"] == ["body", "val_queries_per_episode"]
    assert error["msg"].startswith("lr=0.001: ") and "1 supports + 30 queries need 31" in error["msg"]
    assert stored(client) == (0, 0) and dispatched == []


def test_an_image_the_category_lacks_is_refused_for_every_member(client, catalog, dispatched):
    [error] = errors(client.post("/sweeps", json=single(catalog, image_index=24, grid={"seed": [0, 1]})))
    assert error["loc"] == ["body", "image_index"]
    assert error["msg"].startswith("seed=0: ") and "has 24 train images: index must be 0..23" in error["msg"]
    assert stored(client) == (0, 0) and dispatched == []


# --- idempotency and owners --------------------------------------------------------------------------------------


def test_the_same_idempotency_key_and_body_return_the_same_sweep(client, catalog, dispatched):
    body = single(catalog, grid={"lr": LRS})
    key = {"Idempotency-Key": "sweep-1"}
    first = created(client, body, headers=key)
    again = client.post("/sweeps", json=body, headers=key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"] and again.headers["location"] == f"/sweeps/{first['id']}"
    assert member_ids(again.json()) == member_ids(first)
    assert stored(client) == (3, 1) and len(dispatched) == 3, "a replay makes no job and sends none"
    other = client.post("/sweeps", json=single(catalog, grid={"lr": LRS[:2]}), headers=key)
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    assert first["id"] in other.json()["detail"]
    assert stored(client) == (3, 1)
    assert created(client, body)["id"] != first["id"], "without a key, the same body is a new sweep"
    assert stored(client) == (6, 2)


def test_another_keys_sweep_is_not_found(secured, catalog):
    a, b = auth(KEY_A), auth(KEY_B)
    body = single(catalog, grid={"lr": LRS})
    sweep = created(secured, body, headers={**a, "Idempotency-Key": "same"})
    for response in (
        secured.get(f"/sweeps/{sweep['id']}", headers=b),
        secured.post(f"/sweeps/{sweep['id']}/cancel", headers=b),
    ):
        assert response.status_code == 404 and sweep["id"] in response.json()["detail"]
    assert all(
        m["job"]["status"] == "queued" for m in secured.get(f"/sweeps/{sweep['id']}", headers=a).json()["members"]
    )
    assert secured.get("/sweeps", headers=b).json() == {"items": [], "total": 0, "limit": 20, "offset": 0}
    assert secured.get("/jobs", params={"sweep_id": sweep["id"]}, headers=b).json()["total"] == 0
    assert secured.get("/jobs", params={"sweep_id": sweep["id"]}, headers=a).json()["total"] == 3
    mine = secured.get("/sweeps", headers=a).json()
    assert mine["total"] == 1 and [s["id"] for s in mine["items"]] == [sweep["id"]]
    # An Idempotency-Key is the key owner's: B's request with A's key is B's own new sweep.
    theirs = created(secured, body, headers={**b, "Idempotency-Key": "same"})
    assert theirs["id"] != sweep["id"]
    assert [s["id"] for s in secured.get("/sweeps", headers=b).json()["items"]] == [theirs["id"]]
    assert secured.get("/sweeps", headers={}).status_code == 401


def test_sweeps_are_listed_newest_first_and_paged(client, catalog):
    ids = [created(client, single(catalog, grid={"seed": [seed]}))["id"] for seed in range(3)]
    page = client.get("/sweeps", params={"limit": 2}).json()
    assert [s["id"] for s in page["items"]] == ids[::-1][:2]
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [s["id"] for s in client.get("/sweeps", params={"offset": 2}).json()["items"]] == ids[:1]
    assert client.get("/sweeps", params={"limit": 101}).status_code == 422


def test_a_missing_sweep_is_404(client):
    missing = uuid.uuid4()
    for response in (client.get(f"/sweeps/{missing}"), client.post(f"/sweeps/{missing}/cancel")):
        assert response.status_code == 404 and str(missing) in response.json()["detail"]
    assert client.get("/sweeps/not-a-uuid").status_code == 422


# --- cancelling --------------------------------------------------------------------------------------------------


def test_cancelling_a_sweep_cancels_every_member_not_finished(client, catalog):
    sweep = created(client, single(catalog, grid={"lr": [1e-4, 5e-4, 1e-3, 2e-3]}))
    members = member_ids(sweep)
    done, running = members[(("lr", 1e-4),)], members[(("lr", 5e-4),)]
    end_member(done, memorised_epoch=4)
    end_member(running, status=None)
    response = client.post(f"/sweeps/{sweep['id']}/cancel")
    assert response.status_code == 200, response.text
    after = response.json()
    statuses = {m["job"]["id"]: m["job"]["status"] for m in after["members"]}
    assert statuses == {
        done: "succeeded",
        running: "cancelling",
        members[(("lr", 1e-3),)]: "cancelled",
        members[(("lr", 2e-3),)]: "cancelled",
    }
    assert after["status"] == "running", "a member's worker still has to stop it"
    assert (after["counts"]["cancelled"], after["counts"]["cancelling"], after["counts"]["succeeded"]) == (2, 1, 1)
    assert client.get(f"/jobs/{running}").json()["cancel_requested"] is True
    with Session(get_engine()) as session:
        assert job_state.finish(session, uuid.UUID(running), JobStatus.cancelled, worker="w")
    assert client.get(f"/sweeps/{sweep['id']}").json()["status"] == "finished"
    again = client.post(f"/sweeps/{sweep['id']}/cancel")
    assert again.status_code == 409 and "no member left to cancel" in again.json()["detail"]


def test_cancelling_a_queued_sweep_finishes_it_and_a_second_cancel_is_409(client, catalog):
    sweep = created(client, single(catalog, grid={"lr": LRS}))
    after = client.post(f"/sweeps/{sweep['id']}/cancel").json()
    assert {m["job"]["status"] for m in after["members"]} == {"cancelled"}
    assert (after["status"], after["counts"]["cancelled"], after["best"]) == ("finished", 3, None)
    assert client.post(f"/sweeps/{sweep['id']}/cancel").status_code == 409
    with Session(get_engine()) as session:
        for job_id in member_ids(sweep).values():
            assert not job_state.claim(session, uuid.UUID(job_id), "w"), "a cancelled member is never trained"


# --- ranking -------------------------------------------------------------------------------------------------------


def ranking(client, sweep_id) -> list[tuple]:
    """The members' (lr, metric) in rank order, with the ranks checked to be 1..n."""
    sweep = client.get(f"/sweeps/{sweep_id}").json()
    assert [m["rank"] for m in sweep["members"]] == list(range(1, len(sweep["members"]) + 1))
    return [(m["values"]["lr"], m["metric"]) for m in sweep["members"]]


def test_a_single_image_sweep_ranks_the_earliest_memorised_first_and_the_never_memorised_last(client, catalog):
    lrs = [1e-4, 5e-4, 1e-3, 2e-3, 5e-3]
    sweep = created(client, single(catalog, grid={"lr": lrs}))
    members = member_ids(sweep)
    job = {lr: members[(("lr", lr),)] for lr in lrs}
    end_member(job[1e-4], memorised_epoch=None, best_pck=0.6, latest_loss=0.9, never_correct=[0, 1])
    end_member(job[5e-4], memorised_epoch=5, best_pck=1.0, latest_loss=0.05)
    end_member(job[1e-3], memorised_epoch=3, best_pck=1.0, latest_loss=0.02)
    end_member(job[2e-3], JobStatus.failed, memorised_epoch=None, best_pck=0.8, latest_loss=0.4)
    middle = client.get(f"/sweeps/{sweep['id']}").json()
    assert middle["status"] == "running" and middle["counts"]["queued"] == 1
    # Never memorised: after every memorised member, the better PCK first; the one not run yet last of all.
    assert ranking(client, sweep["id"]) == [(1e-3, 3), (5e-4, 5), (2e-3, None), (1e-4, None), (5e-3, None)]
    assert middle["best"] == job[1e-3]
    end_member(job[5e-3], memorised_epoch=2, best_pck=1.0, latest_loss=0.04)
    final = client.get(f"/sweeps/{sweep['id']}").json()
    assert final["status"] == "finished" and final["best"] == job[5e-3]
    assert ranking(client, sweep["id"])[:3] == [(5e-3, 2), (1e-3, 3), (5e-4, 5)]
    assert final["counts"] == {
        "queued": 0,
        "running": 0,
        "cancelling": 0,
        "succeeded": 4,
        "failed": 1,
        "cancelled": 0,
    }
    best = final["members"][0]["job"]
    assert best["verdict"]["state"] == "memorised" and best["sweep_values"] == {"lr": 5e-3}


def test_members_memorised_at_the_same_epoch_are_ranked_by_pck_then_loss(client, catalog):
    lrs = [1e-4, 5e-4, 1e-3]
    sweep = created(client, single(catalog, grid={"lr": lrs}))
    job = {lr: member_ids(sweep)[(("lr", lr),)] for lr in lrs}
    end_member(job[1e-4], memorised_epoch=4, best_pck=1.0, latest_loss=0.08)
    end_member(job[5e-4], memorised_epoch=4, best_pck=1.0, latest_loss=0.03)
    end_member(job[1e-3], memorised_epoch=4, best_pck=0.9, latest_loss=0.01)
    assert ranking(client, sweep["id"]) == [(5e-4, 4), (1e-4, 4), (1e-3, 4)]


def test_no_best_until_a_member_has_a_value(client, catalog):
    sweep = created(client, single(catalog, grid={"lr": LRS}))
    job = member_ids(sweep)[(("lr", 1e-3),)]
    end_member(job, status=None, best_pck=0.5, latest_loss=1.0)  # running, not memorised yet
    running = client.get(f"/sweeps/{sweep['id']}").json()
    assert running["best"] is None and running["status"] == "running"
    assert running["members"][0]["job"]["id"] == job, "among members without a value, the better PCK first"


@pytest.mark.parametrize(
    "metric, better, expected",
    [
        (None, "higher", [(5e-4, 0.7), (1e-4, 0.4), (1e-3, None)]),
        ("best_mpck", "higher", [(1e-4, 0.6), (5e-4, 0.2), (1e-3, None)]),
        ("latest_loss", "lower", [(1e-4, 1.5), (5e-4, 2.0), (1e-3, 3.0)]),
    ],
)
def test_a_category_sweep_ranks_by_its_metric(client, catalog, metric, better, expected):
    body = category_body(catalog, grid={"lr": LRS}, **({"metric": metric} if metric else {}))
    sweep = created(client, body)
    assert (sweep["metric"], sweep["better"]) == (metric or "best_pck", better)
    job = {lr: member_ids(sweep)[(("lr", lr),)] for lr in LRS}
    end_member(job[1e-4], best_pck=0.4, best_mpck=0.6, latest_loss=1.5)
    end_member(job[5e-4], best_pck=0.7, best_mpck=0.2, latest_loss=2.0)
    end_member(job[1e-3], JobStatus.failed, latest_loss=3.0)  # failed before its first validation
    assert ranking(client, sweep["id"]) == expected
    assert client.get(f"/sweeps/{sweep['id']}").json()["best"] == job[expected[0][0]]


# --- the learning-rate range test's job --------------------------------------------------------------------------


def range_test_body(catalog, **overrides):
    body = {"mode": "lr_range_test", "run_mode": "single_image", "category_id": catalog.category_ids("train")[0]}
    body.update(overrides)
    return body


def test_a_range_test_job_is_the_training_job_it_prepares_with_no_epochs(client, catalog, dispatched):
    cid = catalog.category_ids("train")[0]
    response = client.post("/jobs", json=range_test_body(catalog, image_index=3, epochs=7, batch_size=1))
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["mode"], job["total_epochs"], job["progress"], job["lr_range"]) == ("lr_range_test", 0, 0.0, None)
    assert (job["category_id"], job["image"]["index"], job["status"]) == (cid, 3, "queued")
    config = job["config"]
    assert (config["mode"], config["category_id"], config["epochs"], config["batch_size"]) == (
        "single_image",
        cid,
        7,
        1,
    )
    assert config["lr"] == 5e-4, "the default lr: the job a suggestion is cloned into sets its own"
    assert config["lr_range"] == {"start_lr": 1e-7, "end_lr": 1.0, "steps": 100}
    assert dispatched == [uuid.UUID(job["id"])]
    assert job["sweep_id"] is None and job["verdict"] is None

    settings = {"start_lr": 1e-6, "end_lr": 0.1, "steps": 50}
    full = client.post("/jobs", json={"mode": "lr_range_test", "lr_range": settings}).json()
    assert (full["config"]["mode"], full["category_id"], full["config"]["lr_range"]) == ("full", None, settings)


def test_a_range_test_reads_back_its_curve_once_it_succeeded(client, catalog):
    job_id = client.post("/jobs", json=range_test_body(catalog)).json()["id"]
    settings = LRRangeConfig(steps=30)
    lrs = [settings.lr(i) for i in range(30)]
    curve = result(lrs, [7.0 - 6.0 * i / 29 if i < 25 else 40.0 for i in range(30)], "blew_up")
    with Session(get_engine()) as session:
        assert job_state.claim(session, uuid.UUID(job_id), "w")
        assert job_state.record_outcome(session, uuid.UUID(job_id), "w", None, None, curve.model_dump(mode="json"))
        assert job_state.finish(session, uuid.UUID(job_id), JobStatus.succeeded, worker="w")
    job = client.get(f"/jobs/{job_id}").json()
    assert job["progress"] == 1.0 and job["lr_range"] == curve.model_dump(mode="json")
    assert job["lr_range"]["stopped"] == "blew_up" and len(job["lr_range"]["points"]) == 30


@pytest.mark.parametrize(
    "overrides, loc, expected",
    [
        ({"lr": 1e-3}, ["body", "lr"], "a learning-rate range test finds lr"),
        ({"lr_range": {"start_lr": 1e-2, "end_lr": 1e-3}}, ["body", "lr_range"], "end_lr (0.001) must be above"),
        ({"lr_range": {"start_lr": 1e-3, "end_lr": 1e-3}}, ["body", "lr_range"], "must be above start_lr (0.001)"),
        ({"lr_range": {"steps": 19}}, ["body", "lr_range", "steps"], "greater than or equal to 20"),
        ({"lr_range": {"steps": 1001}}, ["body", "lr_range", "steps"], "less than or equal to 1000"),
        ({"lr_range": {"start_lr": 0}}, ["body", "lr_range", "start_lr"], "greater than 0"),
        ({"lr_range": {"end_lr": 2}}, ["body", "lr_range", "end_lr"], "less than or equal to 1"),
        ({"lr_range": {"stop": 3}}, ["body", "lr_range", "stop"], "Extra inputs are not permitted"),
        ({"category_id": 4242}, ["body", "category_id"], "category 4242 does not exist in split 1"),
        ({"image_index": 24}, ["body", "image_index"], "has 24 train images: index must be 0..23"),
        ({"run_mode": "sideways"}, ["body", "run_mode"], "Input should be 'single_image', 'category' or 'full'"),
        (
            {"run_mode": "category", "num_queries_per_episode": 30},
            ["body", "num_queries_per_episode"],
            "1 supports + 30 queries need 31",
        ),
        ({"run_mode": "full"}, ["body"], "mode 'full' trains on all train categories"),
        ({"grid": {"lr": LRS}}, ["body", "grid"], "Extra inputs are not permitted"),
    ],
)
def test_a_refused_range_test_names_the_field(client, catalog, dispatched, overrides, loc, expected):
    detail = errors(client.post("/jobs", json=range_test_body(catalog, **overrides)))
    assert any(e["loc"] == loc and expected in e["msg"] for e in detail), detail
    assert stored(client) == (0, 0) and dispatched == []


def test_a_range_test_is_not_evaluated(client, catalog):
    job_id = client.post("/jobs", json=range_test_body(catalog)).json()["id"]
    run_to(job_id, JobStatus.succeeded)
    [error] = errors(client.post("/jobs", json={"mode": "evaluate", "from_job": job_id}))
    assert error["loc"] == ["body", "from_job"]
    assert error["msg"].startswith(f"job {job_id} is a learning-rate range test: it trains no model to evaluate")
    assert stored(client) == (1, 0)


def test_the_schema_documents_sweeps_and_the_range_test(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"post", "get"} <= set(paths["/sweeps"])
    assert set(paths["/sweeps/{sweep_id}"]) == {"get"} and set(paths["/sweeps/{sweep_id}/cancel"]) == {"post"}
    created_answer = paths["/sweeps"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert created_answer == {"$ref": "#/components/schemas/SweepPublic"}
    assert {"201", "200", "409", "422"} <= set(paths["/sweeps"]["post"]["responses"])
    parameters = {p["name"] for p in paths["/jobs"]["get"]["parameters"]}
    assert "sweep_id" in parameters
    components = schema["components"]["schemas"]
    assert {"grid", "metric", "lr", "mode"} <= set(components["SweepCreate"]["properties"])
    assert {"members", "best", "metric", "better", "counts", "status"} <= set(components["SweepPublic"]["properties"])
    assert {"sweep_id", "sweep_values", "lr_range"} <= set(components["JobPublic"]["properties"])
    assert {"run_mode", "lr_range"} <= set(components["LRRangeCreate"]["properties"])
