// GET /runs/<job id>: one run, live. Curves grow as epochs arrive (GET /jobs/{id}/events, a fetch()-read stream),
// with the status, the verdict, the Health card (the diagnosis in words and the training-health instruments), the
// pictures and the log tail; Cancel and Clone. A training job with a checkpoint also gets the checkpoints card
// (download, evaluate) and the "Try it" panel; an evaluate job shows what it evaluated and its test table instead of
// curves and pictures; a learning-rate range test its loss against the learning rate and its suggestion (lr_range.js).

import {ApiError, blobURL, followJob, getJSON, isTerminal, postJSON} from "/static/api.js";
import {available, columns, lossChart, pckChart} from "/static/charts.js";
import {CheckpointsCard} from "/static/checkpoints.js";
import {HealthCard} from "/static/health.js";
import {LrRangeCard, rangeSummary} from "/static/lr_range.js";
import {TryIt} from "/static/tryit.js";
import {$, armedButton, categoryLabel, h, header, jobTitle, num, pct, progressBar, showError, statusBadge, tagLinks,
        term, valuesLabel, verdictStyle, when} from "/static/ui.js";

const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const controller = new AbortController(); // aborted when the page goes: its requests and the stream stop
const LOG_LINES = 400;
const LIVE = {stream: "● live", reconnecting: "reconnecting…", ended: "finished"}; // the stream's state, in words

// What the page knows and has shown: all of it here, changed only by the functions below.
const state = {
  job: null, // the job as last heard of (GET /jobs/{id}, the stream's status events)
  sourceJob: null, // an evaluate job's: the job it evaluates, fetched once, for its name
  curves: {loss: null, pck: null, pending: [], flushTimer: null, rows: []}, // the charts, epochs waiting to be drawn,
                                                                          // and those drawn
  health: null, // the Health card (training jobs)
  lrRange: null, // the range test's card (lr_range_test jobs)
  diagnosis: {busy: null, again: false}, // a refetch of the job for its diagnosis in flight; another one wanted
  checkpoints: {items: [], card: null, tryIt: null, busy: null},
  pictures: {epochs: [], seq: 0, inputsShown: false, busy: null},
  log: {offset: 0, text: ""},
};

header(null);
addEventListener("pagehide", () => controller.abort());

// --- the job ------------------------------------------------------------------------------------------------------

async function renderJob(next) {
  const job = state.job = next;
  document.title = `${jobTitle(job)} · ${job.status} · CAPE training`;
  $("#title").textContent = jobTitle(job);
  $("#status").replaceChildren(statusBadge(job.status));
  $("#progress").replaceChildren(progressBar(job));
  document.body.dataset.status = job.status;
  $("#clone").href = `/new?clone=${job.id}`;
  $("#cancel").hidden = isTerminal(job.status) || job.status === "cancelling";
  const error = $("#error");
  error.hidden = !job.error;
  error.textContent = job.error ? `Error: ${job.error}` : "";
  renderVerdict();
  renderTest();
  state.checkpoints.card?.update(state.checkpoints.items, job);
  const evaluation = job.mode === "evaluate";
  if (evaluation) renderEvaluationOf();
  const image = job.image ? `#${job.image.index}: ${job.image.file_name} (annotation ${job.image.annotation_id})` : null;
  const category = await categoryLabel(job);
  const training = job.mode === "lr_range_test" ? rangeSummary(job).flatMap(([label, value]) => term(label, value)) : [
    ...term("Epoch", `${job.current_epoch} of ${job.total_epochs}`),
    ...term("Latest PCK@0.2", pct(job.latest_pck)),
    ...term("Latest mPCK", h("span", {id: "latest-mpck"})),
    ...term("Best PCK@0.2", pct(job.best_pck)),
    ...term("Best mPCK", h("span", {id: "best-mpck"})),
    ...(job.mode === "single_image" ? [] : term("Copy-the-support", h("span", {id: "latest-baseline"}))),
    ...term("Latest loss", num(job.latest_loss)),
  ];
  $("#summary").replaceChildren(
    ...term("Job", h("span", {class: "mono"}, job.id)),
    ...term("Mode", job.mode),
    ...term("Dataset", `${job.dataset}, split ${job.split}`),
    ...term("Category", category),
    ...(image ? term("Image", image) : []),
    ...(job.sweep_id ? term("Sweep", [h("a", {href: `/sweep/${job.sweep_id}`, id: "sweep-link"}, "its sweep"),
                                      ` · ${valuesLabel(job.sweep_values)}`]) : []),
    ...(evaluation ? term("Evaluates", h("a", {href: `/runs/${job.config.from_job}`, class: "mono"}, job.config.from_job)) : training),
    ...term("Attempts", h("span", {id: "attempts"}, String(job.attempts))),
    ...term("Worker", job.worker || "–"),
    ...term("Tags", tagLinks(job.tags)),
    ...term("Created", when(job.created_at)),
    ...term("Started", when(job.started_at)),
    ...term("Finished", when(job.finished_at)),
    ...term("Settings", h("details", {}, h("summary", {}, "all"), h("pre", {class: "config"}, JSON.stringify(job.config, null, 2)))),
  );
  renderValidation();
  state.health?.showDiagnosis(job.diagnosis);
  state.lrRange?.update(job);
}

