// The run page's "Try it" panel: a support image whose keypoints (and skeleton) the user places by clicking, a query
// image, and POST /jobs/{id}/predict with one of the job's checkpoints; the answer is drawn on the query client-side
// from the JSON, with a table of the numbers. Each image is a file from the user's disk or an instance of the
// dataset (its labelled keypoints, skeleton and box filled in). Every check is the API's: a 422 names the field.
// A dataset support's keypoints keep the dataset's numbers (and so their colours: the new-job form's preview shows
// the same), on the support, the prediction and in its table; keypoints placed by hand are numbered on from there.

import {ApiError, getBlob, getJSON, postForm} from "/static/api.js";
import {colour, drawKeypoints} from "/static/keypoints.js";
import {categoryNames, h, num, pct} from "/static/ui.js";

const MAX_HEIGHT = 420; // CSS px: a canvas is scaled to fit its pane's width and this height
const HIT = 12; // CSS px: how near a click must be to a keypoint to pick it in edges mode
const TYPES = "image/jpeg,image/png,image/webp";
const FIELDS = {
  support_image: "Support image", support_keypoints: "Support keypoints", skeleton: "Edges (skeleton)",
  support_bbox: "Support box", query_image: "Query image", query_bbox: "Query box", checkpoint: "Checkpoint",
};

const round1 = (value) => Math.round(value * 10) / 10;

/** An image to predict with: what is sent (the file as it is) and what is drawn (its decoded bitmap). */
class Picture {
  static async of(blob, name, origin, instance = null) {
    let bitmap;
    try {
      // EXIF orientation applied, as the API reads the image too: a click on a photo maps to the API's pixels.
      bitmap = await createImageBitmap(blob, {imageOrientation: "from-image"});
    } catch {
      throw new Error(`${name}: not an image this browser can show (JPEG, PNG or WebP)`);
    }
    return Object.assign(new Picture(), {blob, name, origin, instance, bitmap, width: bitmap.width, height: bitmap.height});
  }
}

/** Draws a picture scaled to fit the canvas's stage, with keypoints (numbered by labels), edges and a box in image
 * pixels. */
function drawScene(canvas, picture, {points = [], labels = null, edges = [], box = null, selected = null, confidence = null} = {}) {
  const stage = canvas.parentElement;
  const scale = Math.min((stage.clientWidth || 400) / picture.width, MAX_HEIGHT / picture.height);
  const width = Math.max(1, Math.round(picture.width * scale)), height = Math.max(1, Math.round(picture.height * scale));
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0); // CSS pixels from here on
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(picture.bitmap, 0, 0, width, height);
  const at = ([x, y]) => [x * scale, y * scale];

  if (box) {
    ctx.save();
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 1.5;
    ctx.strokeStyle = "rgba(255, 215, 0, 0.95)";
    ctx.strokeRect(box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale);
    ctx.restore();
  }
  drawKeypoints(ctx, points, {at, labels, edges, selected, confidence});
  return scale;
}

/** Where a click fell, in the picture's pixels (the canvas shows the whole picture, scaled). */
function imagePoint(event, canvas, picture) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * picture.width;
  const y = ((event.clientY - rect.top) / rect.height) * picture.height;
  return [round1(Math.max(0, Math.min(picture.width, x))), round1(Math.max(0, Math.min(picture.height, y)))];
}

