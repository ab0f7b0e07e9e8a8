// GET /new: the new-job form; /new?clone=<job id> fills it with a job's settings (&lr=<value> then sets the learning
// rate: a range test's suggestion), /new?sweep=<sweep id> with a sweep's; /new?dataset=<name> (&split, &mode,
// &category_id, &image_index) preselects a dataset and an instance (a dataset page's "Train on it"). The dataset
// select offers the server's datasets and the caller's ready uploads (GET /datasets). Every choice is checked by the
// API: a 422 answer's message appears next to the field it names.
//
// The fields a sweep's grid may vary (the learning rate, the seed, ...) take several values separated by commas: the
// form then submits a sweep (POST /sweeps), one job per combination. "Find a learning rate" starts a learning-rate
// range test (POST /jobs, mode lr_range_test) on the form's settings.

import {ApiError, blobURL, getJSON, postJSON} from "/static/api.js";
import {drawInstance} from "/static/instance.js";
import {jobBody, sweepBody} from "/static/schema.js";
import {$, h, header, jobTitle, sweepTitle} from "/static/ui.js";

// [field, label]; bounds, defaults and help text come from the API's own schema (the POST /jobs body in /openapi.json).
const HYPER = [
  ["epochs", "Epochs"], ["batch_size", "Batch size (episodes per step)"], ["num_shots", "Shots (support images)"],
  ["num_queries_per_episode", "Queries per episode"], ["episodes_per_epoch", "Episodes per epoch"],
  ["lr", "Learning rate"], ["weight_decay", "Weight decay"], ["warmup_epochs", "Warm-up epochs"],
  ["clip_max_norm", "Gradient clipping (max norm, 0: off)"], ["seed", "Seed"], ["preset", "Model preset"],
  ["augment", "Augmentation"], ["use_amp", "bf16 autocast (CUDA only)"],
];
const MORE = [
  ["val_episodes_per_category", "Validation episodes per category"],
  ["val_queries_per_episode", "Validation queries per episode"],
  ["test_episodes_per_category", "Test episodes per unseen category (full mode)"],
];
// The single-image guide: memorise one image with batch 1, one query, 20 episodes per epoch, 20 epochs.
const GUIDE = {epochs: 20, batch_size: 1, num_queries_per_episode: 1, episodes_per_epoch: 20};

const form = $("#job-form");

// What the page holds while the form is filled in.
const state = {
  props: {}, // the training job body's fields, by name, as the API's schema describes them
  fields: new Map(), // name -> {input, kind}: the training settings' inputs
  sweep: {grid: new Set(), metric: null}, // POST /sweeps: the fields a grid may vary, the ranking metric's property
  rangeTest: null, // the range-test job's body properties (POST /jobs, mode lr_range_test); null: the API has none
  categories: [], // the split's train categories with train images (GET /categories)
  datasets: new Map(), // name -> the datasets the select offers (GET /datasets)
  splitChoices: [1, 2, 3, 4, 5], // the split select's choices when the dataset does not say (the schema's)
  preview: {timer: null, seq: 0}, // the image index's preview: a short wait after typing, and the latest request
};

header("new");
{
  const [training, sweeps, rangeTest] = await Promise.allSettled(
    [jobBody("single_image"), sweepBody(), jobBody("lr_range_test")]);
  if (training.status === "fulfilled") state.props = training.value;
  else setError("", `${training.reason.message}: the form has no bounds or defaults, the API still checks every `
                    + "choice.");
  // An API without sweeps or range tests: the form offers neither (and says why in the console).
  if (sweeps.status === "fulfilled") state.sweep = {grid: new Set(sweeps.value.grid), metric: sweeps.value.metric};
  else console.warn(`no sweeps: ${sweeps.reason.message}`);
  if (rangeTest.status === "fulfilled") state.rangeTest = rangeTest.value;
  else console.warn(`no learning-rate range test: ${rangeTest.reason.message}`);
}

/** The fixed inputs' bounds from the schema too: the split's choices, the first image index, a name's length. */
function applyBounds() {
  const {split, image_index: index, name} = state.props;
  if (split) {
    const choices = split.choices ?? (split.min != null && split.max != null
      ? Array.from({length: split.max - split.min + 1}, (_, i) => split.min + i) : null);
    if (choices) {
      state.splitChoices = choices;
      $("#split").replaceChildren(...choices.map((n) => h("option", {value: n}, n)));
    }
    if (split.default != null) $("#split").value = String(split.default);
  }
  if (index?.min != null) $("#image_index").min = index.min;
  if (name?.maxLength != null) $("#name").maxLength = name.maxLength;
}
applyBounds();

