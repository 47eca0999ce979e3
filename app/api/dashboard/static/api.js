// The /v1 API as the dashboard uses it: every request carries "Authorization: Bearer <key>".
// The key lives in sessionStorage: it is gone when the tab closes, and never in a URL.

const KEY = "modelpress.apiKey";

export function getKey() { return sessionStorage.getItem(KEY); }
export function setKey(key) { sessionStorage.setItem(KEY, key); }
export function clearKey() { sessionStorage.removeItem(KEY); }

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${getKey()}`, ...extra };
}

// An RFC 9457 problem (or a network failure) as an Error with the server's fields.
export class ApiError extends Error {
  constructor(status, problem) {
    const p = problem || {};
    super(p.detail || p.title || `HTTP ${status}`);
    this.status = status;
    this.code = p.code || (status === 0 ? "network_error" : "http_error");
    this.title = p.title || (status === 0 ? "Network error" : `HTTP ${status}`);
    this.errors = Array.isArray(p.errors) ? p.errors : [];
  }
}

// Called on any 401, so a revoked key or an expired session returns to the sign-in form.
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

async function problemOf(resp) {
  try { return await resp.json(); } catch { return null; }
}

export async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { detail: String(e.message || e) });
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, await problemOf(resp));
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  return resp.status === 204 ? null : resp.json();
}

// The sign-in check: null when the API takes the key, else the problem (no 401 handler: the
// sign-in form shows it).
export async function checkKey(key) {
  try {
    const resp = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${key}` } });
    return resp.ok ? null : new ApiError(resp.status, await problemOf(resp));
  } catch (e) {
    return new ApiError(0, { detail: String(e.message || e) });
  }
}

// Ids are hex; encoded anyway so that nothing typed into a URL field can change the path.
const seg = encodeURIComponent;

export const api = {
  listJobs: (cursor, status) => {
    const q = new URLSearchParams({ limit: "20" });
    if (cursor) q.set("cursor", cursor);
    if (status) q.set("status", status);
    return request(`/v1/jobs?${q}`);
  },
  getJob: (id, signal) => request(`/v1/jobs/${seg(id)}`, { signal }),
  cancelJob: (id) => request(`/v1/jobs/${seg(id)}:cancel`, { method: "POST" }),
  getReport: (id) => request(`/v1/jobs/${seg(id)}/report`),
  listArtifacts: (id) => request(`/v1/jobs/${seg(id)}/artifacts`),
  createJob: (body, idempotencyKey) =>
    request("/v1/jobs", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey } }),
  eventsUrl: (id) => `/v1/jobs/${seg(id)}/events`,
};

// An upload is the raw request body (never a form). XMLHttpRequest rather than fetch: it
// reports upload progress, and the browser streams the File from disk either way.
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onerror = () => reject(new ApiError(0, { detail: `upload of ${file.name} failed` }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON: keep null */ }
      if (xhr.status === 201) { resolve(body); return; }
      const err = new ApiError(xhr.status, body);
      if (xhr.status === 401) onUnauthorized(err);
      reject(err);
    };
    xhr.send(file);
  });
}

export const uploadModel = (file, onProgress) =>
  upload(`/v1/models?filename=${seg(file.name)}`, file, onProgress);
export const uploadDataset = (file, modelId, onProgress) =>
  upload(`/v1/datasets?model_id=${seg(modelId)}&filename=${seg(file.name)}`, file, onProgress);

const hex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");

// Hash check of a download only where the browser offers it (a secure context: https or
// localhost) and the file is small enough to hash in memory twice over.
const HASH_LIMIT_BYTES = 256 * 1024 * 1024;

// Artifacts need the Authorization header, so a plain <a href> cannot fetch them: fetch the
// bytes, then hand the browser a blob: URL to save. Returns whether the sha256 matched the
// ETag (null when not checked).
export async function download(jobId, name) {
  const resp = await fetch(`/v1/jobs/${seg(jobId)}/artifacts/${seg(name)}`,
                           { headers: authHeaders() });
  if (!resp.ok) {
    const err = new ApiError(resp.status, await problemOf(resp));
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  const blob = await resp.blob();
  let verified = null;
  const etag = (resp.headers.get("ETag") || "").replaceAll('"', "");
  if (crypto.subtle && etag && blob.size <= HASH_LIMIT_BYTES) {
    verified = hex(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer())) === etag;
  }
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  // Revoked a little later: the save has started from the URL by then.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return verified;
}

// A random Idempotency-Key: getRandomValues works on plain http too (randomUUID does not).
export function randomKey() {
  return hex(crypto.getRandomValues(new Uint8Array(16)));
}