/** One image of the panel (support or query): a file, or an instance of the job's dataset, drawn on a canvas. */
class ImagePane {
  constructor(role, title, job, {onPicture}) {
    this.role = role;
    this.job = job;
    this.onPicture = onPicture;
    this.picture = null;
    this.seq = 0;
    const id = (name) => `${role}-${name}`;
    this.file = h("input", {type: "file", id: id("file"), accept: TYPES});
    this.subset = h("select", {id: id("subset"), "aria-label": `${role}: subset`},
      ["train", "val", "test"].map((s) => h("option", {value: s}, s)));
    this.category = h("select", {id: id("category"), class: "category", "aria-label": `${role}: category`});
    this.index = h("input", {type: "number", id: id("index"), min: "0", step: "1", value: "0", "aria-label": `${role}: instance index`});
    this.range = h("span", {class: "muted small"});
    this.load = h("button", {type: "button", id: id("load")}, "Load");
    this.useBox = h("input", {type: "checkbox", id: id("use-box"), checked: true});
    this.boxOption = h("label", {class: "small box-option", hidden: true}, this.useBox, " crop to the instance's box (dashed)");
    this.canvas = h("canvas", {id: id("canvas"), class: "scene", "aria-label": `${role} image`});
    this.placeholder = h("p", {class: "placeholder muted"}, `No ${role} image yet: upload one or load one from the dataset.`);
    this.caption = h("p", {class: "muted small caption", id: id("caption")});
    this.error = h("p", {class: "error small", id: id("error")});
    this.tools = h("div", {class: "tools"});
    this.canvas.hidden = true;
    this.element = h("div", {class: "pane", id: id("pane")},
      h("h3", {}, title),
      h("div", {class: "source"},
        h("label", {class: "file"}, "Upload ", this.file),
        h("div", {class: "from-dataset"}, h("span", {class: "muted"}, "or from the dataset"),
          this.subset, this.category, h("label", {class: "index"}, "# ", this.index), this.range, this.load),
        this.boxOption,
      ),
      this.tools,
      h("div", {class: "stage"}, this.canvas, this.placeholder),
      this.caption,
      this.error,
    );

    this.file.addEventListener("change", () => this.fromFile());
    this.subset.addEventListener("change", () => this.fillCategories());
    this.category.addEventListener("change", () => this.showRange());
    this.load.addEventListener("click", () => this.fromDataset());
    this.index.addEventListener("keydown", (event) => { if (event.key === "Enter") this.fromDataset(); });
    this.useBox.addEventListener("change", () => this.onPicture(this.picture, {boxOnly: true}));
  }

  get box() {
    return this.picture?.instance && this.useBox.checked ? this.picture.instance.bbox : null;
  }

  /** The category choices: the job's category and subset first when it has one (a full job: the unseen ones). */
  async init(defaultIndex) {
    this.categories = await categoryNames(this.job.dataset, this.job.split);
    const own = this.categories.get(this.job.category_id);
    this.subset.value = own ? own.subset : "test";
    this.fillCategories(own ? own.id : null);
    this.index.value = String(defaultIndex ?? 0);
  }

  fillCategories(keep = null) {
    const subset = this.subset.value;
    const shown = [...this.categories.values()].filter((c) => c.subset === subset && c.instances[subset] > 0);
    this.category.replaceChildren(...shown.map((c) => h("option", {value: c.id},
      `${c.id} · ${c.name} (K=${c.num_keypoints})`)));
    if (keep != null && shown.some((c) => c.id === keep)) this.category.value = String(keep);
    this.showRange();
  }

  showRange() {
    const category = this.categories?.get(Number(this.category.value));
    const count = category ? category.instances[this.subset.value] : 0;
    this.range.textContent = count ? `of 0..${count - 1}` : "";
    if (count) this.index.max = String(count - 1);
  }

  async fromFile() {
    const file = this.file.files[0];
    if (!file) return;
    await this.take(() => Picture.of(file, file.name, `file ${file.name}`));
  }

  async fromDataset() {
    const cid = this.category.value;
    if (!cid) {
      this.error.textContent = `No ${this.subset.value} category to pick from.`;
      return;
    }
    const query = new URLSearchParams({dataset: this.job.dataset, split: this.job.split, subset: this.subset.value});
    const base = `/categories/${encodeURIComponent(cid)}/instances/${encodeURIComponent(this.index.value.trim() || "0")}`;
    this.load.disabled = true;
    try {
      await this.take(async () => {
        const instance = await getJSON(`${base}?${query}`);
        const blob = await getBlob(`${base}/image?${query}`);
        if (!blob) throw new Error(`the image file of ${instance.file_name} is missing`);
        const name = instance.file_name.split("/").pop();
        return Picture.of(blob, name, `dataset ${this.subset.value} ${cid}/${instance.index}`, instance);
      });
    } finally {
      this.load.disabled = false;
    }
  }

