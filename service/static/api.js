// The API from the browser: fetch with the API key, errors as the API words them, and the job event stream.
//
// With CAPE_API_KEYS set on the server, the first request answered 401 opens a dialog that asks for a key; the key
// is kept in sessionStorage (this tab only, gone when it closes) and sent as "Authorization: Bearer <key>" on every
// request: never in a URL (so never in a log), never in a cookie (credentials: "omit"), so there is nothing for
// another site to ride on (no CSRF).

const KEY_STORE = "cape.apiKey";

export class ApiError extends Error {
  constructor(status, detail, path, retryAfter = null) {
    super(describe(status, detail));
    this.status = status;
    this.detail = detail;
    this.path = path;
    this.retryAfter = retryAfter; // seconds, from a 503's or 504's Retry-After header
  }

  // FastAPI's 422: [{loc: ["body", "lr"], msg}] -> {"lr": "Input should be ...", "": "message about the whole body"};
  // a path or query parameter's by its name too (["path", "index"] -> "index"), and a sweep's grid value by the field
  // it varies (["body", "grid", "lr", 2] -> "lr"; ["body", "grid"] -> "grid").
  fieldErrors() {
    const out = {};
    if (!Array.isArray(this.detail)) return {"": this.message};
    for (const err of this.detail) {
      let loc = (err.loc || []).filter((part) => !["body", "query", "path"].includes(part));
      if (loc[0] === "grid" && loc.length > 1) loc = loc.slice(1);
      const field = loc.length ? String(loc[0]) : "";
      out[field] = out[field] ? `${out[field]}; ${err.msg}` : err.msg;
    }
    return out;
  }
}

function describe(status, detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  return `HTTP ${status}`;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  keyChanged();
}

const keyListeners = new Set();
export function onKeyChange(listener) {
  keyListeners.add(listener);
}
function keyChanged() {
  for (const listener of keyListeners) listener(apiKey());
}

// --- the key dialog ---------------------------------------------------------------------------------------------

let prompting = null; // the open dialog's promise: concurrent 401s wait for the same answer

function askForKey(refused) {
  if (prompting) return prompting;
  let dialog = document.getElementById("api-key-dialog");
  if (!dialog) {
    dialog = document.createElement("dialog");
    dialog.id = "api-key-dialog";
    dialog.innerHTML = `
      <form method="dialog" id="api-key-form">
        <h2>API key</h2>
        <p>This service needs an API key. It is kept in this tab only and sent as an
           <code>Authorization: Bearer</code> header.</p>
        <p class="error" id="api-key-refused" hidden>That key was refused: check it and try again.</p>
        <label>Key <input id="api-key-input" type="password" autocomplete="off" required autofocus></label>
        <div class="actions"><button id="api-key-submit" type="submit" class="primary">Use this key</button></div>
      </form>`;
    document.body.append(dialog);
    dialog.addEventListener("cancel", (event) => event.preventDefault()); // no way on without a key
  }
  dialog.querySelector("#api-key-refused").hidden = !refused;
  const input = dialog.querySelector("#api-key-input");
  input.value = "";
  prompting = new Promise((resolve) => {
    dialog.querySelector("#api-key-form").onsubmit = (event) => {
      const key = input.value.trim();
      if (!key) {
        event.preventDefault();
        return;
      }
      sessionStorage.setItem(KEY_STORE, key);
      prompting = null;
      keyChanged();
      resolve(key);
    };
  });
  dialog.showModal();
  input.focus();
  return prompting;
}

// --- requests ---------------------------------------------------------------------------------------------------

function headersWith(extra) {
  const headers = new Headers(extra || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

/**
 * fetch() with the API key; a 401 asks for a key (once for all requests waiting) and tries again. A FormData body
 * goes as multipart/form-data (the browser writes the boundary), anything else as JSON.
 */
export async function request(path, {method = "GET", body, headers, signal} = {}) {
  for (;;) {
    const sentKey = apiKey();
    const init = {method, headers: headersWith(headers), signal, credentials: "omit", cache: "no-store"};
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers.set("Content-Type", "application/json");
    }
    const response = await fetch(path, init);
    if (response.status !== 401) return response;
    if (apiKey() !== sentKey) continue; // another request got a new key meanwhile
    await askForKey(Boolean(sentKey));
  }
}

async function errorOf(response, path) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch {
    detail = null;
  }
  const retryAfter = response.headers.get("Retry-After");
  return new ApiError(response.status, detail, path, retryAfter == null ? null : Number(retryAfter));
}

export async function getJSON(path, options = {}) {
  const response = await request(path, options);
  if (!response.ok) throw await errorOf(response, path);
  return response.json();
}

export async function postJSON(path, body, options = {}) {
  const response = await request(path, {...options, method: "POST", body});
  if (!response.ok) throw await errorOf(response, path);
  return response.json();
}

/**
 * A multipart POST (a FormData: files as Blobs, the rest as text). accept: "application/json" (the default) resolves
 * to the parsed answer, anything else (say "image/png") to the answer's Blob.
 */
