// /sweep: the caller's sweeps (GET /sweeps), newest first, live: each with its grid, ranking metric, members by status and best
// member so far; each links to its page.

import {getJSON} from "/static/api.js";
import {$, categoryLabel, countsLabel, gridLabel, h, header, metricValue, shortId, showError, statusBadge,
        sweepTitle, valuesLabel, when, whenVisible} from "/static/ui.js";

const PAGE = 50;

// What the list shows: all of it here.
const state = {
  offset: Number(new URLSearchParams(location.search).get("offset")) || 0,
  rendered: "", // the last list drawn, as JSON: an unchanged one is not redrawn
};

header("sweeps");
$("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); navigate(); });
$("#next").addEventListener("click", () => { state.offset += PAGE; navigate(); });

function navigate() {
  history.replaceState(null, "", state.offset ? `/sweep?offset=${state.offset}` : "/sweep");
  load();
}

/** The best member so far: its values, its metric, a link to its run. */
function bestCell(sweep) {
  const best = sweep.members.find((member) => member.job.id === sweep.best);
  if (!best) return h("td", {class: "best muted"}, "–");
  return h("td", {class: "best"},
    h("a", {href: `/runs/${best.job.id}`, class: "mono small"}, valuesLabel(best.values) || shortId(best.job.id)),
    h("div", {class: "muted small"}, metricValue(sweep.metric, best.metric)));
}

function row(sweep) {
  const mode = h("td", {}, sweep.mode);
  if (sweep.category_id != null) {
    categoryLabel(sweep).then((label) => mode.append(h("div", {class: "muted small"}, label)));
  }
  return h("tr", {dataset: {sweepId: sweep.id, status: sweep.status}},
    h("td", {}, h("a", {class: "sweep-link", href: `/sweep/${sweep.id}`}, sweepTitle(sweep)),
      sweep.name ? h("div", {class: "muted small mono"}, shortId(sweep.id)) : null),
    h("td", {class: "status"}, statusBadge(sweep.status),
      h("div", {class: "muted small counts"}, countsLabel(sweep.counts))),
    mode,
    h("td", {class: "mono small grid-values"}, gridLabel(sweep.grid)),
    h("td", {}, sweep.metric.replaceAll("_", " "), h("div", {class: "muted small"}, `${sweep.better} is better`)),
    bestCell(sweep),
    h("td", {class: "nowrap"}, when(sweep.created_at)),
  );
}

async function load() {
  try {
    const list = await getJSON(`/sweeps?limit=${PAGE}&offset=${state.offset}`);
    $("#message").replaceChildren();
    const text = JSON.stringify(list);
    if (text === state.rendered) return;
    state.rendered = text;
    const body = $("#sweeps tbody");
    body.replaceChildren(...list.items.map(row));
    if (!list.items.length) {
      body.append(h("tr", {}, h("td", {colspan: 7, class: "muted empty"}, "No sweeps yet: on the ",
        h("a", {href: "/new"}, "new-job form"), ", give a field several values separated by commas.")));
    }
    const last = Math.min(list.total, list.offset + list.items.length);
    $("#count").textContent = list.total ? `${list.offset + 1}–${last} of ${list.total}` : "";
    $("#prev").disabled = state.offset === 0;
    $("#next").disabled = last >= list.total;
    document.body.dataset.loaded = "true";
  } catch (error) {
    showError($("#message"), error);
  }
}

await load();
whenVisible(load, 3000); // live: members finish, the best one changes
