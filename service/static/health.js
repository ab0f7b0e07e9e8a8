// The training-health instruments: what each epoch row's `health` (cape/health.py's EpochHealth) holds, read and
// charted one way for the run page's Health card and the comparison's instrument chart; and the Health card itself:
// the diagnosis in words (GET /jobs/{id}'s `diagnosis`, cape/diagnosis.py) above small live charts per epoch.
//
// A value the machine cannot measure (CUDA memory on the CPU, GPU utilisation without NVML) is null in the row: it is
// absent here too, never drawn as zero. A chart whose values are all absent is not drawn at all.

import {COLORS, LineChart} from "/static/charts.js";
import {h, num, pct} from "/static/ui.js";

/** The model's parts, as cape/health.py's PART_NAMES: gradients and updates are reported per part. */
export const PARTS = ["backbone", "support_encoder", "matcher", "query_encoder", "decoder", "heads"];
const PART_COLORS = Object.fromEntries(PARTS.map((part, i) => [part, COLORS[i]]));
const partLabel = (part) => part.replace("_", " ");

const finite = (value) => (typeof value === "number" && Number.isFinite(value) ? value : null);
const positive = (value) => (finite(value) != null && value > 0 ? value : null); // a log axis has no zero
const health = (field) => (row) => finite(row.health?.[field]);
const ofPart = (part, field) => (row) => finite(row.health?.parts?.[part]?.[field]);

/**
 * Every per-epoch figure a run reports, by key: label (the legend and the selector), group (the selector's heading),
 * axis (the y title), read(row) -> number or null; log: a log axis (zeros left out); percent: a fraction shown in %;
 * range: a fixed linear y range. absent: why a run may have no value for it.
 */
const GPU_ONLY = "measured on a GPU only: a CPU run has none";
const PER_PART = PARTS.flatMap((part) => [
  {key: `grad_norm.${part}`, group: "Gradients", label: `gradient norm: ${partLabel(part)}`, axis: "gradient norm (log)",
   log: true, read: ofPart(part, "grad_norm"), absent: "none: the part is frozen"},
  {key: `update_ratio.${part}`, group: "Gradients", label: `update ratio: ${partLabel(part)}`,
   axis: "‖Δθ‖ / ‖θ‖ per step (log)", log: true, read: ofPart(part, "update_ratio"), absent: "none: the part is frozen"},
]);
export const INSTRUMENTS = [
  {key: "loss", group: "Training", label: "loss", axis: "loss (log)", log: true, read: (r) => finite(r.loss)},
  {key: "loss_ce", group: "Training", label: "loss_ce", axis: "loss (log)", log: true, read: (r) => finite(r.loss_ce)},
  {key: "loss_coords", group: "Training", label: "loss_coords", axis: "loss (log)", log: true,
   read: (r) => finite(r.loss_coords)},
  {key: "lr", group: "Training", label: "learning rate", axis: "learning rate (log)", log: true, read: (r) => finite(r.lr)},
  {key: "pck", group: "Validation", label: "PCK@0.2", axis: "PCK", percent: true, read: (r) => finite(r.pck)},
  {key: "mpck", group: "Validation", label: "mPCK", axis: "mPCK", percent: true, read: (r) => finite(r.mpck)},
  {key: "baseline_pck", group: "Validation", label: "copy-the-support PCK@0.2", axis: "PCK", percent: true,
   read: (r) => finite(r.baseline_pck), absent: "none in single_image mode"},
  {key: "baseline_mpck", group: "Validation", label: "copy-the-support mPCK", axis: "mPCK", percent: true,
   read: (r) => finite(r.baseline_mpck), absent: "none in single_image mode"},
  {key: "grad_norm", group: "Gradients", label: "gradient norm: whole model", axis: "gradient norm (log)", log: true,
   read: health("grad_norm")},
  {key: "grad_norm_max", group: "Gradients", label: "largest gradient norm", axis: "gradient norm (log)", log: true,
   read: health("grad_norm_max")},
  {key: "clip_rate", group: "Gradients", label: "clip rate", axis: "steps clipped", percent: true,
   read: health("clip_rate")},
  ...PER_PART,
  {key: "step_seconds", group: "Speed", label: "time per step", axis: "seconds per step",
   read: (r) => (r.health ? finite(r.health.data_seconds + r.health.compute_seconds) : null)},
  {key: "data_seconds", group: "Speed", label: "data (waiting for the batch)", axis: "seconds per step",
   read: health("data_seconds")},
  {key: "compute_seconds", group: "Speed", label: "compute (forward, backward, update)", axis: "seconds per step",
   read: health("compute_seconds")},
  {key: "samples_per_second", group: "Speed", label: "samples per second", axis: "query images / s",
   read: health("samples_per_second")},
  {key: "seconds", group: "Speed", label: "epoch time", axis: "seconds per epoch", read: (r) => finite(r.seconds)},
  {key: "rss_peak_mib", group: "Memory", label: "RSS peak", axis: "MiB", read: health("rss_peak_mib")},
  {key: "cuda_allocated_peak_mib", group: "Memory", label: "CUDA allocated peak", axis: "MiB",
   read: health("cuda_allocated_peak_mib"), absent: GPU_ONLY},
  {key: "cuda_reserved_peak_mib", group: "Memory", label: "CUDA reserved peak", axis: "MiB",
   read: health("cuda_reserved_peak_mib"), absent: GPU_ONLY},
  {key: "gpu_memory_used_mib", group: "Memory", label: "GPU memory used (all processes)", axis: "MiB",
   read: health("gpu_memory_used_mib"), absent: GPU_ONLY},
  {key: "gpu_utilisation", group: "Memory", label: "GPU utilisation", axis: "GPU busy (%)", range: [0, 105],
   read: health("gpu_utilisation"), absent: GPU_ONLY},
  {key: "gpu_utilisation_max", group: "Memory", label: "GPU utilisation, highest", axis: "GPU busy (%)",
   range: [0, 105], read: health("gpu_utilisation_max"), absent: GPU_ONLY},
  {key: "support_visible", group: "Data", label: "support keypoints visible", axis: "of the keypoints", percent: true,
   read: health("support_visible")},
  {key: "query_visible", group: "Data", label: "query keypoints visible", axis: "of the keypoints", percent: true,
   read: health("query_visible")},
  {key: "outside_crop", group: "Data", label: "keypoints outside their crop", axis: "labelled keypoints",
   read: health("outside_crop")},
].map((instrument) => ({...instrument, value: instrument.log ? (row) => positive(instrument.read(row)) : instrument.read}));

