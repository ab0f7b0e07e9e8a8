// /data: the datasets the caller can use (GET /datasets: the server's, read-only, then the caller's uploads), live
// while one is being imported and checked; and the upload form (POST /datasets, multipart), whose bytes are shown
// going out on a progress bar. A refusal's message appears next to the field it names; an accepted upload opens
// its page, which follows the import.

import {ApiError, getJSON} from "/static/api.js";
import {isPending, problemCounts, uploadDataset} from "/static/datasets.js";
import {$, bytes, h, header, showError, statusBadge, when, whenVisible} from "/static/ui.js";

const form = $("#upload-form");
const state = {rendered: "", pending: false};

header("data");

function row(dataset) {
  const summary = dataset.summary;
  return h("tr", {dataset: {name: dataset.name, status: dataset.status, kind: dataset.kind}},
    h("td", {}, h("a", {class: "dataset-link", href: `/data/${encodeURIComponent(dataset.name)}`}, dataset.name),
      dataset.archive ? h("div", {class: "muted small mono"}, dataset.archive.name) : null),
    h("td", {}, dataset.kind, dataset.read_only ? h("div", {class: "muted small"}, "read-only") : null),
    h("td", {class: "status"}, statusBadge(dataset.status),
      dataset.error ? h("div", {class: "error small"}, dataset.error) : null),
    h("td", {class: "num"}, summary ? summary.categories : "–"),
    h("td", {class: "num"}, summary ? summary.instances : "–"),
    h("td", {class: "problems"}, problemCounts(dataset.summary)),
    h("td", {class: "nowrap"}, when(dataset.created_at)),
    h("td", {class: "num"}, dataset.archive ? bytes(dataset.archive.bytes) : "–"),
  );
}

async function load() {
  try {
    const list = await getJSON("/datasets");
    $("#message").replaceChildren();
    state.pending = list.items.some((d) => isPending(d.status));
    const text = JSON.stringify(list.items);
    if (text !== state.rendered) {
      state.rendered = text;
      const body = $("#datasets tbody");
      body.replaceChildren(...list.items.map(row));
      if (!list.items.length) {
        body.append(h("tr", {}, h("td", {colspan: 8, class: "muted empty"}, "No datasets yet: upload one below.")));
      }
    }
    document.body.dataset.loaded = "true";
  } catch (error) {
    showError($("#message"), error);
  }
}

// --- the upload form ----------------------------------------------------------------------------------------------

function splitMethod() {
  return form.querySelector('input[name="split_method"]:checked').value;
}

function methodChanged() {
  $("#proportions-fields").hidden = splitMethod() !== "proportions";
  $("#category-split-field").hidden = splitMethod() !== "explicit";
}
form.querySelectorAll('input[name="split_method"]').forEach((radio) => radio.addEventListener("change", methodChanged));

// A name to start from: the archive's, as the API's names go (it may still refuse it, and says why).
$("#file").addEventListener("change", () => {
  const file = $("#file").files[0];
  if (!file || $("#name").value.trim()) return;
  const stem = file.name.replace(/\.(zip|tar\.gz|tgz)$/i, "");
  $("#name").value = stem.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 64);
});

function clearErrors() {
  form.querySelectorAll("[data-error-for]").forEach((slot) => { slot.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
}

function setError(name, message) {
  const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`) || $("#form-error");
  slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
  slot.closest("[data-field]")?.classList.add("invalid");
}

/** A refusal's messages where they belong: a 422 by the fields it names; a string detail by what its status is about
 * (413: the file is too large, 409: the name is taken); anything else under the form. */
function showRefusal(error) {
  if (error instanceof ApiError && Array.isArray(error.detail)) {
    for (const [field, message] of Object.entries(error.fieldErrors())) setError(field, message);
    return;
  }
  const field = error instanceof ApiError ? {413: "file", 409: "name"}[error.status] : null;
  setError(field || "", error.message);
}

function body() {
  const data = new FormData();
  const file = $("#file").files[0];
  if (file) data.append("file", file, file.name);
  data.append("name", $("#name").value.trim());
  data.append("num_splits", $("#num_splits").value);
  if (splitMethod() === "proportions") {
    data.append("proportions", $("#proportions").value.trim());
    data.append("seed", $("#seed").value.trim() || "0");
  } else if (splitMethod() === "explicit") {
    data.append("category_split", $("#category_split").value.trim());
  }
  data.append("zero_based_skeleton", String($("#zero_based_skeleton").checked));
  data.append("skip_invalid", String($("#skip_invalid").checked));
  return data;
}

/** The upload's progress: bytes sent of the whole request; the highest percentage seen is kept on the element. */
function showProgress(sent, total) {
  const fraction = total ? Math.min(1, sent / total) : 0;
  const percent = Math.round(100 * fraction);
  const box = $("#upload-progress");
  box.hidden = false;
  box.querySelector(".bar").style.width = `${(100 * fraction).toFixed(1)}%`;
  box.querySelector("span").textContent = `${percent} %`;
  box.dataset.percent = String(Math.max(percent, Number(box.dataset.percent || 0)));
  $("#upload-bytes").textContent = `${bytes(sent)} of ${bytes(total)} sent`;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  if (!$("#file").files[0]) {
    setError("file", "choose a .zip or .tar.gz archive to upload");
    return;
  }
  const button = $("#upload");
  button.disabled = true;
  delete $("#upload-progress").dataset.percent;
  showProgress(0, $("#file").files[0].size);
  try {
    const dataset = await uploadDataset(body(), showProgress);
    location.href = `/data/${encodeURIComponent(dataset.name)}`;
  } catch (error) {
    showRefusal(error);
    button.disabled = false;
  }
});

methodChanged();
await load();
whenVisible(() => (state.pending ? load() : null), 1500); // live while an upload is imported and checked
