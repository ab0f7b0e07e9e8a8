// /data/{name}: one dataset (GET /datasets/{name}), followed live while it is imported and checked; its report (the
// verdict, every problem with the place it names, what the import made of the COCO files, the counts per split and
// subset), its categories for a split, and a gallery of a category's instances. The owner of an uploaded dataset
// can delete it (two clicks); the server's datasets are read-only.

import {ApiError, getJSON, request} from "/static/api.js";
import {isPending, problemCounts} from "/static/datasets.js";
import {Gallery} from "/static/gallery.js";
import {$, armedButton, bytes, h, header, showError, statusBadge, term, when, whenVisible} from "/static/ui.js";

const NAME = decodeURIComponent(location.pathname.split("/").pop());
const params = new URLSearchParams(location.search);
const PLACES = [ // a problem's place, in the order a user looks for it
  ["file", (v) => v], ["split", (v) => `split ${v}`], ["subset", (v) => v], ["category_id", (v) => `category ${v}`],
  ["annotation_id", (v) => `annotation ${v}`], ["image_id", (v) => `image ${v}`], ["field", (v) => `field ${v}`],
];

const state = {
  dataset: null,
  split: Number(params.get("split")) || null, // null: the dataset's first
  category: params.has("category") ? Number(params.get("category")) : null,
  offset: Number(params.get("offset")) || 0,
  stopPolling: null,
  rendered: "",
};

header("data");
document.title = `${NAME} · Datasets · CAPE training`;
$("#title").textContent = NAME;
const gallery = new Gallery(NAME, {onPage: (category, offset) => {
  state.category = category.id;
  state.offset = offset;
  remember();
  markChosen();
}});

/** Where the page is (split, category, gallery page) in its URL, for a reload or a link. */
function remember() {
  const query = new URLSearchParams();
  if (state.split) query.set("split", state.split);
  if (state.category != null) query.set("category", state.category);
  if (state.offset) query.set("offset", state.offset);
  history.replaceState(null, "", `${location.pathname}${query.size ? `?${query}` : ""}`);
}

// --- the dataset, its status and its report ----------------------------------------------------------------------

function verdict(dataset) {
  const box = $("#verdict");
  const report = dataset.report;
  let style, text;
  if (dataset.status === "queued") [style, text] = ["pending", "Queued: waiting for a worker to import and check it."];
  else if (dataset.status === "checking") [style, text] = ["pending", "Checking: a worker is importing and checking it."];
  else if (!report) [style, text] = [dataset.status === "ready" ? "good" : "bad", dataset.status === "ready" ? "Ready." : "Not usable."];
  else {
    const counts = `${report.errors} error${report.errors === 1 ? "" : "s"}, ${report.warnings} warning${report.warnings === 1 ? "" : "s"}`;
    [style, text] = report.usable
      ? ["good", `Usable: ${counts}; split${report.splits.length === 1 ? "" : "s"} ${report.splits.join(", ")}.`]
      : ["bad", `Not usable: ${counts}. Fix the errors below and upload it again.`];
  }
  box.className = `verdict box ${style}`;
  box.dataset.usable = String(Boolean(report?.usable));
  box.replaceChildren(h("strong", {}, text));
  box.hidden = false;
}

function summary(dataset) {
  $("#summary").replaceChildren(
    ...term("Kind", dataset.read_only ? `${dataset.kind} (read-only)` : dataset.kind),
    ...term("Splits", dataset.splits?.length ? dataset.splits.join(", ") : "–"),
    // a rejected import has no summary, but its report counts what refused it
    ...term("Problems", problemCounts(dataset.summary ?? dataset.report)),
    ...term("Archive", dataset.archive ? `${dataset.archive.name} (${bytes(dataset.archive.bytes)})` : "–"),
    ...term("Uploaded", when(dataset.created_at)),
    ...term("Updated", when(dataset.updated_at)),
  );
}

function place(problem) {
  const parts = PLACES.filter(([key]) => problem[key] != null).map(([key, show]) =>
    h("span", {class: "place", dataset: {key}}, show(problem[key])));
  if (problem.count > 1) parts.push(h("span", {class: "place count", dataset: {key: "count"}}, `× ${problem.count}`));
  return parts;
}