export async function postForm(path, formData, {accept = "application/json", signal} = {}) {
  const response = await request(path, {method: "POST", body: formData, headers: {Accept: accept}, signal});
  if (!response.ok) throw await errorOf(response, path);
  return accept === "application/json" ? response.json() : response.blob();
}

/** A file the API serves, as a Blob; null when it is not there (404). */
export async function getBlob(path, options = {}) {
  const response = await request(path, options);
  if (response.status === 404) return null;
  if (!response.ok) throw await errorOf(response, path);
  return response.blob();
}

/** An image (or any file) the API serves, as an object URL for <img src>; null when it is not there (404). */
export async function blobURL(path, options = {}) {
  const blob = await getBlob(path, options);
  return blob && URL.createObjectURL(blob);
}

/**
 * A download the API serves (a checkpoint, say): fetched with the key header, so the key never goes into a URL.
 * Resolves to {url, name, bytes}: an object URL for <a download>, the file name the server gave in its
 * Content-Disposition header (else the path's last part), and the size received.
 */
export async function download(path, options = {}) {
  const response = await request(path, options);
  if (!response.ok) throw await errorOf(response, path);
  const blob = await response.blob();
  const name = fileNameOf(response.headers.get("Content-Disposition")) || path.split("/").pop();
  return {url: URL.createObjectURL(blob), name, bytes: blob.size};
}

function fileNameOf(disposition) {
  if (!disposition) return null;
  const encoded = /filename\*\s*=\s*UTF-8''([^;]+)/i.exec(disposition); // RFC 5987, when the name is not ASCII
  if (encoded) return decodeURIComponent(encoded[1].trim());
  const plain = /filename\s*=\s*("([^"]*)"|[^;]+)/i.exec(disposition);
  return plain ? (plain[2] ?? plain[1]).trim() : null;
}

// --- the event stream -------------------------------------------------------------------------------------------

/**
 * Reads a text/event-stream with fetch() (EventSource cannot send the Authorization header), calling
 * onEvent({event, data, id}) for each event; resolves when the server closes the stream.
 */
export async function readEventStream(path, {lastEventId, signal, onEvent, onOpen} = {}) {
  const headers = {Accept: "text/event-stream"};
  if (lastEventId != null) headers["Last-Event-ID"] = String(lastEventId);
  const response = await request(path, {headers, signal});
  if (!response.ok) throw await errorOf(response, path);
  if (onOpen) onOpen(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = {event: "", data: [], id: null};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an incomplete last line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) onEvent({event: event.event || "message", data: event.data.join("\n"), id: event.id});
        event = {event: "", data: [], id: null};
        continue;
      }
      if (line.startsWith(":")) continue; // a keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event.event = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
  }
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const isTerminal = (status) => TERMINAL.has(status);

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
});

/**
 * Follows a job live: onEpoch(row) for every epoch after `afterEpoch`, once each and in order; onStatus(job) when
 * the job changes; onEnd(status) once it is terminal and every row was delivered; onMode("stream" | "reconnecting" |
 * "ended"). Reads GET /jobs/{id}/events; a dropped stream resumes from the last epoch it delivered.
 */
export async function followJob(jobId, {afterEpoch = 0, onEpoch, onStatus, onEnd, onMode, signal} = {}) {
  let last = afterEpoch;
  const epoch = (row) => {
    if (row.epoch > last) {
      last = row.epoch;
      onEpoch?.(row);
    }
  };
  let failures = 0;
  while (!signal?.aborted) {
    let ended = null;
    try {
      await readEventStream(`/jobs/${jobId}/events`, {
        lastEventId: last,
        signal,
        onOpen: () => { failures = 0; onMode?.("stream"); },
        onEvent: ({event, data}) => {
          const value = JSON.parse(data);
          if (event === "epoch") epoch(value);
          else if (event === "status") onStatus?.(value);
          else if (event === "end") ended = value.status;
        },
      });
      if (ended) {
        onMode?.("ended");
        onEnd?.(ended);
        return;
      }
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && error.status === 404) throw error; // the job itself is gone
      failures += 1;
    }
    onMode?.("reconnecting");
    // Backing off, with a random half of the delay: the many tabs that lost an API restarting together come back
    // spread over a moment, not all in the same instant.
    const delay = Math.min(1000 * 2 ** failures, 15000);
    await sleep(delay / 2 + Math.random() * (delay / 2), signal);
  }
}

/** Every metric row of a job (all pages). */
export async function allMetrics(jobId, afterEpoch = 0, options = {}) {
  const rows = [];
  let after = afterEpoch;
  for (;;) {
    const page = await getJSON(`/jobs/${jobId}/metrics?after_epoch=${after}&limit=1000`, options);
    rows.push(...page.items);
    if (page.items.length < 1000) return {rows, status: page.status, next: page.next_after_epoch};
    after = page.next_after_epoch;
  }
}
