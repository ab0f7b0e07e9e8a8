// GET / : the jobs, newest first, with live updates; filter by status and tag; pick jobs to compare.

import {getJSON} from "/static/api.js";
import {$, categoryLabel, h, header, jobTitle, pct, progressBar, shortId, showError, statusBadge, verdictBadge, when,
        whenVisible} from "/static/ui.js";

const PAGE = 50;
const params = new URLSearchParams(location.search);

// What the list shows and what the user picked: all of it here.
const state = {
  filters: {status: params.get("status") || "", tag: params.get("tag") || "", offset: Number(params.get("offset")) || 0},
  selected: new Set(), // job ids ticked for "Compare selected"; kept as the list refreshes
  rendered: "", // the last list drawn, as JSON: an unchanged one is not redrawn
};

header("jobs");
$("#filter-status").value = state.filters.status;
$("#filter-tag").value = state.filters.tag;

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  state.filters = {status: $("#filter-status").value, tag: $("#filter-tag").value.trim(), offset: 0};
  navigate();
});
$("#filter-status").addEventListener("change", () => $("#filters").requestSubmit());
$("#prev").addEventListener("click", () => { state.filters.offset = Math.max(0, state.filters.offset - PAGE); navigate(); });
$("#next").addEventListener("click", () => { state.filters.offset += PAGE; navigate(); });
$("#compare-selected").addEventListener("click", () => {
  location.href = `/compare?ids=${[...state.selected].join(",")}`;
});

function navigate() {
  // The filters live in the URL: a filtered list is a link to share or bookmark.
  const {status, tag, offset} = state.filters;
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  if (tag) query.set("tag", tag);
  if (offset) query.set("offset", offset);
  history.replaceState(null, "", query.size ? `/?${query}` : "/");
  load();
}

function updateCompare() {
  const {selected, filters} = state;
  const button = $("#compare-selected");
  button.disabled = selected.size < 1;
  button.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
  const byTag = $("#compare-tag");
  byTag.hidden = !filters.tag;
  byTag.href = `/compare?tag=${encodeURIComponent(filters.tag)}`;
}

/** mPCK under a PCK, where the API gives it. */
function mpck(value) {
  return value == null ? null : h("div", {class: "muted small mpck"}, `mPCK ${pct(value)}`);
}

function row(job) {
  const {selected} = state;
  const box = h("input", {type: "checkbox", class: "select", value: job.id, checked: selected.has(job.id),
                          "aria-label": `select ${job.id}`});
  box.addEventListener("change", () => {
    if (box.checked) selected.add(job.id);
    else selected.delete(job.id);
    updateCompare();
  });
  const category = h("td", {class: "category"}, job.category_id ?? "all");
  categoryLabel(job).then((label) => category.replaceChildren(label));
  const tags = job.tags.map((tag) => h("a", {class: "tag", href: `/?tag=${encodeURIComponent(tag)}`}, tag));
  return h("tr", {dataset: {jobId: job.id, status: job.status}},
    h("td", {}, box),
    h("td", {}, h("a", {class: "job-link", href: `/runs/${job.id}`}, jobTitle(job)),
      job.name ? h("div", {class: "muted small mono"}, shortId(job.id)) : null),
    h("td", {class: "status"}, statusBadge(job.status), progressBar(job)),
    h("td", {}, job.mode),
    category,
    // an evaluation has no epochs: its one number is the PCK on the unseen categories
    job.mode === "evaluate"
      ? h("td", {class: "num latest-pck", title: "PCK@0.2 on the unseen test categories"}, h("span", {class: "muted small"}, "test "), pct(job.test_result?.pck))
      : h("td", {class: "num latest-pck"}, pct(job.latest_pck), mpck(job.latest_mpck)),
    h("td", {class: "num best-pck"}, pct(job.best_pck), mpck(job.best_mpck)),
    h("td", {class: "verdict"}, verdictBadge(job)),
    h("td", {class: "tags"}, tags),
    h("td", {class: "nowrap"}, when(job.created_at)),
  );
}

async function load() {
  const {status, tag, offset} = state.filters;
  const query = new URLSearchParams({limit: PAGE, offset});
  if (status) query.set("status", status);
  if (tag) query.set("tag", tag);
  try {
    const list = await getJSON(`/jobs?${query}`);
    $("#message").replaceChildren();
    const text = JSON.stringify(list);
    if (text === state.rendered) return; // nothing changed: the rows (and a click on them) stay as they are
    state.rendered = text;
    const body = $("#jobs tbody");
    body.replaceChildren(...list.items.map(row));
    if (!list.items.length) {
      body.append(h("tr", {}, h("td", {colspan: 10, class: "muted empty"},
        status || tag ? "No job matches these filters." : "No jobs yet: ", status || tag ? null : h("a", {href: "/new"}, "submit one"))));
    }
    const last = Math.min(list.total, list.offset + list.items.length);
    $("#count").textContent = list.total ? `${list.offset + 1}–${last} of ${list.total}` : "";
    $("#prev").disabled = offset === 0;
    $("#next").disabled = last >= list.total;
    document.body.dataset.loaded = "true";
  } catch (error) {
    showError($("#message"), error);
  }
  updateCompare();
}

await load();
whenVisible(load, 3000); // live: the list refreshes every 3 s while the tab is visible