function problems(report) {
  const section = $("#problems-section");
  section.hidden = !report;
  if (!report) return;
  const groups = ["error", "warning"].map((severity) => {
    const found = report.problems.filter((p) => p.severity === severity);
    if (!found.length) return null;
    return h("div", {class: `problem-group ${severity}`, dataset: {severity}},
      h("h3", {}, `${severity === "error" ? "Errors" : "Warnings"} (${found.length})`),
      h("ul", {class: "problems"}, found.map((p) => h("li", {dataset: {code: p.code, severity}},
        h("div", {}, p.message), h("div", {class: "places"}, h("code", {class: "code"}, p.code), ...place(p))))));
  }).filter(Boolean);
  $("#problems").replaceChildren(...(groups.length ? groups : [h("p", {class: "muted"}, "None: the check found nothing.")]));
}

function importSummary(summary) {
  const section = $("#import-section");
  section.hidden = !summary;
  if (!summary) return;
  const count = (instances) => (Array.isArray(instances) ? instances.length : instances ?? "–");
  const subsets = (c) => Object.entries(c.subsets || {}).map(([split, subset]) => `${split}: ${subset}`).join(", ") || "–";
  const from = (c) => [c.source_file ?? c.source, c.source_category_id != null ? `category ${c.source_category_id}` : null]
    .filter(Boolean).join(" · ") + (c.entry ? ` (${c.entry})` : "");
  const rows = (summary.categories || []).map((c) => h("tr", {dataset: {id: c.id}},
    h("td", {class: "num"}, c.id), h("td", {}, c.name), h("td", {class: "num"}, c.num_keypoints ?? "–"),
    h("td", {class: "num"}, count(c.instances)), h("td", {class: "mono small"}, from(c)), h("td", {class: "small"}, subsets(c))));
  const skipped = (summary.skipped || []).map((s) => h("li", {dataset: {kind: s.kind}},
    `${s.file ?? s.source}: ${s.kind} ${(s.ids || []).join(", ")} skipped: ${s.reason}`));
  const notes = (summary.notes || []).map((note) => h("li", {}, note));
  $("#import").replaceChildren(
    h("p", {}, `${rows.length} categor${rows.length === 1 ? "y" : "ies"} imported, ${summary.instances ?? "–"} instances.`),
    h("table", {class: "test compact", id: "imported"},
      h("thead", {}, h("tr", {}, ["Id", "Name", "K", "Instances", "From", "Subsets"].map((t, i) =>
        h("th", {class: [0, 2, 3].includes(i) ? "num" : null}, t)))),
      h("tbody", {}, rows)),
    h("h3", {}, `Skipped (${(summary.skipped || []).reduce((n, s) => n + (s.ids || []).length, 0)})`),
    skipped.length ? h("ul", {id: "skipped"}, skipped) : h("p", {class: "muted"}, "Nothing was left out."),
    ...(notes.length ? [h("h3", {}, "Notes"), h("ul", {id: "notes"}, notes)] : []),
  );
}

function counts(report) {
  const entries = Object.entries(report?.counts || {});
  $("#counts-section").hidden = !entries.length;
  $("#counts tbody").replaceChildren(...entries.flatMap(([split, subsets]) =>
    Object.entries(subsets).map(([subset, c]) => h("tr", {dataset: {split, subset}},
      h("td", {}, split), h("td", {}, subset), h("td", {class: "num"}, c.categories),
      h("td", {class: "num"}, c.instances), h("td", {class: "num"}, c.images)))));
}

// --- categories and the gallery ----------------------------------------------------------------------------------

