// GET /runs/<job id>: one run, live. Curves grow as epochs arrive (GET /jobs/{id}/events, a fetch()-read stream),
// with the status, the verdict, the pictures and the log tail; Cancel and Clone. A training job with a checkpoint
// also gets the checkpoints card (download, evaluate) and the "Try it" panel; an evaluate job shows what it
// evaluated and its test table instead of curves and pictures.

import {ApiError, blobURL, followJob, getJSON, isTerminal, postJSON} from "/static/api.js";
import {LineChart, available, columns} from "/static/charts.js";
import {CheckpointsCard} from "/static/checkpoints.js";
import {TryIt} from "/static/tryit.js";
import {$, categoryLabel, h, header, jobTitle, num, pct, progressBar, showError, statusBadge, when} from "/static/ui.js";

header(null);
const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const controller = new AbortController();
addEventListener("pagehide", () => controller.abort());
let job = null;

// --- the job ------------------------------------------------------------------------------------------------------

function term(label, value) {
  return [h("dt", {}, label), h("dd", {}, value)];
}

async function renderJob(next) {
  job = next;
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
  checkpointsCard?.update(checkpoints, job);
  const evaluation = job.mode === "evaluate";
  if (evaluation) renderEvaluationOf();
  const image = job.image ? `#${job.image.index}: ${job.image.file_name} (annotation ${job.image.annotation_id})` : null;
  const category = await categoryLabel(job);
  const training = [
    ...term("Epoch", `${job.current_epoch} of ${job.total_epochs}`),
    ...term("Latest PCK@0.2", pct(job.latest_pck)),
    ...term("Best PCK@0.2", pct(job.best_pck)),
    ...term("Latest loss", num(job.latest_loss)),
  ];
  $("#summary").replaceChildren(
    ...term("Job", h("span", {class: "mono"}, job.id)),
    ...term("Mode", job.mode),
    ...term("Dataset", `${job.dataset}, split ${job.split}`),
    ...term("Category", category),
    ...(image ? term("Image", image) : []),
    ...(evaluation ? term("Evaluates", h("a", {href: `/runs/${job.config.from_job}`, class: "mono"}, job.config.from_job)) : training),
    ...term("Attempts", h("span", {id: "attempts"}, String(job.attempts))),
    ...term("Worker", job.worker || "–"),
    ...term("Tags", job.tags.length ? job.tags.map((t) => h("a", {class: "tag", href: `/?tag=${encodeURIComponent(t)}`}, t)) : "–"),
    ...term("Created", when(job.created_at)),
    ...term("Started", when(job.started_at)),
    ...term("Finished", when(job.finished_at)),
    ...term("Settings", h("details", {}, h("summary", {}, "all"), h("pre", {class: "config"}, JSON.stringify(job.config, null, 2)))),
  );
}