function makeField([name, label], where) {
  const prop = state.props[name] || {kind: "float"};
  let input;
  const kind = prop.kind === "text" ? "float" : prop.kind;
  if (kind === "enum") {
    input = h("select", {id: name, name}, prop.choices.map((v) => h("option", {value: v}, v)));
    if (prop.default != null) input.value = prop.default;
  } else if (kind === "bool") {
    input = h("input", {id: name, name, type: "checkbox", checked: prop.default ?? true});
  } else if (state.sweep.grid.has(name)) {
    // several values, comma-separated, make a sweep: a text input (a number input takes one number)
    input = h("input", {id: name, name, type: "text", inputmode: "decimal", autocomplete: "off", class: "sweepable",
                        oninput: sweepChanged});
    if (prop.default != null) input.value = prop.default;
  } else {
    input = h("input", {id: name, name, type: "number", step: kind === "int" ? "1" : "any", inputmode: "decimal"});
    if (prop.default != null) input.value = prop.default;
    if (prop.min != null) input.min = prop.min;
    if (prop.max != null) input.max = prop.max;
  }
  const wrapper = h("label", {class: `field ${kind === "bool" ? "check" : ""}`, dataset: {field: name}, title: prop.description || ""},
    kind === "bool" ? [input, " ", label] : [label, input],
    prop.description ? h("small", {class: "help"}, prop.description) : null,
    h("small", {class: "error", dataset: {errorFor: name}}),
  );
  state.fields.set(name, {input, kind});
  where.append(wrapper);
}
HYPER.forEach((f) => makeField(f, $("#hyper")));
MORE.forEach((f) => makeField(f, $("#hyper-more")));

{
  const sweepable = HYPER.filter(([name]) => state.sweep.grid.has(name))
    .map(([, label]) => label.replace(/ \(.*\)$/, "").toLowerCase()); // "batch size", not "... (episodes per step)"
  $("#sweep-hint").hidden = !sweepable.length;
  $("#sweep-hint").textContent = `${sweepable.join(", ")}: several values separated by commas (e.g. 1e-4, 5e-4, 1e-3) `
    + "make a sweep, one job per combination.";
  const metric = state.sweep.metric;
  $("#metric").replaceChildren(h("option", {value: ""}, "the mode's default"),
    ...(metric?.choices || []).map((choice) => h("option", {value: choice}, choice.replaceAll("_", " "))));
  if (metric?.default != null) $("#metric").value = metric.default;
  $("#metric-help").textContent = metric?.description || "";
  if (state.rangeTest) {
    const unused = [...state.fields.keys()].filter((name) => name !== "lr" && !(name in state.rangeTest));
    $("#find-lr").hidden = $("#find-lr-help").hidden = false;
    $("#find-lr-help").textContent = "Find a learning rate: a range test on these settings raises the learning rate "
      + "step by step and suggests one, to train with."
      + (unused.length ? ` It does not use ${unused.join(", ")}.` : "");
  }
}

$("#guide-values").addEventListener("click", () => {
  $("#mode").value = "single_image";
  for (const [name, value] of Object.entries(GUIDE)) state.fields.get(name).input.value = value;
  modeChanged();
});

// --- mode, dataset, split and the category picker ----------------------------------------------------------------

function modeChanged() {
  const mode = $("#mode").value;
  $("#category-section").hidden = mode === "full";
  $("#image-section").hidden = mode !== "single_image";
  if (mode === "single_image") preview();
}
$("#mode").addEventListener("change", modeChanged);

/** The select's choices: the server's default, then the server's datasets (the API takes jobs on them whatever their
 * check says, which may still be running) and the caller's ready uploads. */
async function loadDatasets() {
  try {
    const list = await getJSON("/datasets");
    const ready = list.items.filter((d) => d.kind === "server" || d.status === "ready");
    state.datasets = new Map(ready.map((d) => [d.name, d]));
    $("#dataset").append(...ready.map((d) => h("option", {value: d.name}, `${d.name} (${d.kind})`)));
  } catch (error) {
    console.warn(`no dataset list: ${error.message}`); // the server's default still works
  }
}