  async take(make) {
    const seq = ++this.seq;
    this.error.textContent = "";
    try {
      const picture = await make();
      if (seq !== this.seq) return;
      this.picture = picture;
      this.canvas.hidden = false;
      this.placeholder.hidden = true;
      this.canvas.dataset.image = picture.origin;
      this.boxOption.hidden = !picture.instance;
      const instance = picture.instance;
      if (instance) this.file.value = ""; // what is shown is no longer the chosen file
      this.caption.textContent = `${picture.name} · ${picture.width}×${picture.height} px`
        + (instance ? ` · category ${instance.category_id}, ${this.subset.value} #${instance.index} (annotation ${instance.annotation_id})` : "");
      this.onPicture(picture, {});
    } catch (error) {
      if (seq !== this.seq) return;
      this.error.textContent = error instanceof ApiError && error.status === 422
        ? Object.values(error.fieldErrors()).join("; ") : error.message;
    }
  }
}

export class TryIt {
  constructor(section, job) {
    this.section = section;
    this.job = job;
    this.points = []; // [x, y] in support-image pixels, in the order placed (the order they are sent in)
    this.labels = []; // the number each point is shown with: the dataset's, or the next one for a point placed by hand
    this.edges = []; // [a, b], indices into points, a < b
    this.selected = null; // edges mode: the first keypoint of an edge being made
    this.result = null;

    this.support = new ImagePane("support", "1 · Support", job, {onPicture: (picture, {boxOnly}) => {
      if (!boxOnly) this.setSupport(picture);
      this.changed({inputs: true});
    }});
    this.query = new ImagePane("query", "2 · Query", job, {onPicture: () => this.changed({inputs: true})});

    // The support's tools: place keypoints or join them with edges; undo the last keypoint; clear.
    this.tool = "points";
    const radio = (value, label) => h("label", {}, h("input", {type: "radio", name: "support-tool", value, id: `tool-${value}`,
      checked: value === this.tool, onchange: () => { this.tool = value; this.selected = null; this.changed(); }}), ` ${label}`);
    this.count = h("span", {class: "muted small", id: "support-count"});
    this.undo = h("button", {type: "button", id: "support-undo", onclick: () => this.undoLast()}, "Undo");
    this.clear = h("button", {type: "button", id: "support-clear", onclick: () => this.clearAll()}, "Clear");
    this.support.tools.append(h("span", {class: "segmented"}, radio("points", "Keypoints"), radio("edges", "Edges")),
      this.undo, this.clear, this.count);
    this.help = h("p", {class: "muted small help", id: "support-help"});
    this.support.tools.after(this.help);
    this.support.canvas.addEventListener("click", (event) => this.clicked(event));

    // Predict: the checkpoint, the button, what went wrong, and the answer.
    this.checkpoint = h("select", {id: "predict-checkpoint"});
    this.predictButton = h("button", {type: "button", class: "primary", id: "predict", onclick: () => this.predict()}, "Predict");
    this.hint = h("p", {class: "muted small", id: "predict-hint"});
    this.problem = h("div", {class: "error box", id: "predict-error", hidden: true, role: "alert"});
    this.answer = h("div", {id: "predict-result", hidden: true});
    const predictPane = h("div", {class: "pane predict", id: "predict-pane"},
      h("h3", {}, "3 · Predict"),
      h("div", {class: "predict-row"}, h("label", {}, "Checkpoint ", this.checkpoint), this.predictButton),
      this.hint, this.problem, this.answer,
    );

    section.replaceChildren(
      h("h2", {}, "Try it ", h("span", {class: "muted small"},
        "annotate a support image, and the model finds the same keypoints in a query image")),
      h("div", {class: "tryit-grid"}, this.support.element, this.query.element, predictPane),
    );
    this.checkpoint.addEventListener("change", () => this.changed({inputs: true}));
    new ResizeObserver(() => this.redraw()).observe(this.support.element);
    this.changed();
  }