/** The summary's mPCK and baseline: from the epoch rows the page has (the job carries PCK@0.2 only). */
function renderValidation() {
  const rows = state.curves.rows;
  const latest = (field) => rows.findLast((r) => r[field] != null)?.[field];
  const mpcks = rows.map((r) => r.mpck).filter((v) => v != null);
  const set = (id, value) => {
    const el = document.getElementById(id);
    if (el) el.textContent = value;
  };
  set("latest-mpck", pct(latest("mpck")));
  set("best-mpck", pct(mpcks.length ? Math.max(...mpcks) : null));
  const baseline = rows.findLast((r) => r.baseline_pck != null);
  set("latest-baseline", baseline ? `PCK@0.2 ${pct(baseline.baseline_pck)} · mPCK ${pct(baseline.baseline_mpck)}` : "–");
}

/** The job again, for its diagnosis: the worker writes it just before each epoch's row, without an event of its own.
 * An epoch that arrives during a refetch asks for one more after it (the one in flight may predate its diagnosis). */
async function refreshDiagnosis() {
  const refetch = state.diagnosis;
  if (refetch.busy) {
    refetch.again = true;
    return refetch.busy;
  }
  refetch.busy = (async () => {
    do {
      refetch.again = false;
      try {
        state.health?.showDiagnosis((await getJSON(`/jobs/${jobId}`, {signal: controller.signal})).diagnosis);
      } catch {
        return; // the next epoch, status event or the end asks again
      }
    } while (refetch.again);
  })().finally(() => { refetch.busy = null; });
  return refetch.busy;
}

