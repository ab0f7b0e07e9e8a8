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
  const links = [["/", "Jobs", "jobs"], ["/new", "New job", "new"], ["/compare", "Compare", "compare"]];
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
  // An evaluation has no epochs (total_epochs 0): its progress is a fraction.
  const evaluation = job.mode === "evaluate";
  const label = evaluation ? `${Math.round(100 * fraction)} %` : `${job.current_epoch}/${job.total_epochs}`;
  return h("div", {class: "progress", title: evaluation ? "evaluation" : `epoch ${job.current_epoch} of ${job.total_epochs}`},
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

export function jobTitle(job) {
  return job.name || `${job.mode === "evaluate" ? "evaluation" : "job"} ${shortId(job.id)}`;
}

export function showError(where, error) {
  where.replaceChildren(h("p", {class: "error"}, error.message || String(error)));
}

export function whenVisible(callback, ms) {
  // Periodic work that pauses while the tab is hidden.
  let timer = null;
  const tick = async () => {
    if (!document.hidden) {
      try {
        await callback();
      } catch (error) {
        console.warn(error);
      }
    }
    timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      clearTimeout(timer);
      tick();
    }
  });
}
