// /sweep/<sweep id>: one sweep, live. Its members ranked by the sweep's metric (the best one marked), their loss
// and PCK curves overlaid (one trace per member, named by its grid values), Cancel while a member has not ended. The
// page polls GET /sweeps/{id} every 3 s, and the open members' new epochs, until every member has ended.

import {ApiError, getJSON, postJSON} from "/static/api.js";
import {COLORS, RunsOverlay, available} from "/static/charts.js";
import {$, armedButton, categoryLabel, countsLabel, gridLabel, h, header, metricValue, pct, progressBar, showError,
        statusBadge, sweepTitle, tagLinks, term, valuesLabel, when, whenVisible} from "/static/ui.js";

const sweepId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());

// What the page knows and has shown: all of it here.
const state = {
  sweep: null, // as last fetched
  order: [], // the members' job ids in the grid's order (as submitted): each one's trace and colour, whatever its rank
  overlay: null, // the members' curves
  stop: null, // stops the polling
};

header("sweeps");

/** The members in the grid's order: by the position of each of their values in the grid's lists, field by field. */
function gridOrder(sweep) {
  const fields = Object.keys(sweep.grid);
  const key = (member) => fields.map((field) => sweep.grid[field].indexOf(member.values[field]));
  const before = (a, b) => a.findIndex((x, i) => x !== b[i]);
  return [...sweep.members]
    .sort((a, b) => {
      const [ka, kb] = [key(a), key(b)];
      const at = before(ka, kb);
      return at < 0 ? 0 : ka[at] - kb[at];
    })
    .map((member) => member.job.id);
}

const METRIC_LABEL = {memorised_epoch: "Memorised at", best_pck: "Best PCK@0.2", best_mpck: "Best mPCK",
                      latest_loss: "Latest loss"};

/** The memorised epoch has a column of its own where it is not the ranking's (single-image sweeps only). */
const memorisedColumn = (sweep) => sweep.mode === "single_image" && sweep.metric !== "memorised_epoch";

function memberRow(sweep, member) {
  const {job} = member;
  const best = job.id === sweep.best;
  const colour = COLORS[state.order.indexOf(job.id) % COLORS.length];
  return h("tr", {class: best ? "best" : null, dataset: {jobId: job.id, rank: member.rank, status: job.status}},
    h("td", {class: "num rank"}, String(member.rank),
      best ? [" ", h("span", {class: "badge best-mark", title: `rank 1 by ${sweep.metric}`}, "best")] : null),
    h("td", {}, h("span", {class: "swatch", style: `background: ${colour}`})),
    ...Object.keys(sweep.grid).map((field) => h("td", {class: "num mono", dataset: {field}},
                                                 String(member.values[field]))),
    h("td", {class: "status"}, statusBadge(job.status), progressBar(job)),
    h("td", {class: "num metric"}, metricValue(sweep.metric, member.metric)),
    sweep.metric === "best_pck" ? null : h("td", {class: "num best-pck"}, pct(job.best_pck)),
    memorisedColumn(sweep) ? h("td", {class: "num memorised"}, job.verdict?.epoch ?? "–") : null,
    h("td", {}, h("a", {class: "run-link", href: `/runs/${job.id}`}, "run →")),
  );
}

function renderTable(sweep) {
  const heads = ["Rank", "", ...Object.keys(sweep.grid), "Status", `${METRIC_LABEL[sweep.metric] || sweep.metric}`,
                 sweep.metric === "best_pck" ? null : "Best PCK@0.2", memorisedColumn(sweep) ? "Memorised at" : null,
                 "Run"].filter((head) => head != null);
  $("#members thead tr").replaceChildren(...heads.map((head) => h("th", {}, head)));
  $("#members tbody").replaceChildren(...sweep.members.map((member) => memberRow(sweep, member)));
  $("#ranking-note").textContent = `by ${sweep.metric.replaceAll("_", " ")}, ${sweep.better} is better; members `
    + "without a value yet last";
}

async function render(sweep) {
  state.sweep = sweep;
  document.title = `${sweepTitle(sweep)} · ${sweep.status} · CAPE training`;
  document.body.dataset.status = sweep.status;
  $("#title").textContent = sweepTitle(sweep);
  $("#status").replaceChildren(statusBadge(sweep.status));
  $("#counts").textContent = countsLabel(sweep.counts);
  $("#cancel").hidden = sweep.status === "finished";
  $("#compare").href = `/compare?ids=${state.order.join(",")}`;
  $("#clone").href = `/new?sweep=${sweep.id}`;
  renderTable(sweep);
  $("#summary").replaceChildren(
    ...term("Sweep", h("span", {class: "mono"}, sweep.id)),
    ...term("Mode", sweep.mode),
    ...term("Dataset", `${sweep.dataset}, split ${sweep.split}`),
    ...term("Category", await categoryLabel(sweep)),
    ...term("Grid", h("span", {class: "mono", id: "grid"}, gridLabel(sweep.grid))),
    ...term("Jobs", String(sweep.members.length)),
    ...term("Tags", tagLinks(sweep.tags)),
    ...term("Created", when(sweep.created_at)),
    ...term("Settings", h("details", {}, h("summary", {}, "shared by every job"),
      h("pre", {class: "config"}, JSON.stringify(sweep.config, null, 2)))),
  );
}

armedButton($("#cancel"), async () => {
  try {
    await render(await postJSON(`/sweeps/${sweepId}/cancel`, undefined));
  } catch (error) {
    showError($("#message"), error);
  }
});

/** Every member ended and every curve has its last epoch: nothing more will change. */
function settled() {
  return state.sweep.status === "finished" && !(state.overlay?.open().length);
}

async function refresh() {
  await render(await getJSON(`/sweeps/${sweepId}`));
  await state.overlay?.grow();
  if (settled()) {
    state.stop();
    document.body.dataset.live = "ended";
  }
}

// --- start -------------------------------------------------------------------------------------------------------

let first;
try {
  first = await getJSON(`/sweeps/${encodeURIComponent(sweepId)}`);
} catch (error) {
  const missing = error instanceof ApiError && error.status === 404;
  showError($("#message"), missing ? new Error(`Sweep ${sweepId} not found.`) : error);
  document.body.dataset.status = "missing";
  throw error;
}
state.order = gridOrder(first);
await render(first);
if (available()) {
  const label = new Map(first.members.map((member) => [member.job.id, valuesLabel(member.values)]));
  state.overlay = new RunsOverlay({loss: $("#loss-chart"), pck: $("#pck-chart")},
                                  state.order.map((id) => ({id, label: label.get(id)})),
                                  {singleImage: first.mode === "single_image"});
  await state.overlay.draw();
} else {
  $("#loss-chart").textContent = "The charting library did not load.";
}
document.body.dataset.ready = "true";
state.stop = whenVisible(refresh, 3000);
if (settled()) {
  state.stop();
  document.body.dataset.live = "ended";
} else {
  document.body.dataset.live = "polling";
}
