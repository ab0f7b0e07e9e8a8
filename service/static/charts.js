// A small wrapper around Plotly (loaded by the page from /static/vendor/plotly.min.js, the installed wheel's copy), and
// several runs' curves overlaid (the comparison's and a sweep's).
//
// A chart is a set of named line traces over epochs. New epochs are appended with Plotly.extendTraces; a redraw
// uses Plotly.react with a constant uirevision. Either way the user's zoom, pan and hidden traces survive live
// updates.

import {allMetrics, isTerminal} from "/static/api.js";

const Plotly = window.Plotly;

export const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                       "#7f7f7f", "#bcbd22"];

// The note on a chart with nothing to draw: "no epochs yet", or what a chart of absent values says instead.
const emptyNote = (text) => ({xref: "paper", yref: "paper", x: 0.5, y: 0.5, text, showarrow: false,
                              font: {size: 13, color: "#999"}});

// No "Share chart" (sendChartToCloud: an upload to Plotly's cloud): the page talks to this service's API only.
export const CONFIG = {responsive: true, displaylogo: false,
                modeBarButtonsToRemove: ["select2d", "lasso2d", "sendChartToCloud"]};
// A small chart (a narrow grid cell): the zoom and its reset only, so that the bar leaves the title readable.
const COMPACT_CONFIG = {...CONFIG, modeBarButtonsToRemove: [...CONFIG.modeBarButtonsToRemove, "toImage", "pan2d",
                        "zoomIn2d", "zoomOut2d", "autoScale2d", "toggleSpikelines", "hoverClosestCartesian",
                        "hoverCompareCartesian"]};

export function available() {
  return Boolean(Plotly);
}

export class LineChart {
  /**
   * el: the container; title; yTitle; traces: [{name, color?, dash?, width?, rank?}]; percent: y is a fraction in %;
   * log: logarithmic y; range: [min, max] of a linear y; guide: {y, text}: a dotted horizontal line (a target);
   * decades: a log axis ticked at powers of ten only (a loss spans several), else wherever they fit (a narrow range);
   * height in pixels; empty: what the chart says while it has no value to draw; compact: a small chart in a grid (a
   * shorter tool bar). x is the epoch, untitled: a title there would collide with a legend of two rows.
   */
  constructor(el, {title, yTitle, traces = [], percent = false, log = false, decades = true, range = null, guide = null,
                   height = 300, empty = "no epochs yet", compact = false}) {
    this.el = el;
    this.config = compact ? COMPACT_CONFIG : CONFIG;
    this.empty = emptyNote(empty);
    this.traces = traces.map((t, i) => this.trace(t, i));
    this.layout = {
      title: {text: title, font: {size: 14}, x: 0.02, xanchor: "left"},
      uirevision: "keep",  // a react() keeps what the user did to the axes and legend
      margin: {l: 56, r: 16, t: 36, b: 40},
      height,
      xaxis: {rangemode: "tozero", zeroline: false, automargin: true},
      yaxis: {title: {text: yTitle}, type: log ? "log" : "linear", automargin: true,
              ...(log ? (decades ? {dtick: 1} : {exponentformat: "power", nticks: 4}) : {}),
              ...(percent ? {tickformat: ".0%", range: [0, 1.05]} : {}), ...(range ? {range} : {})},
      showlegend: true,
      legend: {orientation: "h", y: -0.12, yanchor: "top", x: 0}, // more rows go down, not up
      hovermode: "x unified",
      shapes: guide ? [{type: "line", xref: "paper", x0: 0, x1: 1, y0: guide.y, y1: guide.y,
                        line: {dash: "dot", width: 1, color: "#888"}}] : [],
      annotations: [
        ...(guide ? [{xref: "paper", x: 1, y: log ? Math.log10(guide.y) : guide.y, text: guide.text,
                      showarrow: false, xanchor: "right", yanchor: "bottom", font: {size: 10, color: "#666"}}] : []),
        this.empty,
      ],
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "#fff",
    };
    this.fit();
    this.ready = Plotly.newPlot(el, this.traces, this.layout, this.config);
  }

  /** Layout that depends on the data: the empty note while no value is drawn; a tick per epoch while there are few. */
  fit() {
    const traces = this.el.data || this.traces;
    const points = traces.flatMap((t) => Array.from(t.x || []));
    const last = points.length ? Math.max(...points) : 0;
    const changed = [];
    const empty = !traces.some((t) => Array.from(t.y || []).some((y) => y != null));
    const annotations = this.layout.annotations.filter((a) => a !== this.empty).concat(empty ? [this.empty] : []);
    if (annotations.length !== this.layout.annotations.length) {
      this.layout.annotations = annotations;
      changed.push("annotations");
    }
    const dtick = last <= 12 ? 1 : undefined; // no "epoch 2.5"
    if (this.layout.xaxis.dtick !== dtick) {
      this.layout.xaxis.dtick = dtick;
      changed.push("xaxis");
    }
    return changed.length > 0;
  }

  trace({name, color, dash, width = 2, rank = 1000, x = [], y = []}, index) {
    // rank: the legend's order (lower first), so that the trace drawn last (on top) can still come first there
    return {type: "scatter", mode: "lines+markers", name, x: [...x], y: [...y], marker: {size: 5}, legendrank: rank,
            line: {color: color || COLORS[index % COLORS.length], dash: dash || "solid", width},
            connectgaps: false};
  }