/** Chooses a dataset, listed or not (a clone's may be gone: the API then says so). */
function setDataset(name) {
  const select = $("#dataset");
  if (name && ![...select.options].some((o) => o.value === name)) {
    select.append(h("option", {value: name}, `${name} (not listed)`));
  }
  select.value = name || "";
  datasetChanged();
}

/** The split select offers the chosen dataset's splits (an upload has 1 or 5). */
function datasetChanged() {
  const known = state.datasets.get($("#dataset").value)?.splits;
  const choices = known?.length ? known : state.splitChoices;
  const split = $("#split");
  const keep = split.value;
  split.replaceChildren(...choices.map((n) => h("option", {value: n}, n)));
  if (choices.some((n) => String(n) === keep)) split.value = keep;
}

function clearError(name) {
  const slot = form.querySelector(`[data-error-for="${name}"]`);
  if (slot) slot.textContent = "";
  form.querySelector(`[data-field="${name}"]`)?.classList.remove("invalid");
}

function setError(name, message) {
  const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`) || $("#form-error");
  if (slot.textContent.split("; ").includes(message)) return slot;
  slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
  slot.closest("[data-field]")?.classList.add("invalid");
  return slot;
}

async function loadCategories(selectId = null) {
  clearError("dataset");
  clearError("split");
  const query = new URLSearchParams({split: $("#split").value});
  if ($("#dataset").value) query.set("dataset", $("#dataset").value);
  const select = $("#category_id");
  const keep = selectId ?? (select.value ? Number(select.value) : null);
  try {
    const list = await getJSON(`/categories?${query}`);
    if (!$("#dataset").value) $("#dataset").options[0].textContent = `server default (${list.dataset})`;
    state.categories = list.items.filter((c) => c.subset === "train" && c.instances.train > 0);
  } catch (error) {
    state.categories = [];
    if (error instanceof ApiError && error.status === 422) {
      for (const [field, message] of Object.entries(error.fieldErrors())) setError(field || "dataset", message);
    } else {
      setError("category_id", error.message);
    }
  }
  renderCategories(keep);
}

function renderCategories(keep) {
  const select = $("#category_id");
  const filter = $("#category-filter").value.trim().toLowerCase();
  const shown = state.categories.filter((c) => !filter || String(c.id).startsWith(filter) || c.name.toLowerCase().includes(filter));
  select.replaceChildren(...shown.map((c) => h("option", {value: c.id, dataset: {k: c.num_keypoints, train: c.instances.train}},
    `${c.id} · ${c.name} · K=${c.num_keypoints} · ${c.instances.train} train images`)));
  if (keep != null && shown.some((c) => c.id === keep)) select.value = keep;
  else if (shown.length && !select.value) select.value = shown[0].id;
  categoryChanged();
}

function categoryChanged() {
  clearError("category_id");
  const category = state.categories.find((c) => c.id === Number($("#category_id").value));
  $("#image-range").textContent = category ? `(0..${category.instances.train - 1})` : "";
  if (category) $("#image_index").max = category.instances.train - 1;
  preview();
}

$("#category_id").addEventListener("change", categoryChanged);
$("#category-filter").addEventListener("input", () => renderCategories(Number($("#category_id").value) || null));
$("#split").addEventListener("change", () => loadCategories());
$("#dataset").addEventListener("change", () => {
  datasetChanged();
  loadCategories();
});

// --- the chosen instance's preview --------------------------------------------------------------------------------

$("#image_index").addEventListener("input", () => {
  $("#preview").classList.add("stale"); // what it shows is not the new index's (yet)
  clearTimeout(state.preview.timer);
  state.preview.timer = setTimeout(preview, 250);
});

async function preview() {
  const seq = ++state.preview.seq;
  const current = () => seq === state.preview.seq; // not overtaken by a later choice
  const canvas = $("#preview");
  const caption = $("#preview-caption");
  const cid = $("#category_id").value;
  const index = $("#image_index").value;
  if ($("#mode").value !== "single_image" || cid === "" || index === "") return;
  const query = new URLSearchParams({split: $("#split").value, subset: "train"});
  if ($("#dataset").value) query.set("dataset", $("#dataset").value);
  const base = `/categories/${cid}/instances/${encodeURIComponent(index)}`;
  try {
    const instance = await getJSON(`${base}?${query}`);
    const url = await blobURL(`${base}/image?${query}`);
    if (!current()) return;
    clearError("image_index");
    if (!url) throw new Error("the image file is missing");
    const image = new Image();
    image.src = url;
    await image.decode();
    if (!current()) return;
    drawInstance(canvas, image, instance);
    URL.revokeObjectURL(url);
    canvas.hidden = false;
    canvas.classList.remove("stale");
    canvas.dataset.instance = `${cid}/${index}`;
    caption.textContent = `${instance.file_name} · annotation ${instance.annotation_id} · ${instance.width}×${instance.height} px · `
      + `${instance.keypoints.filter((k) => k[2] > 0).length} of ${instance.keypoints.length} keypoints labelled (the model's crop)`;
  } catch (error) {
    if (!current()) return;
    canvas.hidden = true;
    delete canvas.dataset.instance;
    if (error instanceof ApiError && error.status === 422) {
      caption.textContent = "";
      clearError("image_index");
      for (const [field, message] of Object.entries(error.fieldErrors())) setError(field === "index" ? "image_index" : field || "image_index", message);
    } else {
      caption.textContent = `No preview: ${error.message}`;
    }
  }
}

