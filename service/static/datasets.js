// What the two dataset pages share: a dataset's state in words, and the upload.

import {ApiError, apiKey, getJSON} from "/static/api.js";
import {h} from "/static/ui.js";

const PENDING = new Set(["queued", "checking"]);
/** Still being imported and checked: the pages follow it. */
export const isPending = (status) => PENDING.has(status);

/** The check's findings ({errors, warnings}: a dataset's summary or report) in a few words: "2 errors · 1 warning",
 * "no problems", or "–" before the check. */
export function problemCounts(summary) {
  if (!summary) return h("span", {class: "muted"}, "–");
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  if (!summary.errors && !summary.warnings) return h("span", {class: "good"}, "no problems");
  return h("span", {},
    summary.errors ? h("span", {class: "error"}, plural(summary.errors, "error")) : null,
    summary.errors && summary.warnings ? " · " : null,
    summary.warnings ? h("span", {class: "warn"}, plural(summary.warnings, "warning")) : null);
}

function send(form, onProgress) {
  // XMLHttpRequest, not fetch: fetch cannot report an upload's progress. The key goes in the header, as api.js
  // sends it, never in the URL.
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/datasets");
    xhr.responseType = "json";
    xhr.setRequestHeader("Accept", "application/json");
    const key = apiKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.upload.addEventListener("progress", (event) => onProgress(event.loaded, event.total));
    xhr.upload.addEventListener("load", (event) => onProgress(event.total || event.loaded, event.total || event.loaded));
    xhr.addEventListener("load", () => resolve(xhr));
    xhr.addEventListener("error", () => reject(new Error("the upload failed: the connection to the API was lost")));
    xhr.send(form);
  });
}

/**
 * POST /datasets with the form (multipart), onProgress(sent, total) as its bytes go out; resolves to the new dataset
 * (201), rejects with the API's ApiError otherwise. A 401 asks for a key the way every other request does (through
 * api.js) and sends the upload once more.
 */
export async function uploadDataset(form, onProgress) {
  let xhr = await send(form, onProgress);
  if (xhr.status === 401) {
    await getJSON("/datasets"); // answered 401 as well: the key dialog, then this request again with the new key
    xhr = await send(form, onProgress);
  }
  if (xhr.status === 201) return xhr.response;
  const detail = xhr.response?.detail ?? null;
  const retryAfter = xhr.getResponseHeader("Retry-After");
  throw new ApiError(xhr.status, detail, "/datasets", retryAfter == null ? null : Number(retryAfter));
}