export const INSTRUMENT = Object.fromEntries(INSTRUMENTS.map((instrument) => [instrument.key, instrument]));

/** An instrument's points over the rows, for a LineChart trace: {x: epochs, y: values or null}. */
export function series(instrument, rows) {
  return {x: rows.map((r) => r.epoch), y: rows.map((r) => instrument.value(r))};
}

/** The chart options of a LineChart of one instrument (its axis), for the comparison. */
export function chartOptions(instrument) {
  const {axis, log = false, percent = false, range = null} = instrument;
  return {yTitle: axis, log, decades: false, percent, range};
}

// --- the run page's Health card ----------------------------------------------------------------------------------

// The card's charts: each a few instruments, drawn once one of them has a value; a trace only for those that have.
const CHARTS = [
  {id: "grad", title: "Gradient norm per part", axis: "before clipping (log)", log: true,
   traces: [...PARTS.map((part) => ({key: `grad_norm.${part}`, name: partLabel(part), color: PART_COLORS[part]})),
            {key: "grad_norm", name: "whole model", color: "#333", dash: "dot"}],
   guide: (rows) => {
     const limit = rows.at(-1).health.clip_max_norm;
     return limit > 0 ? {y: limit, text: `clipped above ${num(limit)}`} : null;
   }},
  {id: "clip", title: "Clip rate", axis: "steps clipped", percent: true,
   traces: [{key: "clip_rate", name: "clip rate", color: "#d62728"}]},
  {id: "update", title: "Update ratio per part", axis: "‖Δθ‖ / ‖θ‖ (log)", log: true,
   traces: PARTS.map((part) => ({key: `update_ratio.${part}`, name: partLabel(part), color: PART_COLORS[part]}))},
  {id: "time", title: "Time per step", axis: "seconds",
   traces: [{key: "data_seconds", name: "data", color: "#ff7f0e"}, {key: "compute_seconds", name: "compute", color: "#1f77b4"}]},
  {id: "memory", title: "Memory (peak)", axis: "MiB",
   traces: [{key: "rss_peak_mib", name: "RSS", color: "#8c564b"},
            {key: "cuda_allocated_peak_mib", name: "CUDA allocated", color: "#2ca02c"},
            {key: "cuda_reserved_peak_mib", name: "CUDA reserved", color: "#9467bd", dash: "dash"},
            {key: "gpu_memory_used_mib", name: "GPU used (NVML)", color: "#7f7f7f", dash: "dot"}]},
  {id: "gpu", title: "GPU utilisation", axis: "%", range: [0, 105],
   traces: [{key: "gpu_utilisation", name: "mean", color: "#17becf"},
            {key: "gpu_utilisation_max", name: "highest", color: "#17becf", dash: "dot"}]},
];