function renderVerdict() {
  const box = $("#verdict");
  if (job.mode !== "single_image") {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  const verdict = job.verdict;
  if (!verdict) {
    box.className = "verdict box pending";
    box.replaceChildren(h("strong", {}, "Verdict: "), "none yet.");
    return;
  }
  box.className = `verdict box ${{"memorised": "good", "not yet": "pending", "not memorised": "bad"}[verdict.state] || ""}`;
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

let sourceJob = null; // the job an evaluate job evaluates: fetched once, for its name

async function renderEvaluationOf() {
  const box = $("#evaluation-of");
  const from = job.config.from_job;
  const link = (title) => h("a", {href: `/runs/${from}`, id: "evaluated-job"}, title);
  box.hidden = false;
  box.replaceChildren("Evaluation of ", link(sourceJob ? jobTitle(sourceJob) : `job ${from.slice(0, 8)}`),
    ` (${evaluationSettings(job.config)}) on the unseen test categories of split ${job.split}.`);
  if (sourceJob) return;
  try {
    sourceJob = await getJSON(`/jobs/${encodeURIComponent(from)}`);
    $("#evaluated-job").textContent = jobTitle(sourceJob);
  } catch {
    // gone (or another key's): the link with the id says what there is to say
  }
}

function renderTest() {
  const result = job.test_result;
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

let armed = null;
$("#cancel").addEventListener("click", async () => {
  const button = $("#cancel");
  if (!armed) { // two clicks: a stray one does not stop a long run
    button.textContent = "Really cancel?";
    button.classList.add("armed");
    armed = setTimeout(() => { armed = null; button.textContent = "Cancel"; button.classList.remove("armed"); }, 5000);
    return;
  }
  clearTimeout(armed);
  armed = null;
  button.disabled = true;
  try {
    await renderJob(await postJSON(`/jobs/${jobId}/cancel`, undefined));
  } catch (error) {
    showError($("#message"), error);
  } finally {
    button.disabled = false;
    button.textContent = "Cancel";
    button.classList.remove("armed");
  }
});

// --- curves ------------------------------------------------------------------------------------------------------

let lossChart = null, pckChart = null;
let pending = [];
let flushTimer = null;
let epochs = 0;

function onEpoch(row) {
  pending.push(row);
  if (!flushTimer) flushTimer = setTimeout(flush, 50); // a replay of many rows is one chart update
}

async function flush() {
  flushTimer = null;
  const rows = pending;
  pending = [];
  if (!rows.length) return;
  epochs = rows[rows.length - 1].epoch;
  document.body.dataset.epochs = String(epochs);
  if (lossChart) {
    await Promise.all([lossChart.extend(columns(rows, ["loss_ce", "loss_coords", "loss"])),
                       pckChart.extend(columns(rows, ["pck", "mpck"]))]);
  }
  refreshPictures();
  refreshCheckpoints(); // a better epoch saved a new best
}

// --- checkpoints: the card and the "Try it" panel ------------------------------------------------------------------

let checkpoints = [];
let checkpointsCard = null;
let tryIt = null;
let checkpointsBusy = null;

async function refreshCheckpoints() {
  if (job.mode === "evaluate") return;
  if (checkpointsBusy) return checkpointsBusy;
  checkpointsBusy = (async () => {
    try {
      checkpoints = (await getJSON(`/jobs/${jobId}/checkpoints`, {signal: controller.signal})).items;
      if (!checkpoints.length) return;
      if (!checkpointsCard) {
        checkpointsCard = new CheckpointsCard($("#checkpoints-section"), job);
        tryIt = new TryIt($("#tryit"), job);
        await tryIt.init();
        $("#tryit").hidden = false;
      }
      checkpointsCard.update(checkpoints, job);
      tryIt.setCheckpoints(checkpoints);
      document.body.dataset.checkpoints = checkpoints.map((c) => c.name).join(" ");
    } catch (error) {
      if (!controller.signal.aborted) showError($("#message"), error); // tried again at the next epoch
    } finally {
      checkpointsBusy = null;
    }
  })();
  return checkpointsBusy;
}

// --- pictures ----------------------------------------------------------------------------------------------------

let pictureEpochs = [];
let pictureSeq = 0;
let inputsShown = false;
let picturesBusy = null;

async function refreshPictures() {
  if (picturesBusy) return picturesBusy;
  picturesBusy = (async () => {
    try {
      const pictures = await getJSON(`/jobs/${jobId}/pictures`, {signal: controller.signal});
      if (pictures.inputs && !inputsShown) {
        const url = await blobURL(`/jobs/${jobId}/inputs.png`);
        if (url) {
          inputsShown = true;
          $("#inputs").src = url;
          $("#inputs").hidden = false;
          $("#inputs-note").hidden = true;
        }
      }
      const slider = $("#epoch-slider");
      const following = pictureEpochs.length === 0 || Number(slider.value) === pictureEpochs.length - 1;
      if (pictures.epochs.length !== pictureEpochs.length) {
        pictureEpochs = pictures.epochs;
        slider.max = String(Math.max(0, pictureEpochs.length - 1));
        slider.disabled = pictureEpochs.length < 2;
        if (following && pictureEpochs.length) {
          slider.value = String(pictureEpochs.length - 1);
          showPicture();
        }
      }
    } catch (error) {
      if (!controller.signal.aborted) showError($("#message"), error); // tried again at the next epoch
    } finally {
      picturesBusy = null;
    }
  })();
  return picturesBusy;
}

async function showPicture() {
  const seq = ++pictureSeq;
  const epoch = pictureEpochs[Number($("#epoch-slider").value)];
  if (epoch == null) return;
  $("#picture-epoch").textContent = String(epoch);
  const url = await blobURL(`/jobs/${jobId}/epochs/${epoch}/predictions.png`).catch(() => null);
  if (seq !== pictureSeq) {
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
    if (seq !== pictureSeq) return;
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

const LOG_LINES = 400;
let logOffset = 0;
let logText = "";

async function pollLog() {
  for (;;) {
    try {
      const chunk = await getJSON(`/jobs/${jobId}/logs?offset=${logOffset}`, {signal: controller.signal});
      if (chunk.text) {
        const log = $("#log");
        const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        logText = (logText + chunk.text).split("\n").slice(-LOG_LINES).join("\n");
        log.textContent = logText;
        if (atBottom) log.scrollTop = log.scrollHeight;
      } else if (!logText) {
        $("#log").textContent = "(nothing logged yet)";
      }
      logOffset = chunk.next_offset;
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

const LIVE = {stream: "● live", reconnecting: "reconnecting…", ended: "finished"};

try {
  await renderJob(await getJSON(`/jobs/${encodeURIComponent(jobId)}`));
} catch (error) {
  showError($("#message"), error instanceof ApiError && error.status === 404 ? new Error(`Job ${jobId} not found.`) : error);
  document.body.dataset.status = "missing";
  throw error;
}

const evaluation = job.mode === "evaluate";
if (evaluation) {
  // no epochs, no pictures, nothing to clone: what it evaluated, its test table and its log
  for (const id of ["clone", "verdict"]) $(`#${id}`).hidden = true;
  for (const selector of [".charts", ".pictures"]) $(selector).hidden = true;
} else if (available()) {
  const single = job.mode === "single_image";
  lossChart = new LineChart($("#loss-chart"), {
    title: "Training loss", yTitle: "loss (log scale)", log: true,
    // the total last, on top of loss_ce (which it nearly equals), but first in the legend
    traces: [{name: "loss_ce", color: "#d62728", dash: "dot", width: 1.5, rank: 2},
             {name: "loss_coords", color: "#2ca02c", dash: "dash", width: 1.5, rank: 3},
             {name: "loss", color: "#1f77b4", width: 2.5, rank: 1}],
    guide: single ? {y: 0.1, text: "memorised below 0.1"} : null,
  });
  pckChart = new LineChart($("#pck-chart"), {
    title: "Validation PCK", yTitle: "PCK", percent: true,
    traces: [{name: "PCK@0.2", color: "#2ca02c"}, {name: "mPCK", color: "#9467bd", dash: "dash"}],
  });
} else {
  $("#loss-chart").textContent = "The charting library did not load.";
}

if (!evaluation) {
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
    if (!evaluation) await Promise.all([refreshPictures(), refreshCheckpoints()]);
    renderJob(await getJSON(`/jobs/${jobId}`)); // the last word: verdict, test result, finished_at
  },
}).catch((error) => showError($("#message"), error));