// --- clone, submit ------------------------------------------------------------------------------------------------

function parsed(text) {
  const number = Number(text);
  return Number.isFinite(number) ? number : text; // the API words the error for a non-number
}

/** A field's values as typed: "1e-4, 5e-4" -> [0.0001, 0.0005]; one, or none, outside the grid fields. */
function values(name) {
  const {input} = state.fields.get(name);
  const texts = state.sweep.grid.has(name) ? input.value.split(",") : [input.value];
  return texts.map((text) => text.trim()).filter(Boolean).map(parsed);
}

/** A field's value in a job's body; undefined for none (the server's default) and for several (the sweep's grid). */
function value(name) {
  const {input, kind} = state.fields.get(name);
  if (kind === "bool") return input.checked;
  if (kind === "enum") return input.value;
  const typed = values(name);
  return typed.length === 1 ? typed[0] : undefined;
}

/** The fields given several values, with their values: a sweep's grid ({} for one job). */
function grid() {
  return Object.fromEntries([...state.sweep.grid].filter((name) => state.fields.has(name))
    .map((name) => [name, values(name)]).filter(([, typed]) => typed.length > 1));
}

/** The button says what a click submits: one job, or a sweep of how many. */
function sweepChanged() {
  const swept = Object.entries(grid());
  const size = swept.reduce((product, [, typed]) => product * typed.length, 1);
  $("#submit").textContent = swept.length ? `Submit sweep (${size} jobs)` : "Submit job";
  $("#sweep-section").hidden = !swept.length;
  $("#sweep-size").textContent = swept.map(([name, typed]) => `${typed.length} × ${name}`).join(" · ");
}

function body() {
  const mode = $("#mode").value;
  const out = {mode, split: Number($("#split").value)};
  const dataset = $("#dataset").value;
  if (dataset) out.dataset = dataset;
  if (mode !== "full") out.category_id = $("#category_id").value === "" ? null : Number($("#category_id").value);
  if (mode === "single_image") {
    const index = $("#image_index").value.trim();
    if (index !== "") out.image_index = Number(index);
  }
  for (const name of state.fields.keys()) {
    const v = value(name);
    if (v !== undefined) out[name] = v;
  }
  if ($("#name").value.trim()) out.name = $("#name").value.trim();
  const tags = $("#tags").value.split(/[\s,]+/).filter(Boolean);
  if (tags.length) out.tags = tags;
  return out;
}