const GPU_KEYS = ["cuda_allocated_peak_mib", "cuda_reserved_peak_mib", "gpu_utilisation"];

export class HealthCard {
  /** root: the card's element (the run page's #health section). */
  constructor(root) {
    this.root = root;
    this.rows = []; // every epoch row with instruments, in order
    this.diagnosis = undefined; // the one shown: the latest, by the epochs it read
    this.charts = new Map(); // chart id -> {chart, keys: the traces drawn, guide}
    this.diagnosisBox = h("div", {id: "diagnosis", class: "diagnosis box pending"},
      "No diagnosis yet: it comes after the first epoch.");
    this.facts = h("div", {id: "health-facts", class: "facts small"});
    this.absent = h("p", {id: "health-absent", class: "muted small", hidden: true});
    this.grid = h("div", {class: "health-charts"},
      CHARTS.map((spec) => h("div", {class: "chart small-chart", id: `health-${spec.id}-chart`, hidden: true})));
    this.waiting = h("p", {id: "health-waiting", class: "muted small"},
      "No instruments yet: they come with each epoch.");
    root.replaceChildren(h("h2", {}, "Health"), this.diagnosisBox, this.facts, this.waiting, this.absent, this.grid);
  }

  /** GET /jobs/{id}'s diagnosis (null before the first epoch). An older one (fewer epochs read) never replaces a newer
   * one: the stream's status events and the page's refetches may answer out of order. */
  showDiagnosis(diagnosis) {
    if (diagnosis === undefined) return; // an API without diagnoses
    if (diagnosis === null && this.diagnosis) return;
    if (diagnosis && this.diagnosis && diagnosis.epochs < this.diagnosis.epochs) return;
    if (JSON.stringify(diagnosis) === JSON.stringify(this.diagnosis)) return;
    this.diagnosis = diagnosis;
    const box = this.diagnosisBox;
    if (!diagnosis) return;
    const epochs = diagnosis.epochs ? `after ${diagnosis.epochs} epoch${diagnosis.epochs === 1 ? "" : "s"}`
      : "in the first epoch"; // a failure it explains (out of memory, say) can come before any epoch ended
    box.dataset.healthy = String(diagnosis.healthy);
    box.dataset.epochs = String(diagnosis.epochs);
    box.dataset.causes = diagnosis.findings.map((f) => f.cause).join(" ");
    if (diagnosis.healthy) {
      box.className = "diagnosis box good";
      box.replaceChildren(h("strong", {}, "Healthy: "), diagnosis.message || `nothing flagged ${epochs}.`);
      return;
    }
    box.className = "diagnosis box bad";
    const count = diagnosis.findings.length;
    box.replaceChildren(
      h("strong", {}, `${count} problem${count === 1 ? "" : "s"} ${epochs}:`),
      h("ul", {class: "findings"}, diagnosis.findings.map((finding) => h("li",
        {class: "finding", dataset: {cause: finding.cause}},
        h("div", {class: "finding-title"}, finding.title),
        h("div", {class: "evidence"}, h("span", {class: "muted"}, "Seen: "), finding.evidence),
        h("div", {class: "advice"}, h("span", {class: "muted"}, "Try: "), finding.advice)))),
    );
  }

