// The run page's checkpoints card: each checkpoint the job saved (GET /jobs/{id}/checkpoints), downloaded with the
// key header into a blob (so the key never goes into a URL) and saved under the name the server gives; and, once the
// job succeeded, "Evaluate on unseen categories": a new evaluate job (POST /jobs) whose page opens next. Its choices,
// bounds, defaults and help text are the evaluate body's in the API's schema, as the new-job form's are.

import {ApiError, download, postJSON} from "/static/api.js";
import {jobBody} from "/static/schema.js";
import {bytes, h, when} from "/static/ui.js";

export class CheckpointsCard {
  constructor(section, job) {
    this.section = section;
    this.job = job;
    this.files = new Map(); // name -> {etag, url, name, bytes}: what was downloaded, while the file is unchanged
    this.list = h("ul", {class: "checkpoint-list", id: "checkpoint-list"});

    this.shots = h("select", {id: "eval-shots"});
    this.checkpoint = h("select", {id: "eval-checkpoint"});
    this.episodes = h("input", {id: "eval-episodes", type: "number", step: "1", inputmode: "numeric"});
    this.schema = null; // the evaluate body's fields, once init() read them
    this.submit = h("button", {type: "submit", class: "primary", id: "evaluate"}, "Evaluate");
    this.formError = h("p", {class: "error", id: "evaluate-error", dataset: {errorFor: ""}});
    const field = (name, label, input) => h("label", {class: "field", dataset: {field: name}}, label, input,
      h("small", {class: "error", dataset: {errorFor: name}}));
    this.form = h("form", {id: "evaluate-form", class: "evaluate", novalidate: true, hidden: true},
      h("h3", {}, "Evaluate on unseen categories ", h("span", {class: "muted small"},
        `the MP-100 protocol on the test categories of split ${job.split}, as a new job`)),
      h("div", {class: "inline-fields"},
        field("shots", "Shots", this.shots),
        field("checkpoint", "Checkpoint", this.checkpoint),
        field("episodes_per_category", "Episodes per category", this.episodes),
        this.submit),
      this.formError,
    );
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.evaluate();
    });
    section.replaceChildren(h("h2", {}, "Checkpoints"), this.list, this.form);
  }

  /** The evaluate form's choices, bounds, defaults and help from the API's schema (the POST /jobs body whose mode is
   * "evaluate"). Without them the form says why, and has nothing to submit. */
  async init() {
    try {
      const fields = await jobBody("evaluate");
      const {shots, checkpoint, episodes_per_category: episodes} = fields;
      if (!shots || !checkpoint || !episodes) throw new Error("the API's evaluate body has no shots, checkpoint or episodes_per_category");
      const counts = shots.choices ?? range(shots.min ?? 1, shots.max ?? shots.min ?? 1);
      this.shots.replaceChildren(...counts.map((n) => h("option", {value: n}, `${n}-shot`)));
      if (shots.default != null) this.shots.value = String(shots.default);
      this.episodes.min = episodes.min ?? "";
      this.episodes.max = episodes.max ?? "";
      this.episodes.value = episodes.default ?? "";
      for (const [input, prop] of [[this.shots, shots], [this.checkpoint, checkpoint], [this.episodes, episodes]]) {
        input.title = prop.description;
      }
      this.schema = fields;
    } catch (error) {
      this.formError.textContent = `Evaluation is not available here: ${error.message}`;
      this.submit.disabled = true;
      return;
    }
    if (this.items) this.update(this.items, this.job);
  }

  update(items, job) {
    this.job = job;
    this.items = items;
    this.section.hidden = !items.length;
    const seen = JSON.stringify(items);
    if (seen !== this.seen) { // redrawn only when a file changed: a download in flight keeps its row
      this.seen = seen;
      this.list.replaceChildren(...items.map((item) => this.row(item)));
    }
    // The job's checkpoints that the API evaluates; the schema's default first chosen, then the user's choice kept.
    const keep = this.checkpoint.value || this.schema?.checkpoint.default;
    const offered = items.filter((item) => this.schema?.checkpoint.choices?.includes(item.name) ?? true);
    this.checkpoint.replaceChildren(...offered.map((item) => h("option", {value: item.name}, item.name)));
    if (offered.some((item) => item.name === keep)) this.checkpoint.value = keep;
    this.form.hidden = job.status !== "succeeded";
  }

  row(item) {
    let file = this.files.get(item.name);
    if (file && file.etag !== item.etag) { // saved again since (a new best): the blob is out of date
      URL.revokeObjectURL(file.url);
      this.files.delete(item.name);
      file = null;
    }
    const link = h("a", {id: `download-${item.name}-link`, class: "small", hidden: !file});
    const error = h("span", {class: "error small", id: `download-${item.name}-error`});
    const show = (f) => {
      Object.assign(link, {href: f.url, download: f.name, textContent: `${f.name} (${bytes(f.bytes)})`});
      link.dataset.bytes = String(f.bytes);
      link.hidden = false;
    };
    if (file) show(file);
    const button = h("button", {type: "button", id: `download-${item.name}`}, "Download");
    button.addEventListener("click", async () => {
      button.disabled = true;
      button.textContent = "Downloading…";
      error.textContent = "";
      try {
        const got = await download(`/jobs/${this.job.id}/checkpoints/${item.name}`);
        const old = this.files.get(item.name);
        if (old) URL.revokeObjectURL(old.url);
        const saved = {...got, etag: item.etag};
        this.files.set(item.name, saved);
        show(saved);
        link.click(); // the browser saves it; the link stays, to save it again
      } catch (problem) {
        error.textContent = problem.message;
      } finally {
        button.disabled = false;
        button.textContent = "Download";
      }
    });
    return h("li", {dataset: {name: item.name, bytes: item.bytes}},
      h("strong", {}, item.name), " ",
      h("span", {class: "muted"}, `${bytes(item.bytes)} · saved ${when(item.modified_at)}`), " ",
      button, " ", link, " ", error);
  }

  async evaluate() {
    for (const slot of this.form.querySelectorAll("[data-error-for]")) slot.textContent = "";
    this.submit.disabled = true; // one click, one job
    const episodes = this.episodes.value.trim();
    const body = {mode: "evaluate", from_job: this.job.id, shots: Number(this.shots.value), checkpoint: this.checkpoint.value,
                  episodes_per_category: episodes === "" || !Number.isFinite(Number(episodes)) ? episodes : Number(episodes)};
    try {
      const created = await postJSON("/jobs", body);
      location.href = `/runs/${created.id}`;
    } catch (error) {
      this.submit.disabled = false;
      const messages = error instanceof ApiError && error.status === 422 ? error.fieldErrors() : {"": error.message};
      for (const [name, message] of Object.entries(messages)) {
        const slot = this.form.querySelector(`[data-error-for="${CSS.escape(name)}"]`) || this.formError;
        slot.textContent = [slot.textContent, message].filter(Boolean).join("; ");
      }
    }
  }
}

function range(first, last) {
  return Array.from({length: Math.max(0, last - first + 1)}, (_, i) => first + i);
}
