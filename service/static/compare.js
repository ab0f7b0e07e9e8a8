// GET /compare?ids=<id>,<id> or /compare?tag=<tag>: several runs' curves overlaid (a learning-rate sweep, say), the
// loss and the PCK side by side, with what differs between the runs; below them any one instrument of the runs
// (&metric=<key>, a key of health.js's INSTRUMENTS: gradient norm, clip rate, update ratio of a part, step time...).
// Runs still training keep growing (charts.js RunsOverlay).

import {ApiError, getJSON} from "/static/api.js";
import {COLORS, LineChart, RunsOverlay, available} from "/static/charts.js";
import {INSTRUMENT, INSTRUMENTS, chartOptions, series} from "/static/health.js";
import {$, categoryLabel, h, header, jobTitle, num, pct, shortId, statusBadge, verdictBadge, whenVisible} from "/static/ui.js";

const params = new URLSearchParams(location.search);
const ids = (params.get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean);
const tag = (params.get("tag") || "").trim();
const DEFAULT_METRIC = "grad_norm";

// The runs compared and what the page has of them: all of it here.
const state = {
  jobs: [], // as last fetched, in the order shown (a tag's: oldest first)
  diffs: [], // per job: the settings that differ from the others', "name=value, ..."
  labels: [], // per job: its legend entry
  overlay: null, // the loss and PCK charts, with every job's epoch rows so far (overlay.rows)
  metric: DEFAULT_METRIC, // the instrument overlaid below the two charts (a key of INSTRUMENT)
  metricChart: null, // its chart
};

header("compare");
$("#ids").value = ids.join(", ");
$("#tag").value = tag;

$("#choose").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  const chosenTag = $("#tag").value.trim();
  const chosenIds = $("#ids").value.split(/[\s,]+/).filter(Boolean);
  if (chosenTag) query.set("tag", chosenTag);
  else if (chosenIds.length) query.set("ids", chosenIds.join(","));
  if (state.metric !== DEFAULT_METRIC) query.set("metric", state.metric);
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

/** A legend entry per job: its name where that tells the jobs apart, else what differs (the swept setting). */
function legendLabels(jobs, diffs) {
  const names = jobs.map((job) => job.name || "");
  const unique = (name) => name && names.filter((n) => n === name).length === 1;
  return jobs.map((job, i) => (unique(names[i]) ? names[i] : [names[i], diffs[i]].filter(Boolean).join(" · "))
    || `job ${shortId(job.id)}`);
}

async function renderTable() {
  const rows = await Promise.all(state.jobs.map(async (job, i) => h("tr", {dataset: {jobId: job.id}},
    h("td", {}, h("span", {class: "swatch", style: `background: ${COLORS[i % COLORS.length]}`})),
    h("td", {}, h("a", {href: `/runs/${job.id}`}, jobTitle(job))),
    h("td", {}, statusBadge(job.status)),
    h("td", {class: "mono small"}, state.diffs[i] || "–"),
    h("td", {}, await categoryLabel(job)),
    h("td", {class: "num"}, `${job.current_epoch}/${job.total_epochs}`),
    h("td", {class: "num"}, num(job.latest_loss)),
    h("td", {class: "num"}, pct(job.best_pck)),
    h("td", {class: "num best-mpck"}, pct(best(state.overlay?.rows[i], "mpck"))),
    h("td", {}, verdictBadge(job)),
  )));
  $("#runs tbody").replaceChildren(...rows);
}

function best(rows = [], field) {
  const values = rows.map((r) => r[field]).filter((v) => v != null);
  return values.length ? Math.max(...values) : null;
}

/** The charts, with every run's epochs so far: one trace per run, in the table's colours. */
async function drawCharts() {
  const {jobs} = state;
  state.overlay = new RunsOverlay({loss: $("#loss-chart"), pck: $("#pck-chart")},
                                  jobs.map((job, i) => ({id: job.id, label: state.labels[i]})),
                                  {singleImage: jobs.every((job) => job.mode === "single_image")});
  await state.overlay.draw();
  await drawMetric();
}

// --- any instrument, overlaid ------------------------------------------------------------------------------------

function metricPicker() {
  const groups = new Map();
  for (const instrument of INSTRUMENTS) {
    if (!groups.has(instrument.group)) groups.set(instrument.group, []);
    groups.get(instrument.group).push(h("option", {value: instrument.key}, instrument.label));
  }
  const select = $("#metric");
  select.replaceChildren(...[...groups].map(([label, options]) => h("optgroup", {label}, options)));
  const asked = params.get("metric");
  if (asked && !INSTRUMENT[asked]) {
    message(`Unknown instrument “${asked}”: choose one of ${INSTRUMENTS.map((i) => i.key).join(", ")}.`);
  } else if (asked) {
    state.metric = asked;
  }
  select.value = state.metric;
  select.addEventListener("change", () => {
    state.metric = select.value;
    const query = new URLSearchParams(location.search);
    query.set("metric", state.metric);
    history.replaceState(null, "", `/compare?${query}`); // the chosen instrument is part of the link to share
    drawMetric();
  });
}

/** The chosen instrument, one trace per run: a new chart (its axis may be another kind), the runs' rows so far. */
async function drawMetric() {
  if (!state.overlay) return; // no runs to draw
  const instrument = INSTRUMENT[state.metric];
  const title = instrument.label.charAt(0).toUpperCase() + instrument.label.slice(1);
  const chart = new LineChart($("#metric-chart"), {
    title, ...chartOptions(instrument), height: 340,
    empty: `no values: ${instrument.absent || "these runs did not report it"}`,
    traces: state.jobs.map((job, i) => ({name: state.labels[i], color: COLORS[i % COLORS.length],
                                         ...series(instrument, state.overlay.rows[i])})),
  });
  state.metricChart = chart;
  $("#metric-chart").dataset.metric = state.metric;
  await chart.ready;
}

/** Runs still training gain points without a reload (extendTraces: the zoom stays), and the table follows. */
async function followOpenRuns() {
  const {jobs, overlay} = state;
  if (!overlay) return;
  const open = overlay.open();
  if (!open.length) return;
  const instrument = INSTRUMENT[state.metric], metricChart = state.metricChart;
  const fresh = await overlay.grow();
  // after the rows: a job whose metrics said it ended is shown ended
  await Promise.all(open.map(async (i) => { jobs[i] = await getJSON(`/jobs/${jobs[i].id}`); }));
  // Another instrument picked meanwhile: its chart, drawn from rows that may lack these, is drawn again.
  const picked = metricChart !== state.metricChart;
  await (picked ? drawMetric() : metricChart.extend(fresh.map((rows) => rows && series(instrument, rows))));
  await renderTable();
}

state.jobs = await chosenJobs();
if (!state.jobs.length && !tag && !ids.length) {
  $("#message").append(h("p", {class: "muted"}, "Choose the runs to compare: a tag, job ids, or tick them in the list."));
}
state.diffs = differences(state.jobs);
state.labels = legendLabels(state.jobs, state.diffs);
metricPicker();
if (state.jobs.length && available()) await drawCharts();
await renderTable();
document.body.dataset.ready = "true";
whenVisible(followOpenRuns, 3000);