  async init() {
    // The job's own image (single_image) is the natural first support; the query defaults to the same instance.
    const index = this.job.image?.index ?? 0;
    await Promise.all([this.support.init(index), this.query.init(index)]);
  }

  /** The job's checkpoints changed: the choices of the select, best first. */
  setCheckpoints(items) {
    const keep = this.checkpoint.value;
    this.checkpoint.replaceChildren(...items.map((item) => h("option", {value: item.name}, item.name)));
    if (items.some((item) => item.name === keep)) this.checkpoint.value = keep;
    this.changed({inputs: this.checkpoint.value !== keep});
  }

  setSupport(picture) {
    this.selected = null;
    const instance = picture.instance;
    this.points = [];
    this.labels = [];
    this.edges = [];
    if (!instance) return;
    // The labelled keypoints (v > 0), in their order, with their numbers; the skeleton's edges between them.
    const kept = new Map();
    instance.keypoints.forEach(([x, y, v], i) => {
      if (v > 0) {
        kept.set(i, this.points.length);
        this.points.push([x, y]);
        this.labels.push(i);
      }
    });
    this.edges = (instance.skeleton || []).filter(([a, b]) => kept.has(a) && kept.has(b))
      .map(([a, b]) => [kept.get(a), kept.get(b)]);
  }

  clicked(event) {
    const picture = this.support.picture;
    if (!picture) return;
    const point = imagePoint(event, this.support.canvas, picture);
    if (this.tool === "points") {
      this.points.push(point);
      this.labels.push(this.nextLabel());
      this.changed({inputs: true});
      return;
    } else {
      const hit = this.nearest(point);
      if (hit == null || hit === this.selected) {
        this.selected = null;
      } else if (this.selected == null) {
        this.selected = hit;
      } else {
        this.toggleEdge(this.selected, hit);
        this.selected = null;
        this.changed({inputs: true});
        return;
      }
    }
    this.changed();
  }

  nearest([x, y]) {
    const scale = this.support.canvas.getBoundingClientRect().width / this.support.picture.width; // CSS px per pixel
    let best = null, distance = HIT;
    this.points.forEach(([px, py], i) => {
      const d = Math.hypot(px - x, py - y) * scale;
      if (d <= distance) {
        best = i;
        distance = d;
      }
    });
    return best;
  }

  toggleEdge(a, b) {
    const [lo, hi] = a < b ? [a, b] : [b, a];
    const at = this.edges.findIndex(([p, q]) => p === lo && q === hi);
    if (at >= 0) this.edges.splice(at, 1);
    else this.edges.push([lo, hi]);
  }

  /** The number of the next keypoint placed by hand: one more than the highest so far. */
  nextLabel() {
    return this.labels.length ? Math.max(...this.labels) + 1 : 0;
  }

  undoLast() {
    if (!this.points.length) return;
    const last = this.points.length - 1;
    this.points.pop();
    this.labels.pop();
    this.edges = this.edges.filter((edge) => !edge.includes(last));
    this.selected = null;
    this.changed({inputs: true});
  }

  clearAll() {
    this.points = [];
    this.labels = [];
    this.edges = [];
    this.selected = null;
    this.changed({inputs: true});
  }

