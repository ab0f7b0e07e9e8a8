// GET /compare?ids=<id>,<id> or /compare?tag=<tag>: several runs' curves overlaid (a learning-rate sweep, say), the
// loss and the PCK side by side, with what differs between the runs. Runs still training keep growing: this page
// polls GET /jobs/{id}/metrics for them (one stream per job would use up the browser's connections to the server).

import {ApiError, allMetrics, getJSON, isTerminal} from "/static/api.js";
import {COLORS, LineChart, available} from "/static/charts.js";
import {$, categoryLabel, h, header, jobTitle, num, pct, shortId, statusBadge, verdictBadge, whenVisible} from "/static/ui.js";

header("compare");
const params = new URLSearchParams(location.search);
const ids = (params.get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean);
const tag = (params.get("tag") || "").trim();
$("#ids").value = ids.join(", ");
$("#tag").value = tag;

$("#choose").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  const chosenTag = $("#tag").value.trim();
  const chosenIds = $("#ids").value.split(/[\s,]+/).filter(Boolean);
  if (chosenTag) query.set("tag", chosenTag);
  else if (chosenIds.length) query.set("ids", chosenIds.join(","));
  location.href = `/compare?${query}`;
});

function message(...parts) {
  $("#message").append(h("p", {class: "error"}, ...parts));
}

async function chosenJobs() {
  if (tag) {
    const list = await getJSON(`/jobs?tag=${encodeURIComponent(tag)}&limit=100`);
    if (!list.items.length) message(`No job has the tag “${tag}”.`);
    return list.items.reverse(); // oldest first: a sweep in the order it was submitted
  }
  const answers = await Promise.allSettled(ids.map((id) => getJSON(`/jobs/${encodeURIComponent(id)}`)));
  answers.forEach((answer, i) => {
    if (answer.status === "rejected") {
      message(`Job ${ids[i]}: ${answer.reason instanceof ApiError && answer.reason.status === 404 ? "not found" : answer.reason.message}`);
    }
  });
  return answers.filter((a) => a.status === "fulfilled").map((a) => a.value);
}

/** The settings that differ between the jobs (a sweep's variable), as "name=value" per job. */
function differences(jobs) {
  const settings = jobs.map((job) => ({mode: job.mode, dataset: job.dataset, split: job.split, category_id: job.category_id,
                                       image_index: job.image?.index, ...job.config}));
  const keys = [...new Set(settings.flatMap(Object.keys))].filter(
    (key) => new Set(settings.map((s) => JSON.stringify(s[key]))).size > 1);
  return settings.map((s) => keys.map((key) => `${key}=${s[key]}`).join(", "));
}

const jobs = await chosenJobs();
if (!jobs.length && !tag && !ids.length) {
  $("#message").append(h("p", {class: "muted"}, "Choose the runs to compare: a tag, job ids, or tick them in the list."));
}
const diffs = differences(jobs);
// A legend entry per job: its name where that tells the jobs apart, else what differs (the swept setting).
const names = jobs.map((job) => job.name || "");
const unique = (name) => name && names.filter((n) => n === name).length === 1;
const labels = jobs.map((job, i) => (unique(names[i]) ? names[i] : [names[i], diffs[i]].filter(Boolean).join(" · ")) || `job ${shortId(job.id)}`);
const state = jobs.map(() => ({next: 0, status: null}));

async function renderTable() {
  const rows = await Promise.all(jobs.map(async (job, i) => h("tr", {dataset: {jobId: job.id}},
    h("td", {}, h("span", {class: "swatch", style: `background: ${COLORS[i % COLORS.length]}`})),
    h("td", {}, h("a", {href: `/runs/${job.id}`}, jobTitle(job))),
    h("td", {}, statusBadge(job.status)),
    h("td", {class: "mono small"}, diffs[i] || "–"),
    h("td", {}, await categoryLabel(job)),
    h("td", {class: "num"}, `${job.current_epoch}/${job.total_epochs}`),
    h("td", {class: "num"}, num(job.latest_loss)),
    h("td", {class: "num"}, pct(job.best_pck)),
    h("td", {}, verdictBadge(job)),
  )));
  $("#runs tbody").replaceChildren(...rows);
}

let lossChart = null, pckChart = null;
if (jobs.length && available()) {
  const history = await Promise.all(jobs.map((job) => allMetrics(job.id)));
  history.forEach((page, i) => { state[i] = {next: page.next, status: page.status}; });
  const traces = (field) => jobs.map((job, i) => ({name: labels[i], color: COLORS[i % COLORS.length],
    x: history[i].rows.map((r) => r.epoch), y: history[i].rows.map((r) => (Number.isFinite(r[field]) ? r[field] : null))}));
  const single = jobs.every((job) => job.mode === "single_image");
  lossChart = new LineChart($("#loss-chart"), {title: "Training loss", yTitle: "loss (log scale)", log: true, traces: traces("loss"),
                                               guide: single ? {y: 0.1, text: "memorised below 0.1"} : null});
  pckChart = new LineChart($("#pck-chart"), {title: "Validation PCK@0.2", yTitle: "PCK", percent: true, traces: traces("pck")});
  await Promise.all([lossChart.ready, pckChart.ready]);
}
await renderTable();
document.body.dataset.ready = "true";

// Live: runs still training gain points without a reload (extendTraces: the zoom stays).
whenVisible(async () => {
  const open = jobs.map((job, i) => i).filter((i) => !isTerminal(state[i].status ?? jobs[i].status));
  if (!open.length || !lossChart) return;
  const lossColumns = jobs.map(() => null), pckColumns = jobs.map(() => null);
  await Promise.all(open.map(async (i) => {
    const page = await allMetrics(jobs[i].id, state[i].next);
    state[i] = {next: page.next, status: page.status};
    lossColumns[i] = {x: page.rows.map((r) => r.epoch), y: page.rows.map((r) => r.loss)};
    pckColumns[i] = {x: page.rows.map((r) => r.epoch), y: page.rows.map((r) => r.pck)};
    jobs[i] = await getJSON(`/jobs/${jobs[i].id}`);
  }));
  await Promise.all([lossChart.extend(lossColumns), pckChart.extend(pckColumns)]);
  await renderTable();
}, 3000);
