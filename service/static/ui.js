// What every page shares: the header, formatting, and small DOM helpers.

import {apiKey, forgetKey, getJSON, onKeyChange} from "/static/api.js";

/** document.createElement with attributes and children; strings become text (never HTML). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function header(active) {
  const links = [["/", "Jobs", "jobs"], ["/sweep", "Sweeps", "sweeps"], ["/new", "New job", "new"],
                 ["/compare", "Compare", "compare"], ["/data", "Datasets", "data"]];
  const key = h("span", {class: "key", id: "key-status"});
  const renderKey = () => {
    key.replaceChildren();
    if (apiKey()) key.append("API key set · ", h("button", {class: "link", id: "forget-key", onclick: () => { forgetKey(); location.reload(); }}, "forget it"));
  };
  renderKey();
  onKeyChange(renderKey);
  const nav = h("nav", {class: "top"},
    h("a", {class: "brand", href: "/"}, "CAPE training"),
    ...links.map(([href, text, name]) => h("a", {href, class: name === active ? "active" : null}, text)),
    h("span", {class: "spacer"}),
    key,
  );
  document.body.prepend(nav);
}

export function pct(value, digits = 1) {
  return value == null || Number.isNaN(value) ? "–" : `${(100 * value).toFixed(digits)} %`;
}

export function num(value, digits = 4) {
  if (value == null || Number.isNaN(value)) return "–";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(digits)).toString();
}

export function bytes(count) {
  if (count == null) return "–";
  const units = ["bytes", "kB", "MB", "GB"];
  let value = count, unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${count} bytes`;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, {year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit"});
}

export function shortId(id) {
  return id.slice(0, 8);
}

export function statusBadge(status) {
  return h("span", {class: `badge status-${status}`, dataset: {status}}, status);
}

export function progressBar(job) {
  const fraction = Math.max(0, Math.min(1, job.progress ?? 0));
  // A job without epochs (total_epochs 0: an evaluation, a learning-rate range test) has a fraction for progress.
  const epochs = job.total_epochs > 0;
  const label = epochs ? `${job.current_epoch}/${job.total_epochs}` : `${Math.round(100 * fraction)} %`;
  return h("div", {class: "progress", title: epochs ? `epoch ${job.current_epoch} of ${job.total_epochs}` : job.mode},
    h("div", {class: `bar status-${job.status}`, style: `width: ${(100 * fraction).toFixed(1)}%`}),
    h("span", {}, label),
  );
}

const VERDICT_STYLE = {"memorised": "good", "not yet": "pending", "not memorised": "bad"};

/** How a single-image run's verdict looks, the same in the list, the comparison and on the run page: "good"
 * (memorised), "pending" (not yet, or no verdict yet) or "bad" (not memorised). */
export function verdictStyle(verdict) {
  return verdict ? VERDICT_STYLE[verdict.state] || "" : "pending";
}

/** A single-image run's verdict as a badge (the list and the comparison); "–" for other runs and before one. */
export function verdictBadge(job) {
  if (job.mode !== "single_image" || !job.verdict) return "–";
  return h("span", {class: `badge verdict ${verdictStyle(job.verdict)}`, title: job.verdict.message,
                    dataset: {state: job.verdict.state}}, job.verdict.state);
}

// Category names per (dataset, split), fetched once per page.
const catalogs = new Map();
export function categoryNames(dataset, split) {
  const key = `${dataset}/${split}`;
  if (!catalogs.has(key)) {
    const query = new URLSearchParams({split});
    if (dataset) query.set("dataset", dataset);
    catalogs.set(key, getJSON(`/categories?${query}`)
      .then((list) => new Map(list.items.map((c) => [c.id, c])))
      .catch(() => new Map()));
  }
  return catalogs.get(key);
}

export async function categoryLabel(job) {
  if (job.mode === "evaluate") return "test categories";
  if (job.category_id == null) return "all (full)";
  const names = await categoryNames(job.dataset, job.split);
  const category = names.get(job.category_id);
  return category ? `${job.category_id} · ${category.name}` : String(job.category_id);
}

const UNNAMED = {evaluate: "evaluation", lr_range_test: "lr range test"}; // an unnamed job's title, by its mode

/** A term of a summary (<dl>): its label and its value. */
export function term(label, value) {
  return [h("dt", {}, label), h("dd", {}, value)];
}

/** Tags as links to the jobs that have them; "–" for none. */
export function tagLinks(tags) {
  return tags.length ? tags.map((tag) => h("a", {class: "tag", href: `/?tag=${encodeURIComponent(tag)}`}, tag)) : "–";
}

export function jobTitle(job) {
  return job.name || `${UNNAMED[job.mode] || "job"} ${shortId(job.id)}`;
}

export function showError(where, error) {
  where.replaceChildren(h("p", {class: "error"}, error.message || String(error)));
}

/** Periodic work that pauses while the tab is hidden; returns a function that stops it for good. */
export function whenVisible(callback, ms) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (!document.hidden) {
      try {
        await callback();
      } catch (error) {
        console.warn(error);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  const visible = () => {
    if (!document.hidden && !stopped) {
      clearTimeout(timer);
      tick();
    }
  };
  document.addEventListener("visibilitychange", visible);
  return () => {
    stopped = true;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", visible);
  };
}

/**
 * A button that acts on the second click within 5 s (Cancel: a stray click does not stop a long run). The first click
 * arms it ("Really cancel?", class "armed"); action() runs on the second, the button disabled meanwhile.
 */
export function armedButton(button, action, {armedText = "Really cancel?"} = {}) {
  const label = button.textContent;
  let timer = null;
  const disarm = () => {
    clearTimeout(timer);
    timer = null;
    button.textContent = label;
    button.classList.remove("armed");
  };
  button.addEventListener("click", async () => {
    if (!timer) {
      button.textContent = armedText;
      button.classList.add("armed");
      timer = setTimeout(disarm, 5000);
      return;
    }
    disarm();
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
    }
  });
}

// --- sweeps ------------------------------------------------------------------------------------------------------

/** A sweep member's grid values in words: {lr: 0.001, seed: 1} -> "lr=0.001, seed=1". */
export function valuesLabel(values) {
  return Object.entries(values || {}).map(([name, value]) => `${name}=${value}`).join(", ");
}

/** A sweep's grid in words: "lr: 0.0001, 0.0005 × seed: 0, 1". */
export function gridLabel(grid) {
  return Object.entries(grid || {}).map(([name, values]) => `${name}: ${values.join(", ")}`).join(" × ");
}

/** A sweep's ranking metric's value as the metric reads: an epoch, a fraction in %, a loss. */
export function metricValue(metric, value) {
  if (value == null) return "–";
  if (metric === "memorised_epoch") return `epoch ${value}`;
  if (metric === "best_pck" || metric === "best_mpck") return pct(value);
  return num(value);
}

/** A sweep's members by status, the statuses it has: "2 succeeded · 1 running". */
export function countsLabel(counts) {
  const present = Object.entries(counts || {}).filter(([, n]) => n > 0);
  return present.map(([status, n]) => `${n} ${status}`).join(" · ") || "no members";
}

/** A sweep's title: its name, else its id's start. */
export function sweepTitle(sweep) {
  return sweep.name || `sweep ${shortId(sweep.id)}`;
}