  /** Redraws and updates the controls; inputs: what a request sends changed, so the last answer is out of date. */
  changed({inputs = false} = {}) {
    const canvas = this.support.canvas;
    canvas.dataset.points = String(this.points.length);
    canvas.dataset.edges = String(this.edges.length);
    canvas.dataset.keypoints = JSON.stringify(this.points);
    canvas.classList.toggle("edges-mode", this.tool === "edges");
    this.count.textContent = `${this.points.length} keypoint${this.points.length === 1 ? "" : "s"} · `
      + `${this.edges.length} edge${this.edges.length === 1 ? "" : "s"}`;
    this.undo.disabled = !this.points.length;
    this.clear.disabled = !this.points.length;
    this.help.textContent = !this.support.picture ? ""
      : this.tool === "points" ? `Click on the image to place keypoint ${this.nextLabel()}.`
      : this.selected == null ? "Click a keypoint, then another, to join them (again to remove the edge)."
      : `Keypoint ${this.labels[this.selected]} picked: click the keypoint to join it to.`;
    const ready = this.support.picture && this.query.picture && this.checkpoint.value;
    this.predictButton.disabled = !ready || this.busy;
    this.hint.textContent = ready ? "" : !this.checkpoint.value ? "No checkpoint yet."
      : "Choose a support and a query image first.";
    if (inputs && this.result) {
      this.answer.classList.add("stale");
      this.answer.dataset.stale = "true";
    }
    if (inputs && !this.busy) this.showProblem(null); // it was about the request before this change
    this.redraw();
  }

  redraw() {
    const support = this.support.picture;
    if (support) {
      drawScene(this.support.canvas, support, {points: this.points, labels: this.labels, edges: this.edges,
                                               box: this.support.box, selected: this.selected});
    }
    const query = this.query.picture;
    if (query) {
      const shown = this.result && this.result.picture === query ? this.result.answer : null;
      drawScene(this.query.canvas, query, shown
        ? {points: shown.keypoints, labels: this.result.labels, edges: shown.skeleton, confidence: shown.confidence,
           box: this.result.queryBox}
        : {box: this.query.box});
      if (shown) this.query.canvas.dataset.drawn = String(shown.keypoints.length);
      else delete this.query.canvas.dataset.drawn;
    }
  }

  form() {
    const form = new FormData();
    const support = this.support.picture, query = this.query.picture;
    form.append("support_image", support.blob, support.name);
    form.append("support_keypoints", JSON.stringify(this.points));
    if (this.edges.length) form.append("skeleton", JSON.stringify(this.edges));
    if (this.support.box) form.append("support_bbox", JSON.stringify(this.support.box));
    form.append("query_image", query.blob, query.name);
    if (this.query.box) form.append("query_bbox", JSON.stringify(this.query.box));
    form.append("checkpoint", this.checkpoint.value);
    return form;
  }

  async predict() {
    this.busy = true;
    this.predictButton.disabled = true;
    this.predictButton.textContent = "Predicting…";
    this.showProblem(null);
    const picture = this.query.picture;
    const queryBox = this.query.box;
    const labels = [...this.labels]; // the answer's keypoint i is the support's i: shown with its number
    const form = this.form();
    const started = performance.now();
    try {
      const answer = await postForm(`/jobs/${this.job.id}/predict`, form);
      this.result = {answer, picture, queryBox, labels, form, roundTrip: performance.now() - started};
      this.showAnswer();
    } catch (error) {
      this.showProblem(error);
    } finally {
      this.busy = false;
      this.predictButton.textContent = "Predict";
      this.changed();
    }
  }