function renderVerdict() {
  const box = $("#verdict");
  if (state.job.mode !== "single_image") {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const verdict = state.job.verdict;
  box.className = `verdict box ${verdictStyle(verdict)}`;
  if (!verdict) {
    box.replaceChildren(h("strong", {}, "Verdict: "), "none yet.");
    return;
  }
  box.dataset.state = verdict.state;
  box.replaceChildren(h("strong", {}, `Verdict: ${verdict.state}. `), verdict.message || "");
  if (verdict.never_correct?.length) {
    box.append(h("div", {class: "small"}, `Keypoints never correct at PCK@0.2: ${verdict.never_correct.join(", ")}`));
  }
}

/** An evaluate job's settings in words: "1-shot, best checkpoint, 10 episodes per category". */
function evaluationSettings(config) {
  return `${config.shots}-shot, ${config.checkpoint} checkpoint, ${config.episodes_per_category} episode`
    + `${config.episodes_per_category === 1 ? "" : "s"} per category`;
}

async function renderEvaluationOf() {
  const {job} = state;
  const box = $("#evaluation-of");
  const from = job.config.from_job;
  const link = (title) => h("a", {href: `/runs/${from}`, id: "evaluated-job"}, title);
  box.hidden = false;
  box.replaceChildren("Evaluation of ", link(state.sourceJob ? jobTitle(state.sourceJob) : `job ${from.slice(0, 8)}`),
    ` (${evaluationSettings(job.config)}) on the unseen test categories of split ${job.split}.`);
  if (state.sourceJob) return;
  try {
    state.sourceJob = await getJSON(`/jobs/${encodeURIComponent(from)}`);
    $("#evaluated-job").textContent = jobTitle(state.sourceJob);
  } catch {
    // gone (or another key's): the link with the id says what there is to say
  }
}

function renderTest() {
  const result = state.job.test_result;
  $("#test-section").hidden = !result;
  if (!result) return;
  const rows = Object.entries(result.per_category || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  const checkpoint = result.checkpoint;
  $("#test-result").replaceChildren(...[
    checkpoint ? h("p", {id: "test-checkpoint"}, `${result.shots}-shot with the ${checkpoint.name} checkpoint (epoch ${checkpoint.epoch}`
      + `${checkpoint.val_pck == null ? "" : `, validation PCK@0.2 ${pct(checkpoint.val_pck)}`}), `
      + `${result.episodes_per_category} episode${result.episodes_per_category === 1 ? "" : "s"} per category`) : null,
    h("p", {}, `PCK@0.2 ${pct(result.pck)} · mPCK ${pct(result.mpck)} · copy-the-support baseline PCK ${pct(result.baseline_copy_support_pck)}`),
    h("table", {class: "test", id: "test-table"},
      h("thead", {}, h("tr", {}, ["Category", "Name", "PCK@0.2", "mPCK", "Queries", "Excluded"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows.map(([id, c]) => h("tr", {},
        h("td", {}, id), h("td", {}, c.name), h("td", {class: "num"}, pct(c.pck)), h("td", {class: "num"}, pct(c.mpck)),
        h("td", {class: "num"}, c.num_queries), h("td", {class: "num"}, c.num_excluded))))),
  ].filter(Boolean));
}

armedButton($("#cancel"), async () => {
  try {
    await renderJob(await postJSON(`/jobs/${jobId}/cancel`, undefined));
  } catch (error) {
    showError($("#message"), error);
  }
});

// --- curves ------------------------------------------------------------------------------------------------------

// The loss terms, the total drawn last (on top of loss_ce, which it nearly equals) but first in the legend.
const LOSS_TRACES = [{name: "loss_ce", color: "#d62728", dash: "dot", width: 1.5, rank: 2},
                     {name: "loss_coords", color: "#2ca02c", dash: "dash", width: 1.5, rank: 3},
                     {name: "loss", color: "#1f77b4", width: 2.5, rank: 1}];
const PCK_TRACES = [{name: "PCK@0.2", color: "#2ca02c"}, {name: "mPCK", color: "#9467bd", dash: "dash"}];
// Copying the support's keypoints onto the query (category and full modes): a model at or under these lines has
// learnt nothing the support did not already say. Single-image runs have none (support = query).
const BASELINE_TRACES = [{name: "copy-the-support PCK@0.2", color: "#2ca02c", dash: "dot", width: 1.5},
                         {name: "copy-the-support mPCK", color: "#9467bd", dash: "dot", width: 1.5}];
const PCK_FIELDS = ["pck", "mpck", "baseline_pck", "baseline_mpck"];

function drawCharts() {
  if (!available()) {
    $("#loss-chart").textContent = "The charting library did not load.";
    return;
  }
  state.curves.loss = lossChart($("#loss-chart"), {traces: LOSS_TRACES, singleImage: state.job.mode === "single_image"});
  const baseline = state.job.mode !== "single_image";
  state.curves.pck = pckChart($("#pck-chart"), {traces: baseline ? [...PCK_TRACES, ...BASELINE_TRACES] : PCK_TRACES});
}

function onEpoch(row) {
  const curves = state.curves;
  curves.pending.push(row);
  if (!curves.flushTimer) curves.flushTimer = setTimeout(flush, 50); // a replay of many rows is one chart update
}

async function flush() {
  const curves = state.curves;
  curves.flushTimer = null;
  const rows = curves.pending;
  curves.pending = [];
  if (!rows.length) return;
  document.body.dataset.epochs = String(rows[rows.length - 1].epoch);
  curves.rows.push(...rows);
  renderValidation();
  refreshDiagnosis();
  const pckFields = state.job.mode === "single_image" ? PCK_FIELDS.slice(0, 2) : PCK_FIELDS;
  if (curves.loss) {
    await Promise.all([curves.loss.extend(columns(rows, ["loss_ce", "loss_coords", "loss"])),
                       curves.pck.extend(columns(rows, pckFields)), state.health?.addRows(rows)]);
  }
  refreshPictures();
  refreshCheckpoints(); // a better epoch saved a new best
}

// --- checkpoints: the card and the "Try it" panel ------------------------------------------------------------------

async function refreshCheckpoints() {
  const checkpoints = state.checkpoints;
  if (state.job.mode === "evaluate" || state.job.mode === "lr_range_test") return; // neither writes a checkpoint
  if (checkpoints.busy) return checkpoints.busy;
  checkpoints.busy = (async () => {
    try {
      const items = (await getJSON(`/jobs/${jobId}/checkpoints`, {signal: controller.signal})).items;
      checkpoints.items = items;
      if (!items.length) return;
      if (!checkpoints.card) {
        checkpoints.card = new CheckpointsCard($("#checkpoints-section"), state.job);
        checkpoints.tryIt = new TryIt($("#tryit"), state.job);
        await Promise.all([checkpoints.card.init(), checkpoints.tryIt.init()]);
        $("#tryit").hidden = false;
      }
      checkpoints.card.update(items, state.job);
      checkpoints.tryIt.setCheckpoints(items);
      document.body.dataset.checkpoints = items.map((c) => c.name).join(" ");
    } catch (error) {
      if (!controller.signal.aborted) showError($("#message"), error); // tried again at the next epoch
    } finally {
      checkpoints.busy = null;
    }
  })();
  return checkpoints.busy;
}

// --- pictures ----------------------------------------------------------------------------------------------------

async function refreshPictures() {
  const shown = state.pictures;
  if (shown.busy) return shown.busy;
  shown.busy = (async () => {
    try {
      const pictures = await getJSON(`/jobs/${jobId}/pictures`, {signal: controller.signal});
      if (pictures.inputs && !shown.inputsShown) {
        const url = await blobURL(`/jobs/${jobId}/inputs.png`);
        if (url) {
          shown.inputsShown = true;
          $("#inputs").src = url;
          $("#inputs").hidden = false;
          $("#inputs-note").hidden = true;
        }
      }
      const slider = $("#epoch-slider");
      const following = shown.epochs.length === 0 || Number(slider.value) === shown.epochs.length - 1;
      if (pictures.epochs.length !== shown.epochs.length) {
        shown.epochs = pictures.epochs;
        slider.max = String(Math.max(0, shown.epochs.length - 1));
        slider.disabled = shown.epochs.length < 2;
        if (following && shown.epochs.length) {
          slider.value = String(shown.epochs.length - 1);
          showPicture();
        }
      }
    } catch (error) {
      if (!controller.signal.aborted) showError($("#message"), error); // tried again at the next epoch
    } finally {
      shown.busy = null;
    }
  })();
  return shown.busy;
}

async function showPicture() {
  const seq = ++state.pictures.seq;
  const current = () => seq === state.pictures.seq; // not overtaken by a later move of the slider
  const epoch = state.pictures.epochs[Number($("#epoch-slider").value)];
  if (epoch == null) return;
  $("#picture-epoch").textContent = String(epoch);
  const url = await blobURL(`/jobs/${jobId}/epochs/${epoch}/predictions.png`).catch(() => null);
  if (!current()) {
    if (url) URL.revokeObjectURL(url);
    return;
  }
  const img = $("#prediction");
  if (!url) {
    $("#prediction-note").textContent = `No picture for epoch ${epoch}.`;
    $("#prediction-note").hidden = false;
    return;
  }
  const old = img.src;
  img.src = url;
  img.dataset.epoch = String(epoch);
  img.hidden = false;
  $("#prediction-note").hidden = true;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  getJSON(`/jobs/${jobId}/epochs/${epoch}/predictions`).then((p) => {
    if (!current()) return;
    $("#prediction-detail").replaceChildren(...p.queries.map((q) => {
      const counted = q.counted.filter(Boolean).length;
      const correct = q.correct.filter((c, i) => c && q.counted[i]).length;
      return h("div", {}, `${q.file_name}: PCK@0.2 ${pct(q.pck)}, ${correct} of ${counted} keypoints correct`);
    }));
  }).catch(() => $("#prediction-detail").replaceChildren());
}

$("#epoch-slider").addEventListener("input", showPicture);
$("#prediction").addEventListener("click", () => window.open($("#prediction").src, "_blank"));

// --- the log tail ------------------------------------------------------------------------------------------------

async function pollLog() {
  const tail = state.log;
  for (;;) {
    try {
      const chunk = await getJSON(`/jobs/${jobId}/logs?offset=${tail.offset}`, {signal: controller.signal});
      if (chunk.text) {
        const log = $("#log");
        const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        tail.text = (tail.text + chunk.text).split("\n").slice(-LOG_LINES).join("\n");
        log.textContent = tail.text;
        if (atBottom) log.scrollTop = log.scrollHeight;
      } else if (!tail.text) {
        $("#log").textContent = "(nothing logged yet)";
      }
      tail.offset = chunk.next_offset;
      if (chunk.complete) {
        $("#log-state").textContent = "complete";
        return;
      }
      $("#log-state").textContent = `last ${LOG_LINES} lines, live`;
      if (chunk.text) continue; // more may be waiting
    } catch (error) {
      if (controller.signal.aborted) return;
      $("#log-state").textContent = `not updated (${error.message}), trying again`;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// --- start -------------------------------------------------------------------------------------------------------

try {
  await renderJob(await getJSON(`/jobs/${encodeURIComponent(jobId)}`));
} catch (error) {
  showError($("#message"), error instanceof ApiError && error.status === 404 ? new Error(`Job ${jobId} not found.`) : error);
  document.body.dataset.status = "missing";
  throw error;
}

const evaluation = state.job.mode === "evaluate";
const rangeTest = state.job.mode === "lr_range_test";
if (evaluation) {
  // no epochs, no pictures, nothing to clone: what it evaluated, its test table and its log
  for (const id of ["clone", "verdict"]) $(`#${id}`).hidden = true;
  for (const selector of [".charts", ".pictures"]) $(selector).hidden = true;
} else if (rangeTest) {
  // no epochs, pictures or checkpoints: the loss against the learning rate, once the test ended; Clone opens the form
  // with the training run it prepares
  for (const selector of [".charts", ".pictures"]) $(selector).hidden = true;
  state.lrRange = new LrRangeCard($("#lr-range"));
  state.lrRange.update(state.job);
} else {
  if (available()) {
    $("#health").hidden = false;
    state.health = new HealthCard($("#health"));
    state.health.showDiagnosis(state.job.diagnosis);
  }
  drawCharts();
  refreshPictures();
  refreshCheckpoints();
}
pollLog();
followJob(jobId, {
  afterEpoch: 0,
  signal: controller.signal,
  onEpoch,
  onStatus: renderJob,
  onMode: (mode) => {
    $("#live").textContent = LIVE[mode] || mode;
    document.body.dataset.live = mode;
    const seen = new Set((document.body.dataset.liveSeen || "").split(" ").filter(Boolean)).add(mode);
    document.body.dataset.liveSeen = [...seen].join(" ");
  },
  onEnd: async () => {
    await flush();
    if (!evaluation && !rangeTest) await Promise.all([refreshPictures(), refreshCheckpoints()]);
    renderJob(await getJSON(`/jobs/${jobId}`)); // the last word: verdict, test result, finished_at
  },
}).catch((error) => showError($("#message"), error));