function categories(dataset) {
  const list = dataset.categories;
  $("#categories-section").hidden = !list;
  if (!list) return;
  const split = $("#split");
  split.replaceChildren(...(dataset.splits || []).map((n) => h("option", {value: n}, n)));
  split.value = String(dataset.split);
  $("#categories tbody").replaceChildren(...list.map((c) => {
    const browse = h("button", {type: "button", class: "browse", onclick: () => gallery.show(c, dataset.split)}, "Instances");
    return h("tr", {dataset: {id: c.id, subset: c.subset}, class: c.id === state.category ? "chosen" : null},
      h("td", {class: "num"}, c.id), h("td", {}, c.name), h("td", {class: "num"}, c.num_keypoints), h("td", {}, c.subset),
      h("td", {class: "num"}, c.instances.train), h("td", {class: "num"}, c.instances.val),
      h("td", {class: "num"}, c.instances.test), h("td", {}, browse));
  }));
  if (!list.length) {
    $("#categories tbody").append(h("tr", {}, h("td", {colspan: 8, class: "muted empty"}, "No categories in this split.")));
  }
}

function markChosen() {
  document.querySelectorAll("#categories tbody tr[data-id]").forEach((tr) =>
    tr.classList.toggle("chosen", Number(tr.dataset.id) === state.category));
}

$("#split").addEventListener("change", async () => {
  state.split = Number($("#split").value);
  state.category = null;
  state.offset = 0;
  $("#gallery-section").hidden = true;
  remember();
  await load();
});

// --- delete -------------------------------------------------------------------------------------------------------

armedButton($("#delete"), async () => {
  const path = `/datasets/${encodeURIComponent(NAME)}`;
  const response = await request(path, {method: "DELETE"});
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    showError($("#message"), new ApiError(response.status, answer.detail ?? null, path));
    return;
  }
  state.stopPolling?.();
  for (const id of ["delete", "train", "verdict", "summary", "problems-section", "import-section", "counts-section",
                    "categories-section", "gallery-section", "error"]) {
    $(`#${id}`).hidden = true;
  }
  $("#status").replaceChildren(statusBadge("deleted"));
  $("#deleted").replaceChildren(answer.message || `${NAME} is deleted.`, " ", h("a", {href: "/data"}, "Back to the datasets"));
  $("#deleted").hidden = false;
  document.body.dataset.status = "deleted";
}, {armedText: "Really delete?"});

// --- loading and following ----------------------------------------------------------------------------------------

function render(dataset) {
  $("#status").replaceChildren(statusBadge(dataset.status));
  $("#kind").textContent = dataset.read_only ? "the server's, read-only" : "uploaded";
  $("#live").textContent = isPending(dataset.status) ? "following…" : "";
  $("#error").textContent = dataset.error || "";
  $("#error").hidden = !dataset.error;
  $("#delete").hidden = dataset.read_only;
  const train = $("#train");
  train.hidden = dataset.status !== "ready";
  train.href = `/new?${new URLSearchParams({dataset: NAME})}`;
  verdict(dataset);
  summary(dataset);
  problems(dataset.report);
  importSummary(dataset.report?.import);
  counts(dataset.report);
  categories(dataset);
}

async function load() {
  const query = state.split ? `?split=${state.split}` : "";
  try {
    const dataset = await getJSON(`/datasets/${encodeURIComponent(NAME)}${query}`);
    state.dataset = dataset;
    state.split = dataset.split ?? state.split;
    $("#message").replaceChildren();
    const text = JSON.stringify(dataset);
    if (text !== state.rendered) {
      state.rendered = text;
      render(dataset);
    }
    document.body.dataset.status = dataset.status;
    return dataset;
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      $("#message").replaceChildren(h("p", {class: "error box"},
        `No dataset named ${NAME} (an upload belongs to the API key that made it). `, h("a", {href: "/data"}, "The datasets")));
      document.body.dataset.status = "missing";
    } else {
      showError($("#message"), error);
    }
    return null;
  }
}

/** Follows a dataset being imported and checked: every 1.5 s until it is ready or rejected (or gone). */
function follow() {
  state.stopPolling = whenVisible(async () => {
    const dataset = await load();
    // a passing failure (the API restarting) is retried; a dataset gone (404) is not
    if (dataset ? !isPending(dataset.status) : document.body.dataset.status === "missing") state.stopPolling();
  }, 1500);
}

const first = await load();
if (first && isPending(first.status)) follow();
const chosen = first?.categories?.find((c) => c.id === state.category);
if (chosen) gallery.show(chosen, first.split, state.offset);
document.body.dataset.ready = "true";
