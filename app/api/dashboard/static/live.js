// Live job state: the job's Server-Sent Events stream when the server has one, else polling.
//
// The stream needs the Authorization header, which EventSource cannot send, so it is read
// with fetch() and a ReadableStream reader, parsed as the HTML "event stream" format:
// "id: <n>\nevent: <type>\ndata: <json>\n\n". A server without the route (404 / 405) or
// one that answers anything but text/event-stream gets polled instead.

import { api, authHeaders } from "./api.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;           // polling period without a stream
const RETRY_MS = 1000;          // reconnect delay of a dropped stream (the server may change it)
const MAX_STREAM_FAILURES = 3;  // consecutive failed (re)connects before polling instead

// Incremental parser: feed() takes decoded text in arbitrary chunks (a chunk may end in the
// middle of a line, or between "\r" and "\n") and returns the complete events it closed.
export class EventStreamParser {
  constructor() {
    this.buf = "";
    this.lastId = null;
    this.retry = null;
    this.reset();
  }

  reset() { this.type = ""; this.data = []; }

  feed(text) {
    this.buf += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      // A lone trailing "\r" may be the first half of "\r\n": wait for the next chunk.
      if (!m || (m[0] === "\r" && m.index === this.buf.length - 1)) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    return out;
  }

  line(line) {
    if (line === "") {
      if (this.data.length === 0) { this.reset(); return null; }
      const ev = { id: this.lastId, type: this.type || "message", data: this.data.join("\n") };
      this.reset();
      return ev;
    }
    if (line.startsWith(":")) return null;  // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

function parseData(ev) {
  try { return JSON.parse(ev.data); } catch { return { raw: ev.data }; }
}

// Reads one connection of the stream. Returns "unavailable" (no stream on this server),
// "ended" (the server closed it) or "failed" (network error).
async function readStream(jobId, parser, onEvent, signal) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (parser.lastId !== null) headers["Last-Event-ID"] = parser.lastId;
  let resp;
  try {
    resp = await fetch(api.eventsUrl(jobId), { headers, signal, cache: "no-store" });
  } catch {
    return "failed";
  }
  const type = resp.headers.get("Content-Type") || "";
  if (!resp.ok || !type.startsWith("text/event-stream") || !resp.body) {
    resp.body?.cancel().catch(() => {});
    return resp.status >= 500 ? "failed" : "unavailable";
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "ended";
      for (const ev of parser.feed(value)) onEvent(ev.type, parseData(ev), ev.id);
    }
  } catch {
    return signal.aborted ? "ended" : "failed";
  } finally {
    reader.releaseLock();
  }
}

// Follows one job until it is terminal or `signal` aborts.
//   onJob(job)              the job resource, whenever it was (re)read
//   onEvent(type, data, id) each stream event (stage / progress / candidate / outcome)
//   onMode(mode)            "stream" or "poll": how the job is followed now
// With streamOnly, a server without a stream ends the watch (returns "unavailable") instead
// of polling: the job list polls its whole page in one request instead.
export async function watchJob(jobId, { onJob, onEvent = () => {}, onMode = () => {},
                                        signal, streamOnly = false }) {
  let job = await api.getJob(jobId, signal);
  onJob(job);
  if (TERMINAL.has(job.status)) return "terminal";

  const parser = new EventStreamParser();
  let failures = 0;
  let refreshing = null;
  const refresh = () => {  // at most one re-read in flight
    refreshing ??= api.getJob(jobId, signal).then((j) => { job = j; onJob(j); })
      .catch(() => {}).finally(() => { refreshing = null; });
    return refreshing;
  };
  while (!signal.aborted && failures < MAX_STREAM_FAILURES) {
    const result = await readStream(jobId, parser, (type, data, id) => {
      failures = 0;
      onMode("stream");
      onEvent(type, data, id);
      // Stage changes and the outcome re-read the resource: it is the authoritative state
      // (metrics, error, timestamps), whatever fields an event carries.
      if (type === "stage" || type === "outcome") refresh();
    }, signal);
    if (result === "unavailable" && parser.lastId === null) break;
    await refresh();
    if (TERMINAL.has(job.status) || signal.aborted) return "terminal";
    if (result !== "ended") failures += 1;
    await sleep(parser.retry ?? RETRY_MS, signal);
  }
  if (signal.aborted) return "aborted";
  if (streamOnly) return "unavailable";

  onMode("poll");
  while (!signal.aborted) {
    await sleep(POLL_MS, signal);
    if (signal.aborted) break;
    try {
      job = await api.getJob(jobId, signal);
    } catch (e) {
      if (e.name === "AbortError") break;
      if (e.status === 401 || e.status === 404) throw e;
      continue;  // a blip (restart, 503): the next poll retries
    }
    onJob(job);
    if (TERMINAL.has(job.status)) return "terminal";
  }
  return "aborted";
}