  /** New epoch rows (the stream's, in order): the charts grow, keeping the user's zoom. */
  async addRows(rows) {
    const fresh = rows.filter((r) => r.health);
    if (!fresh.length) {
      if (!this.rows.length) {
        this.waiting.textContent = "These epochs carry no instruments (the run is older than they are).";
      }
      return;
    }
    const before = this.rows.length;
    this.rows.push(...fresh);
    this.waiting.hidden = true;
    this.renderFacts();
    await Promise.all(CHARTS.map((spec) => this.drawChart(spec, before)));
    this.root.dataset.epochs = String(this.rows.at(-1).epoch);
  }

  /** One chart: made once one of its instruments has a value; redrawn whole when a trace appears; else extended. */
  async drawChart(spec, before) {
    const el = this.root.querySelector(`#health-${spec.id}-chart`);
    const present = spec.traces.filter((t) => this.rows.some((r) => INSTRUMENT[t.key].value(r) != null));
    if (!present.length) return;
    const keys = present.map((t) => t.key).join(" ");
    const traces = () => present.map((t) => ({...t, ...series(INSTRUMENT[t.key], this.rows)}));
    const drawn = this.charts.get(spec.id);
    if (!drawn) {
      el.hidden = false;
      const chart = new LineChart(el, {
        title: spec.title, yTitle: spec.axis, log: spec.log, decades: false, percent: spec.percent, range: spec.range,
        guide: spec.guide?.(this.rows), height: 270, compact: true, traces: traces(),
      });
      this.charts.set(spec.id, {chart, keys});
      el.dataset.traces = keys;
      return chart.ready;
    }
    if (drawn.keys !== keys) {
      drawn.keys = el.dataset.traces = keys;
      return drawn.chart.set(traces());
    }
    const added = this.rows.slice(before);
    return drawn.chart.extend(present.map((t) => series(INSTRUMENT[t.key], added)));
  }

  /** The last epoch's figures that are no curve: steps and speed, the first loss against chance, the data's health,
   * frozen parts, and which instruments this machine does not have. */
  renderFacts() {
    const last = this.rows.at(-1), hl = last.health;
    const first = this.rows.find((r) => r.health.first_loss != null)?.health;
    const frozen = PARTS.filter((part) => hl.parts?.[part] && !hl.parts[part].trainable);
    const which = hl.outside_keypoints || [];
    const outside = hl.outside_crop
      ? `${hl.outside_crop} labelled keypoint${hl.outside_crop === 1 ? "" : "s"} fell outside the crop`
        + (which.length ? ` (keypoint${which.length === 1 ? "" : "s"} ${which.join(", ")})` : "")
      : "no keypoint fell outside the crop";
    this.facts.replaceChildren(...[
      h("div", {}, h("strong", {}, `Epoch ${last.epoch}: `),
        `${hl.steps} steps, ${num(hl.samples_per_second, 3)} samples/s, gradient norm ${num(hl.grad_norm, 3)}`
        + ` (largest ${num(hl.grad_norm_max, 3)}), ${pct(hl.clip_rate, 0)} of steps clipped`
        + (hl.clip_max_norm > 0 ? ` at ${num(hl.clip_max_norm)}` : " (clipping off)") + "."),
      first ? h("div", {}, `First loss ${num(first.first_loss, 3)}, chance ${num(first.chance_loss, 3)}`
        + " (a model that knows nothing yet starts near chance).") : null,
      h("div", {}, `Data: support keypoints ${pct(hl.support_labelled, 0)} labelled, ${pct(hl.support_visible, 0)} visible;`
        + ` query keypoints ${pct(hl.query_labelled, 0)} labelled, ${pct(hl.query_visible, 0)} visible; ${outside}.`),
      frozen.length ? h("div", {}, `Frozen (no gradient, not drawn): ${frozen.map(partLabel).join(", ")}.`) : null,
    ].filter(Boolean));
    const missing = GPU_KEYS.filter((key) => !this.rows.some((r) => INSTRUMENT[key].value(r) != null));
    this.absent.hidden = !missing.length;
    this.absent.textContent = missing.length === GPU_KEYS.length
      ? "CPU run: no GPU figures (CUDA memory, GPU utilisation)."
      : `Not measured on this machine: ${missing.map((key) => INSTRUMENT[key].label).join(", ")}.`;
  }
}
