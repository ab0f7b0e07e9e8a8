// A learning-rate range test on its run page (GET /jobs/{id}, mode lr_range_test): once it ended, its `lr_range`, the
// loss and the smoothed loss against the learning rate on a log axis, the suggested learning rate marked, the test's
// message, and "Train with lr = X": the new-job form with the run's settings and the suggestion
// (/new?clone=<id>&lr=<X>). Before that, what it is doing.

import {isTerminal} from "/static/api.js";
import {CONFIG, available, finite} from "/static/charts.js";
import {h, num} from "/static/ui.js";

const LOSS = "#9ecae1", SMOOTHED = "#1f77b4", SUGGESTION = "#d62728";

const positive = (value) => (finite(value) != null && value > 0 ? value : null); // a log axis has no zero

/** The run page's summary of a range test: [label, value] pairs in place of a training run's epochs and PCK. */
export function rangeSummary(job) {
  const range = job.config.lr_range || {};
  const result = job.lr_range;
  return [
    ["Prepares", `a ${job.config.mode} run`],
    ["Range", `lr ${num(range.start_lr)} → ${num(range.end_lr)} in ${range.steps ?? "–"} steps`],
    ["Suggested lr", h("span", {id: "summary-suggestion"}, result ? num(result.suggestion) : "–")],
    ["Stopped", result ? result.stopped : "–"],
  ];
}

export class LrRangeCard {
  /** el: the card (#lr-range), holding #lr-range-message, #lr-range-chart, #lr-suggestion and #use-suggestion. */
  constructor(el) {
    this.el = el;
    this.drawn = false;
  }

  update(job) {
    const result = job.lr_range;
    this.el.hidden = false;
    const chart = this.el.querySelector("#lr-range-chart");
    if (!result) {
      const range = job.config.lr_range || {};
      chart.hidden = true;
      this.el.querySelector("#lr-range-message").textContent = isTerminal(job.status)
        ? `No result: the test ${job.status}.`
        : `The test raises the learning rate from ${num(range.start_lr)} to ${num(range.end_lr)} in ${range.steps} `
          + "steps and watches the loss: the curve and a suggestion come when it ends.";
      return;
    }
    if (this.drawn) return; // a finished test's result never changes
    this.drawn = true;
    chart.hidden = false;
    this.el.querySelector("#lr-range-message").textContent = result.message;
    this.el.querySelector("#lr-range-rule").textContent = result.rule ? `suggestion: ${result.rule}` : "";
    const {suggestion} = result;
    const use = this.el.querySelector("#use-suggestion");
    this.el.querySelector("#lr-suggestion").replaceChildren(suggestion == null
      ? "No suggestion: see the message."
      : h("span", {}, "Suggested learning rate: ", h("strong", {id: "suggestion-value"}, num(suggestion))));
    use.hidden = suggestion == null;
    if (suggestion != null) {
      use.href = `/new?clone=${job.id}&lr=${encodeURIComponent(String(suggestion))}`;
      use.textContent = `Train with lr = ${num(suggestion)}`;
    }
    if (available()) this.plot(chart, result);
    else chart.textContent = "The charting library did not load.";
  }

  plot(el, {points, suggestion, suggestion_step: step}) {
    const x = points.map((p) => p.lr);
    const smoothed = points.map((p) => positive(p.smoothed));
    const traces = [
      {type: "scatter", mode: "lines", name: "loss", x, y: points.map((p) => positive(p.loss)),
       line: {color: LOSS, width: 1}},
      {type: "scatter", mode: "lines", name: "smoothed loss", x, y: smoothed, line: {color: SMOOTHED, width: 2.5}},
    ];
    const marked = suggestion != null;
    if (marked) {
      // steps count from 1, points are in step order
      traces.push({type: "scatter", mode: "markers", name: `suggested lr = ${num(suggestion)}`, x: [suggestion],
                   y: [smoothed[step - 1] ?? null], marker: {color: SUGGESTION, size: 11, symbol: "diamond"}});
    }
    el.dataset.suggestion = marked ? String(suggestion) : "";
    // The loss's axis: ticks at each doubling (0.5, 1, 2, 4...) over a few decades, at powers of ten over more.
    const drawn = [...traces[0].y, ...smoothed].filter((v) => v != null);
    const decades = drawn.length ? Math.log10(Math.max(...drawn) / Math.min(...drawn)) : 0;
    const ticks = decades > 3 ? {dtick: 1, exponentformat: "power"} : {dtick: Math.log10(2), tickformat: "~g"};
    return window.Plotly.newPlot(el, traces, {
      title: {text: "Loss against the learning rate", font: {size: 14}, x: 0.02, xanchor: "left"},
      height: 360,
      margin: {l: 56, r: 16, t: 36, b: 48},
      xaxis: {type: "log", title: {text: "learning rate (log scale)"}, exponentformat: "power", automargin: true},
      yaxis: {type: "log", title: {text: "loss (log scale)"}, automargin: true, ...ticks},
      legend: {orientation: "h", y: -0.2, yanchor: "top", x: 0},
      hovermode: "x unified",
      // A shape on a log axis is placed by the value; an annotation by its log10.
      shapes: marked ? [{type: "line", name: "suggestion", xref: "x", yref: "paper", x0: suggestion, x1: suggestion,
                         y0: 0, y1: 1, line: {color: SUGGESTION, dash: "dash", width: 1.5}}] : [],
      annotations: marked ? [{xref: "x", yref: "paper", x: Math.log10(suggestion), y: 1, showarrow: false,
                              text: `suggested ${num(suggestion)}`, xanchor: "left", yanchor: "top",
                              font: {size: 11, color: SUGGESTION}}] : [],
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "#fff",
    }, CONFIG);
  }
}