function clearErrors() {
  form.querySelectorAll("[data-error-for]").forEach((slot) => { slot.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
}

/** An answer that refused the form: a 422's messages next to the fields they name, anything else under the form. */
function showRefusal(error) {
  if (!(error instanceof ApiError && error.status === 422)) {
    setError("", error.message);
    return;
  }
  let first = null;
  for (const [field, message] of Object.entries(error.fieldErrors())) {
    const slot = setError(field, message);
    first = first || slot;
  }
  first?.scrollIntoView({block: "center"});
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const submit = $("#submit");
  submit.disabled = true; // one click, one job (or one sweep)
  const swept = grid();
  try {
    if (Object.keys(swept).length) {
      const metric = $("#metric").value; // none: the mode's default
      const sweep = await postJSON("/sweeps", {...body(), grid: swept, ...(metric ? {metric} : {})});
      location.href = `/sweep/${sweep.id}`;
    } else {
      const job = await postJSON("/jobs", body());
      location.href = `/runs/${job.id}`;
    }
  } catch (error) {
    submit.disabled = false;
    showRefusal(error);
  }
});

// A learning-rate range test on the form's settings: the training job's body as the range test takes it (its mode is
// the run's, the learning rate is what it finds, and a field its body does not have is left out).
$("#find-lr").addEventListener("click", async () => {
  clearErrors();
  const several = Object.keys(grid()).filter((name) => name !== "lr");
  for (const name of several) {
    setError(name, "a range test runs one setting: give one value here (several make a sweep)");
  }
  if (several.length) return;
  const {mode, ...settings} = body();
  const test = {mode: "lr_range_test", run_mode: mode};
  for (const [name, v] of Object.entries(settings)) {
    if (name !== "lr" && name in state.rangeTest) test[name] = v;
  }
  const button = $("#find-lr");
  button.disabled = true;
  try {
    const job = await postJSON("/jobs", test);
    location.href = `/runs/${job.id}`;
  } catch (error) {
    button.disabled = false;
    showRefusal(error);
  }
});

/** The form filled with a job's or a sweep's settings: mode, dataset, split, the training fields (config), the image,
 * name and tags. */
function fill({mode, dataset, split, config, imageIndex, name, tags}) {
  $("#mode").value = mode;
  setDataset(dataset);
  $("#split").value = String(split);
  for (const [field, {input, kind}] of state.fields) {
    if (!(field in config)) continue;
    if (kind === "bool") input.checked = Boolean(config[field]);
    else input.value = config[field];
  }
  $("#image_index").value = imageIndex ?? 0;
  if (name) $("#name").value = name;
  $("#tags").value = tags.join(", ");
}

function cloneNote(...what) {
  const note = $("#clone-note");
  note.replaceChildren("Settings of ", ...what, ": change what you want to try, then submit.");
  note.hidden = false;
}

async function fillFromClone(id) {
  const job = await getJSON(`/jobs/${encodeURIComponent(id)}`);
  cloneNote(h("a", {href: `/runs/${job.id}`}, jobTitle(job)));
  // A range test's config is the training job it prepares: its mode is the run's (config.mode), not lr_range_test.
  fill({mode: job.config.mode ?? job.mode, dataset: job.dataset, split: job.split, config: job.config,
        imageIndex: job.image?.index ?? job.config.image_index, name: job.name, tags: job.tags});
  document.title = `Clone of ${jobTitle(job)} · CAPE training`;
  return job.category_id;
}

async function fillFromSweep(id) {
  const sweep = await getJSON(`/sweeps/${encodeURIComponent(id)}`);
  cloneNote("sweep ", h("a", {href: `/sweep/${sweep.id}`}, sweepTitle(sweep)));
  fill({mode: sweep.mode, dataset: sweep.dataset, split: sweep.split, config: sweep.config,
        imageIndex: sweep.config.image_index, name: sweep.name, tags: sweep.tags});
  for (const [name, swept] of Object.entries(sweep.grid)) {
    if (state.fields.has(name)) state.fields.get(name).input.value = swept.join(", ");
  }
  $("#metric").value = sweep.metric;
  document.title = `Clone of ${sweepTitle(sweep)} · CAPE training`;
  return sweep.category_id;
}

/** /new?dataset=..&split=..&mode=..&category_id=..&image_index=..: a dataset's instance to train on; returns the
 * category to choose once the split's categories are listed. */
function fillFromQuery() {
  if (params.has("dataset")) setDataset(params.get("dataset"));
  if (params.has("split")) $("#split").value = params.get("split");
  if (params.has("mode")) $("#mode").value = params.get("mode");
  if (params.has("image_index")) $("#image_index").value = params.get("image_index");
  return params.has("category_id") ? Number(params.get("category_id")) : null;
}

const params = new URLSearchParams(location.search);
await loadDatasets();
$("#mode").value = "single_image";
const [source, fillFrom] = params.has("sweep") ? ["sweep", fillFromSweep] : ["job", fillFromClone];
const sourceId = params.get(source === "sweep" ? "sweep" : "clone");
// a clone's category is chosen once the split's categories are listed
const cloneCategory = !sourceId ? null : await fillFrom(sourceId).catch((error) => {
  setError("", `Could not load ${source} ${sourceId} to clone: ${error.message}`);
  return null;
});
if (params.has("lr") && state.fields.has("lr")) state.fields.get("lr").input.value = params.get("lr");
const queryCategory = fillFromQuery();
sweepChanged();
modeChanged();
await loadCategories(queryCategory ?? cloneCategory);
document.body.dataset.ready = "true";