  /** Appends points: columns[i] = {x: [...], y: [...]} for trace i (null: nothing for that trace). */
  async extend(columns) {
    await this.ready;
    const indices = [], xs = [], ys = [];
    columns.forEach((column, i) => {
      if (column && column.x.length) {
        indices.push(i);
        xs.push(column.x);
        ys.push(column.y);
      }
    });
    if (!indices.length) return;
    await Plotly.extendTraces(this.el, {x: xs, y: ys}, indices);
    if (this.fit()) await Plotly.relayout(this.el, {annotations: this.layout.annotations, "xaxis.dtick": this.layout.xaxis.dtick ?? null});
  }

  /** Replaces every trace (a new job in a comparison, say), keeping the user's zoom. */
  async set(traces) {
    await this.ready;
    this.traces = traces.map((t, i) => this.trace(t, i));
    this.fit();
    await Plotly.react(this.el, this.traces, this.layout, this.config);
  }

  /** How many points each trace has: what the page shows right now. */
  counts() {
    return (this.el.data || []).map((trace) => trace.x.length);
  }
}

// --- the two charts of a run and of a comparison ------------------------------------------------------------------

/** The memorisation check of the single-image guide: a run that memorised its image has its loss below 0.1. */
const MEMORISED = {y: 0.1, text: "memorised below 0.1"};

/**
 * The training loss, on a log scale: the run page's (its loss terms) and the comparison's (one trace per run).
 * singleImage: every run shown is a single-image one, so the memorisation check's 0.1 line is drawn.
 */
export function lossChart(el, {traces, singleImage}) {
  return new LineChart(el, {title: "Training loss", yTitle: "loss (log scale)", log: true, traces,
                            guide: singleImage ? MEMORISED : null});
}

/** The validation PCK, in %: the run page's (PCK@0.2 and mPCK) and the comparison's (one trace per run). */
export function pckChart(el, {title = "Validation PCK", traces}) {
  return new LineChart(el, {title, yTitle: "PCK", percent: true, traces});
}

/** Columns for LineChart.extend from metric rows: one per field, null where a value is missing. */
export function columns(rows, fields) {
  return fields.map((field) => ({x: rows.map((r) => r.epoch), y: rows.map((r) => finite(r[field]))}));
}

/** A number to draw, or null (a gap) for a missing or non-finite one. */
export function finite(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

// --- several runs overlaid ----------------------------------------------------------------------------------------

/**
 * Several runs' loss and PCK overlaid, one trace per run in COLORS order: the comparison's and a sweep's. draw() reads
 * every run's epochs so far; grow() appends the epochs that came since to the runs still training (polling GET
 * /jobs/{id}/metrics: one event stream per run would use up the browser's connections to the server).
 * runs: [{id, label}]; singleImage: every run is a single-image one (the loss chart's memorisation line).
 */
export class RunsOverlay {
  constructor({loss, pck}, runs, {singleImage = false} = {}) {
    this.elements = {loss, pck};
    this.runs = runs;
    this.singleImage = singleImage;
    this.rows = runs.map(() => []); // per run: its epoch rows so far
    this.follow = runs.map(() => ({next: 0, status: null})); // per run: the epoch to read after, the metrics' status
    this.charts = null; // {loss, pck} once drawn
  }

  async draw() {
    const pages = await Promise.all(this.runs.map((run) => allMetrics(run.id)));
    pages.forEach((page, i) => {
      this.rows[i].push(...page.rows);
      this.follow[i] = {next: page.next, status: page.status};
    });
    const traces = (field) => this.runs.map((run, i) => ({name: run.label, color: COLORS[i % COLORS.length],
                                                          ...columns(this.rows[i], [field])[0]}));
    this.charts = {
      loss: lossChart(this.elements.loss, {traces: traces("loss"), singleImage: this.singleImage}),
      pck: pckChart(this.elements.pck, {title: "Validation PCK@0.2", traces: traces("pck")}),
    };
    await Promise.all([this.charts.loss.ready, this.charts.pck.ready]);
  }

  /** The runs whose curves may still grow: those whose metrics said, when last read, that they are not done. */
  open() {
    return this.runs.map((run, i) => i).filter((i) => !isTerminal(this.follow[i].status));
  }

  /** Appends the open runs' new epochs to the charts; resolves to each run's new rows (null for the others). The
   * metrics answer their job's status with the rows: once it is terminal, every row is in. */
  async grow() {
    const fresh = this.runs.map(() => null);
    await Promise.all(this.open().map(async (i) => {
      const page = await allMetrics(this.runs[i].id, this.follow[i].next);
      this.follow[i] = {next: page.next, status: page.status};
      this.rows[i].push(...page.rows);
      fresh[i] = page.rows;
    }));
    if (this.charts) {
      const column = (field) => fresh.map((rows) => rows && columns(rows, [field])[0]);
      await Promise.all([this.charts.loss.extend(column("loss")), this.charts.pck.extend(column("pck"))]);
    }
    return fresh;
  }
}