  showAnswer() {
    const {answer, labels, roundTrip} = this.result;
    const checkpoint = answer.checkpoint || {};
    const timing = answer.timing || {};
    const rows = answer.keypoints.map(([x, y], i) => h("tr", {dataset: {x, y, confidence: answer.confidence[i]}},
      h("td", {}, h("span", {class: "swatch", style: `background: ${colour(labels[i] ?? i)}`}), ` ${labels[i] ?? i}`),
      h("td", {class: "num"}, x.toFixed(1)),
      h("td", {class: "num"}, y.toFixed(1)),
      h("td", {class: "num"}, answer.confidence[i].toFixed(3)),
    ));
    this.answer.dataset.k = String(answer.k);
    this.answer.classList.remove("stale");
    delete this.answer.dataset.stale;
    this.answer.replaceChildren(
      h("p", {id: "predict-checkpoint-used"}, h("strong", {}, `${checkpoint.name} checkpoint`),
        `, epoch ${checkpoint.epoch}`, checkpoint.val_pck == null ? "" : `, validation PCK@0.2 ${pct(checkpoint.val_pck)}`),
      h("p", {class: "small muted", id: "predict-timing"},
        `${answer.k} keypoints, answered in ${num(timing.total_ms, 3)} ms: inference ${num(timing.inference_ms, 3)} ms, `
        + `${timing.cached ? "the model was loaded already" : `loading the model ${num(timing.load_ms, 3)} ms`} `
        + `(${Math.round(roundTrip)} ms seen from here, with the uploads)`),
      h("p", {class: "small muted stale-note"}, "The inputs changed since: predict again to update."),
      h("table", {class: "test compact", id: "predict-table"},
        h("thead", {}, h("tr", {}, ["Keypoint", "x", "y", "Confidence"].map((t, i) => h("th", {class: i ? "num" : null}, t)))),
        h("tbody", {}, rows)),
      h("p", {class: "small"}, h("button", {type: "button", class: "link", id: "predict-png", onclick: () => this.serverPicture()},
        "the server's drawing (PNG)"), h("span", {class: "muted", id: "predict-png-state"})),
    );
    this.answer.hidden = false;
  }

  /** The same request with Accept: image/png: the query as the API draws it, opened in a new tab. */
  async serverPicture() {
    const state = this.answer.querySelector("#predict-png-state");
    state.textContent = " …";
    const opened = window.open("", "_blank"); // opened on the click, or a pop-up blocker would stop it
    try {
      const blob = await postForm(`/jobs/${this.job.id}/predict`, this.result.form, {accept: "image/png"});
      const url = URL.createObjectURL(blob);
      if (opened) opened.location = url;
      state.textContent = "";
    } catch (error) {
      opened?.close();
      state.textContent = ` ${error.message}`;
    }
  }

  /** What went wrong, in the API's words: a 422's field messages here and under the image they are about. */
  showProblem(error) {
    this.support.error.textContent = "";
    this.query.error.textContent = "";
    this.problem.hidden = !error;
    if (!error) {
      delete this.problem.dataset.status;
      this.problem.replaceChildren();
      return;
    }
    this.problem.dataset.status = String(error.status ?? "");
    if (error instanceof ApiError && error.status === 422) {
      // The API's messages mostly name their field already ("support_keypoints must be ..."); FastAPI's own do not.
      const fields = Object.entries(error.fieldErrors())
        .map(([field, message]) => [field, message.includes(field || "\0") ? message : `${FIELDS[field] || field || "request"}: ${message}`]);
      for (const [field, message] of fields) {
        const pane = field.startsWith("support") || field === "skeleton" ? this.support : field.startsWith("query") ? this.query : null;
        if (pane) pane.error.textContent = [pane.error.textContent, message].filter(Boolean).join("; ");
      }
      this.problem.replaceChildren(h("strong", {}, "The API refused the request:"),
        h("ul", {}, fields.map(([field, message]) => h("li", {dataset: {field}}, message))));
      return;
    }
    const headline = !(error instanceof ApiError) ? "The request failed:"
      : error.status === 409 ? "No such checkpoint yet:"
      : error.status === 504 ? "No predict worker answered in time" + (error.retryAfter ? ` (try again in ${error.retryAfter} s):` : ":")
      : error.status === 503 ? "The service cannot take predictions now:"
      : error.status === 413 ? "Too large:"
      : `The API answered ${error.status}:`;
    this.problem.replaceChildren(h("strong", {}, headline), " ", error.message);
  }
}
