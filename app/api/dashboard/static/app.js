// The ModelPress dashboard: sign in, job list, job page, upload + submit. Hash routes:
// #/jobs, #/jobs/<id>, #/new. Every text from the server goes in through textContent.

import {
  ApiError, api, checkKey, clearKey, download, getKey, randomKey, setKey,
  setUnauthorizedHandler, uploadDataset, uploadModel,
} from "./api.js";
import { TERMINAL, watchJob } from "./live.js";
import { paretoSvg } from "./pareto.js";

// The engine's stages in the order a job goes through them (app/engine/types.py STAGES;
// the search alternates prune and quantize per candidate, then measures, then distills).
const STAGES = ["load", "baseline", "prune", "quantize", "evaluate", "distill", "export"];
const MAX_LIST_STREAMS = 3;  // HTTP/1.1 browsers open 6 connections per origin: keep 3 free
const LIST_REFRESH_MS = { streaming: 10_000, polling: 2000 };

// --- small DOM and format helpers --------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// replaceChildren without the null / false placeholders of optional parts (it would print
// them as text).
function fill(parent, ...nodes) {
  parent.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}
const main = () => document.getElementById("main");
function show(...nodes) { fill(main(), ...nodes); }

const kb = (bytes) => bytes / 1000;                    // KB = 10^3 bytes, as MB in the API
function size(bytes) {
  if (bytes == null) return "–";
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(2)} MB`;
  return `${kb(bytes).toFixed(1)} KB`;
}
const ms = (v) => (v == null ? "–" : `${v.toFixed(v < 1 ? 3 : 2)} ms`);
const pct = (q) => (q == null ? "–" : `${(q * 100).toFixed(2)} %`);
const ratio = (v) => (v == null || !Number.isFinite(v) ? "–" : `${v.toFixed(2)}×`);
function seconds(s) {
  if (s == null) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const span = (a, b) => (a && b ? (new Date(b) - new Date(a)) / 1000 : null);

function badge(status) { return h("span", { class: `badge ${status}`, "data-status": status }, status); }

function progressBar(fraction, label) {
  const bar = h("div", { class: "bar-fill" });
  bar.style.width = `${Math.round(Math.min(Math.max(fraction, 0), 1) * 100)}%`;
  return h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                    "aria-valuenow": Math.round(fraction * 100), "aria-label": label }, bar);
}

function problemBox(err) {
  const items = (err.errors || []).map((e) => h("li", {}, `${(e.loc || []).join(".")}: ${e.msg}`));
  return h("div", { class: "problem", role: "alert" },
           h("strong", {}, `${err.title}`), err.code ? h("code", {}, err.code) : null,
           h("p", {}, err.message), items.length ? h("ul", {}, items) : null);
}

// Views register what must stop when the user navigates away (streams, timers).
let viewAbort = new AbortController();

// --- sign in -------------------------------------------------------------------------------

function signInView(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", id: "api-key", name: "api-key", required: true,
                             autocomplete: "off", placeholder: "mp_…", size: 48 });
  const status = h("div", { id: "sign-in-status" });
  const form = h("form", { id: "sign-in", class: "card narrow", onsubmit: async (e) => {
    e.preventDefault();
    const err = await checkKey(input.value.trim());
    if (err) { fill(status, problemBox(err)); return; }
    setKey(input.value.trim());
    route();
  } },
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste an API key (", h("code", {}, "modelpress admin create-key"),
    "; the embedded server writes one to ", h("code", {}, "var/dev-api-key"),
    "). It is kept in this tab's session storage only."),
  h("label", { for: "api-key" }, "API key"), input,
  h("button", { type: "submit" }, "Sign in"), status);
  if (message) status.append(h("div", { class: "problem" }, message));
  show(form);
  input.focus();
}

// --- job list ------------------------------------------------------------------------------

function jobRow(job) {
  const cells = {
    status: h("td", {}, badge(job.status)),
    stage: h("td", { class: "stage" }, job.stage || "–"),
    progress: h("td", { class: "progress" }),
    message: h("td", { class: "message" }, job.message || (job.error && job.error.code) || ""),
  };
  const row = h("tr", { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id.slice(0, 12))),
    cells.status, cells.stage, cells.progress,
    h("td", {}, when(job.created_at)), cells.message);
  const update = (j) => {
    fill(cells.status, badge(j.status));
    cells.stage.textContent = j.stage || "–";
    fill(cells.progress, progressBar(j.progress, `progress of ${j.id}`),
                                   h("span", {}, `${Math.round(j.progress * 100)} %`));
    cells.message.textContent = j.message || (j.error && j.error.code) || "";
  };
  update(job);
  return { row, update };
}

function jobsView() {
  const signal = viewAbort.signal;
  const filter = h("select", { id: "status-filter", "aria-label": "status" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map(
      (s) => h("option", { value: s }, s || "any status")));
  const body = h("tbody", {});
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More");
  const status = h("div", {});
  const table = h("table", { id: "jobs", class: "jobs" },
    h("thead", {}, h("tr", {}, ["Job", "Status", "Stage", "Progress", "Created", "Message"]
      .map((t) => h("th", {}, t)))), body);
  let cursor = null;
  let rows = new Map();           // job id -> {row, update}
  let streams = new Map();        // job id -> AbortController of its stream
  let noStream = false;           // the server has no event stream: poll the page instead
  let timer = null;

  function follow(job) {
    if (noStream || streams.size >= MAX_LIST_STREAMS || streams.has(job.id)
        || TERMINAL.has(job.status)) return;
    const ctl = new AbortController();
    signal.addEventListener("abort", () => ctl.abort(), { once: true });
    streams.set(job.id, ctl);
    watchJob(job.id, { signal: ctl.signal, streamOnly: true,
                       onJob: (j) => rows.get(j.id)?.update(j),
                       onEvent: (type, data) => {
                         if (type === "progress" && rows.has(job.id)) {
                           rows.get(job.id).update({ ...job, ...pickLive(data), id: job.id });
                         }
                       } })
      .then((r) => { if (r === "unavailable") noStream = true; })
      .catch(() => {})
      .finally(() => { streams.delete(job.id); });
  }

  async function load(append) {
    let page;
    try {
      page = await api.listJobs(append ? cursor : null, filter.value || null);
    } catch (err) {
      if (err.name !== "AbortError") fill(status, problemBox(err));
      return;
    }
    fill(status);
    if (!append) { fill(body); rows = new Map(); }
    for (const job of page.items) {
      const r = jobRow(job);
      rows.set(job.id, r);
      body.append(r.row);
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
    if (!page.items.length && !append) {
      body.append(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No jobs yet. ",
        h("a", { href: "#/new" }, "Submit one"), ".")));
    }
    for (const job of page.items) follow(job);
    schedule(page.items);
  }

  function schedule(items) {
    clearTimeout(timer);
    if (signal.aborted) return;
    const active = items.some((j) => !TERMINAL.has(j.status));
    const ms = active && (noStream || items.filter((j) => !TERMINAL.has(j.status)).length
                                       > MAX_LIST_STREAMS)
      ? LIST_REFRESH_MS.polling : LIST_REFRESH_MS.streaming;
    timer = setTimeout(() => load(false), ms);  // also picks up jobs submitted elsewhere
  }
  signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
  filter.addEventListener("change", () => load(false));
  more.addEventListener("click", () => load(true));

  show(h("section", {},
    h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), filter,
      h("a", { href: "#/new", class: "button" }, "New job")),
    status, table, more));
  load(false);
}

// The live fields an event may carry; absent ones are left as they are.
function pickLive(data) {
  const out = {};
  for (const k of ["status", "stage", "progress", "message", "eta_s", "activity"]) {
    if (data && data[k] !== undefined) out[k] = data[k];
  }
  return out;
}

// --- new job -------------------------------------------------------------------------------

function field(label, input, hint) {
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input,
           hint ? h("small", {}, hint) : null);
}
const num = (id, attrs = {}) => h("input", { type: "number", id, name: id, step: "any", ...attrs });

function newJobView() {
  const f = {
    model: h("input", { type: "file", id: "model-file", accept: ".pt2,.onnx" }),
    modelId: h("input", { type: "text", id: "model-id", placeholder: "or an uploaded model id" }),
    data: h("input", { type: "file", id: "data-file", accept: ".npz,.safetensors" }),
    dataId: h("input", { type: "text", id: "data-id", placeholder: "or an uploaded data set id" }),
    evalData: h("input", { type: "file", id: "eval-file", accept: ".npz,.safetensors" }),
    maxSize: num("max-size-mb", { min: 0 }),
    maxLatency: num("max-latency-ms", { min: 0 }),
    maxDrop: num("max-accuracy-drop", { min: 0, max: 1 }),
    objective: h("select", { id: "objective" }, h("option", {}, "smallest"),
                 h("option", {}, "fastest")),
    batch: num("batch-size", { value: 1, min: 1, step: 1 }),
    threads: num("threads", { value: 2, min: 1, step: 1 }),
    budget: num("time-budget-s", { value: 600, min: 1 }),
    device: h("select", { id: "device" }, ["auto", "cpu", "cuda"].map((d) => h("option", {}, d))),
    seed: num("seed", { value: 0, min: 0, step: 1 }),
    recipe: h("textarea", { id: "recipe", rows: 3,
                            placeholder: '{"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 3}' }),
  };
  const status = h("div", { id: "submit-status", "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Upload and submit");
  const idem = randomKey();  // one per form: a resubmit after a lost answer is the same job

  function step(text, fraction) {
    fill(status, h("p", {}, text),
                           fraction == null ? null : progressBar(fraction, text));
  }

  async function onSubmit(e) {
    e.preventDefault();
    submit.disabled = true;
    try {
      let recipe = null;
      if (f.recipe.value.trim()) {
        try { recipe = JSON.parse(f.recipe.value); } catch (err) {
          throw new ApiError(400, { title: "Recipe is not JSON", detail: String(err.message),
                                    code: "bad_request" });
        }
      }
      let modelId = f.modelId.value.trim();
      if (!modelId) {
        const file = f.model.files[0];
        if (!file) throw new ApiError(400, { title: "No model", detail: "choose a .pt2 or .onnx file, or give a model id", code: "bad_request" });
        const m = await uploadModel(file, (p) => step(`Uploading ${file.name}…`, p));
        modelId = m.id;
      }
      let dataId = f.dataId.value.trim();
      if (!dataId) {
        const file = f.data.files[0];
        if (!file) throw new ApiError(400, { title: "No data", detail: "choose a .npz or .safetensors file, or give a data set id", code: "bad_request" });
        dataId = (await uploadDataset(file, modelId, (p) => step(`Uploading ${file.name}…`, p))).id;
      }
      let evalId = null;
      if (f.evalData.files[0]) {
        const file = f.evalData.files[0];
        evalId = (await uploadDataset(file, modelId, (p) => step(`Uploading ${file.name}…`, p))).id;
      }
      const constraints = { objective: f.objective.value };
      const put = (k, input, integer) => {
        if (input.value !== "") constraints[k] = integer ? parseInt(input.value, 10) : Number(input.value);
      };
      put("max_size_mb", f.maxSize); put("max_latency_ms", f.maxLatency);
      put("max_accuracy_drop", f.maxDrop); put("batch_size", f.batch, true);
      put("threads", f.threads, true); put("time_budget_s", f.budget);
      const body = { model_id: modelId, dataset_id: dataId, constraints, device: f.device.value,
                     seed: parseInt(f.seed.value || "0", 10) };
      if (evalId) body.eval_dataset_id = evalId;
      if (recipe) body.recipe = recipe;
      step("Submitting the job…");
      const job = await api.createJob(body, idem);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      fill(status, problemBox(err));
    } finally {
      submit.disabled = false;
    }
  }

  show(h("form", { id: "new-job", class: "card", onsubmit: onSubmit },
    h("h1", {}, "New job"),
    h("fieldset", {}, h("legend", {}, "Model and data"),
      field("Model (.pt2 or .onnx)", f.model), f.modelId,
      field("Data (.npz or .safetensors: the model's input names, optional labels)", f.data),
      f.dataId,
      field("Held-out evaluation data (optional)", f.evalData)),
    h("fieldset", {}, h("legend", {}, "Constraints (at least one limit, or a recipe)"),
      h("div", { class: "grid3" },
        field("Max size, MB", f.maxSize, "of model.onnx, 10⁶ bytes"),
        field("Max latency, ms", f.maxLatency, "ONNX Runtime p50"),
        field("Max accuracy drop", f.maxDrop, "absolute: 0.01 = one point"),
        field("Objective", f.objective), field("Batch size", f.batch), field("Threads", f.threads),
        field("Time budget, s", f.budget), field("Device", f.device), field("Seed", f.seed))),
    h("fieldset", {}, h("legend", {}, "Recipe (optional, skips the search)"),
      field("Recipe JSON", f.recipe)),
    submit, status));
}

// --- job page ------------------------------------------------------------------------------

// One shape for a candidate from the report (Candidate.to_dict), the job's metrics summary,
// or a "candidate" event.
function normCandidate(c, i) {
  const src = c.candidate ?? c;
  const m = src.metrics ?? src;
  return {
    index: c.index ?? c.position ?? src.index ?? i,
    recipe: src.recipe ?? {}, feasible: !!src.feasible, distilled: !!src.distilled,
    reasons: src.reasons ?? [],
    metrics: { size_bytes: m.size_bytes, latency_p50_ms: m.latency_p50_ms,
               latency_p95_ms: m.latency_p95_ms, quality: m.quality, quality_kind: m.quality_kind,
               per_class_accuracy: m.per_class_accuracy, agreement: m.agreement },
  };
}

// pareto_front holds candidate indices; accept objects with an index too (a typed result).
function frontSet(front) {
  return new Set((front || []).map((e) => (typeof e === "number" ? e
    : e.index ?? e.candidate_index ?? e.candidate ?? e.id)));
}

function recipeText(r) {
  if (!r || !Object.keys(r).length) return "–";
  const parts = [`prune ${Math.round((r.prune_ratio ?? 0) * 100)} %`];
  if (r.prune_mode && r.prune_mode !== "structured") parts.push(r.prune_mode);
  parts.push(r.quant ?? "?");
  if (r.distill_epochs) parts.push(`distill ${r.distill_epochs} ep`);
  return parts.join(" · ");
}

function constraintsText(c) {
  const parts = [];
  if (c.max_size_mb != null) parts.push(`size ≤ ${c.max_size_mb} MB`);
  if (c.max_latency_ms != null) parts.push(`p50 ≤ ${c.max_latency_ms} ms`);
  if (c.max_accuracy_drop != null) parts.push(`drop ≤ ${+(c.max_accuracy_drop * 100).toFixed(2)} pts`);
  parts.push(`batch ${c.batch_size ?? 1}`, `${c.threads ?? 2} threads`, c.objective ?? "smallest",
             `budget ${seconds(c.time_budget_s ?? null)}`);
  return parts.join(" · ");
}

function activityText(a) {
  if (!a || typeof a !== "object") return null;
  const parts = [];
  if (a.candidate_index != null) {  // 1-based
    parts.push(`candidate ${a.candidate_index}${a.candidates_total != null ? ` of ${a.candidates_total}` : ""}`);
  }
  if (a.candidate) parts.push(typeof a.candidate === "string" ? a.candidate : recipeText(a.candidate));
  if (a.epoch != null) parts.push(`epoch ${a.epoch}${a.epochs_total != null ? ` of ${a.epochs_total}` : ""}`);
  return parts.length ? parts.join(" · ") : null;
}

function timeline(job, observed) {
  const secs = (job.metrics && job.metrics.stage_seconds) || {};
  const terminal = TERMINAL.has(job.status);
  const list = h("ol", { class: "timeline", id: "timeline" });
  const queued = span(job.created_at, job.started_at ?? (terminal ? job.finished_at : null));
  list.append(h("li", { class: `step ${job.started_at || terminal ? "done" : "active"}`,
                        "data-stage": "queued" },
                h("span", { class: "name" }, "queued"),
                h("span", { class: "secs" }, seconds(queued))));
  // Stages this page does not know (a server newer than it: "store") go before the end.
  const extra = [...Object.keys(secs), ...observed.keys(), job.stage]
    .filter((s) => s && s !== "done" && !STAGES.includes(s));
  const stages = [...STAGES, ...new Set(extra)];
  const total = stages.reduce((a, s) => a + (secs[s] ?? observed.get(s) ?? 0), 0);
  for (const s of stages) {
    const t = secs[s] ?? observed.get(s);
    let state = "pending";
    if (job.stage === s && !terminal) state = "active";
    else if (t != null) state = "done";
    else if (terminal) state = "skipped";
    if (state === "active" && job.status !== "running") state = "pending";
    const bar = h("span", { class: "share" });
    bar.style.width = `${total > 0 && t ? Math.max(2, (t / total) * 100) : 0}%`;
    list.append(h("li", { class: `step ${state}`, "data-stage": s },
      h("span", { class: "name" }, s), h("span", { class: "secs" }, t != null ? seconds(t) : ""),
      h("span", { class: "track" }, bar)));
  }
  list.append(h("li", { class: `step ${terminal ? "done" : "pending"}`, "data-stage": "done" },
    h("span", { class: "name" }, terminal ? job.status : "done"),
    h("span", { class: "secs" }, terminal ? seconds(span(job.started_at, job.finished_at)) : "")));
  return list;
}

function candidatesTable(cands, front, chosen, baseline) {
  const head = ["#", "Recipe", "Size", "Smaller", "p50 / p95", "Faster", "Quality", "Δ pts",
                "Feasible"];
  const rows = cands.map((c) => {
    const m = c.metrics;
    const dq = baseline && m.quality != null ? (m.quality - baseline.quality) * 100 : null;
    const cls = [c.index === chosen ? "chosen" : "", front.has(c.index) ? "front" : ""]
      .filter(Boolean).join(" ");
    return h("tr", { class: cls || null, "data-index": c.index, "data-feasible": String(c.feasible) },
      h("td", {}, c.index, c.index === chosen ? h("span", { class: "tag" }, "chosen") : null,
        front.has(c.index) ? h("span", { class: "tag pareto" }, "Pareto") : null),
      h("td", { class: "recipe" }, recipeText(c.recipe)), h("td", { class: "num" }, size(m.size_bytes)),
      h("td", { class: "num" }, baseline ? ratio(baseline.size_bytes / m.size_bytes) : "–"),
      h("td", { class: "num" }, `${ms(m.latency_p50_ms)} / ${ms(m.latency_p95_ms)}`),
      h("td", { class: "num" }, baseline ? ratio(baseline.latency_p50_ms / m.latency_p50_ms) : "–"),
      h("td", { class: "num" }, pct(m.quality)),
      h("td", { class: `num ${dq != null && dq < 0 ? "neg" : ""}` }, dq == null ? "–" : `${dq >= 0 ? "+" : ""}${dq.toFixed(2)}`),
      h("td", { class: c.feasible ? "feasible" : "reasons" },
        c.feasible ? "yes" : `no: ${(c.reasons || []).join("; ")}`));
  });
  return h("table", { id: "candidates", class: "candidates" },
           h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))), h("tbody", {}, rows));
}

function perClassDeltas(baseline, chosenMetrics) {
  const base = baseline && baseline.per_class_accuracy;
  const mine = chosenMetrics && chosenMetrics.per_class_accuracy;
  if (!base || !mine) return null;
  const classes = Object.keys(base).sort((a, b) => Number(a) - Number(b) || a.localeCompare(b));
  const deltas = classes.map((k) => ({ k, b: base[k], c: mine[k], d: ((mine[k] ?? 0) - base[k]) * 100 }));
  const worst = Math.min(...deltas.map((x) => x.d));
  const scaleMax = Math.max(1, ...deltas.map((x) => Math.abs(x.d)));  // pts at a full half-bar
  const rows = deltas.map((x) => {
    const bar = h("span", { class: `delta-bar ${x.d < 0 ? "neg" : "pos"}` });
    bar.style.width = `${(Math.abs(x.d) / scaleMax) * 50}%`;
    return h("tr", { class: x.d === worst && worst < 0 ? "worst" : null, "data-class": x.k },
      h("td", {}, x.k), h("td", { class: "num" }, pct(x.b)), h("td", { class: "num" }, pct(x.c)),
      h("td", { class: "num" }, `${x.d >= 0 ? "+" : ""}${x.d.toFixed(2)}`),
      h("td", { class: "delta" }, h("span", { class: "axis" }), bar));
  });
  return h("table", { id: "per-class", class: "per-class" },
    h("thead", {}, h("tr", {}, ["Class", "Baseline", "Chosen", "Δ pts", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

function artifactsList(jobId, items) {
  if (!items.length) return h("p", {}, "No artifacts.");
  return h("ul", { id: "artifacts", class: "artifacts" }, items.map((a) => {
    const note = h("span", { class: "note" });
    const btn = h("button", { type: "button", class: "secondary", "data-artifact": a.name,
      onclick: async () => {
        btn.disabled = true;
        note.textContent = "downloading…";
        try {
          const ok = await download(jobId, a.name);
          note.textContent = ok === null ? "saved" : ok ? "saved, sha256 verified" : "sha256 MISMATCH";
          note.className = `note ${ok === false ? "bad" : "good"}`;
        } catch (err) {
          fill(note, problemBox(err));
        } finally { btn.disabled = false; }
      } }, a.name);
    return h("li", {}, btn, h("span", {}, size(a.size_bytes)),
             h("code", { class: "sha", title: a.sha256 }, a.sha256.slice(0, 16)), note);
  }));
}

function jobView(id) {
  const signal = viewAbort.signal;
  const head = h("section", { id: "job-head" });
  const stages = h("section", { id: "job-stages" });
  const results = h("section", { id: "job-results" });
  const state = { job: null, report: null, artifacts: null, live: [], observed: new Map(),
                  stageStart: null, mode: null, resultsFor: null };
  show(h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")), head, stages, results);

  // Wall seconds per stage of a job still running (the worker's own figures replace them
  // when it ends): at the event's server time when it has one (a replayed stream gives the
  // real history), else when this page saw the change.
  function observe(job, at) {
    const now = Number.isFinite(at) ? at : Date.now() / 1000;
    if (state.stageStart && state.stageStart.stage !== job.stage) {
      const s = state.stageStart.stage;
      state.observed.set(s, (state.observed.get(s) ?? 0) + Math.max(0, now - state.stageStart.t));
      state.stageStart = null;
    }
    if (job.status === "running" && job.stage && !state.stageStart) {
      state.stageStart = { stage: job.stage, t: now };
    }
  }

  function renderHead() {
    const j = state.job;
    const eta = j.eta_s != null && !TERMINAL.has(j.status) ? `ETA ${seconds(j.eta_s)}` : null;
    const activity = activityText(j.activity);
    const cancel = !TERMINAL.has(j.status) && !j.cancel_requested
      ? h("button", { type: "button", class: "danger", id: "cancel", onclick: async () => {
          try { state.job = await api.cancelJob(j.id); renderHead(); } catch (err) {
            head.append(problemBox(err));
          }
        } }, "Cancel") : null;
    const live = TERMINAL.has(j.status) ? null
      : h("span", { class: "live", id: "live-mode", "data-live": state.mode || "connecting" },
          state.mode === "stream" ? "live: event stream"
            : state.mode === "poll" ? "live: polling every 1 s" : "connecting…");
    fill(head,
      h("div", { class: "toolbar" }, h("h1", {}, "Job ", h("span", { class: "mono" }, j.id)),
        badge(j.status), live, cancel),
      h("div", { class: "progress-line" }, progressBar(j.progress, "job progress"),
        h("strong", { id: "progress-pct" }, `${Math.round(j.progress * 100)} %`),
        h("span", {}, j.stage || "waiting for a worker"), eta ? h("span", { id: "eta" }, eta) : null,
        activity ? h("span", { id: "activity" }, activity) : null),
      j.message ? h("p", { class: "message", id: "job-message" }, j.message) : null,
      j.error ? h("div", { class: "problem", id: "job-error" }, h("code", {}, j.error.code),
                  h("p", {}, j.error.detail || "")) : null,
      h("dl", { class: "meta" },
        h("dt", {}, "created"), h("dd", {}, when(j.created_at)),
        h("dt", {}, "started"), h("dd", {}, when(j.started_at)),
        h("dt", {}, "finished"), h("dd", {}, when(j.finished_at)),
        h("dt", {}, "attempt"), h("dd", {}, `${j.attempt} of ${j.max_attempts}`),
        h("dt", {}, "device"), h("dd", {}, `${j.device} (queue ${j.queue})`),
        h("dt", {}, "model"), h("dd", { class: "mono" }, j.model_id),
        h("dt", {}, "data"), h("dd", { class: "mono" }, j.dataset_id),
        h("dt", {}, "constraints"), h("dd", {}, constraintsText(j.constraints || {})),
        j.recipe ? h("dt", {}, "recipe") : null,
        j.recipe ? h("dd", { title: JSON.stringify(j.recipe) }, recipeText(j.recipe)) : null));
    fill(stages, h("h2", {}, "Stages"), timeline(j, state.observed));
  }

  function renderResults() {
    const j = state.job, r = state.report;
    const baseline = r ? r.baseline : j.metrics && j.metrics.baseline;
    const source = r ? r.candidates : (j.metrics && j.metrics.candidates) || state.live;
    const cands = (source || []).map(normCandidate);
    if (!cands.length) { fill(results); return; }
    const front = r ? frontSet(r.pareto_front) : new Set();
    let chosen = r && Number.isInteger(r.chosen_index) ? r.chosen_index : null;
    if (chosen === null && j.metrics && j.metrics.best) {
      const key = JSON.stringify(j.metrics.best.recipe);
      chosen = cands.find((c) => JSON.stringify(c.recipe) === key)?.index ?? null;
    }
    const chosenC = cands.find((c) => c.index === chosen);
    const kind = (baseline && baseline.quality_kind) || cands[0].metrics.quality_kind || "quality";
    const parts = [];
    if (r && r.ratios) {
      parts.push(h("div", { class: "cards", id: "ratios" },
        h("div", { class: "stat" }, h("b", {}, ratio(r.ratios.size)), h("span", {}, "smaller")),
        h("div", { class: "stat" }, h("b", {}, ratio(r.ratios.speedup)), h("span", {}, "faster (p50)")),
        h("div", { class: "stat" }, h("b", {}, `${(r.ratios.quality_drop * 100).toFixed(2)} pts`),
          h("span", {}, `${kind} drop`)),
        chosenC ? h("div", { class: "stat wide" }, h("b", {}, recipeText(chosenC.recipe)),
                    h("span", {}, "chosen recipe")) : null));
    }
    const warnings = (r && r.warnings) || [];
    if (warnings.length) {
      parts.push(h("div", { class: "warnings", id: "warnings" }, h("strong", {}, "Warnings"),
                    h("ul", {}, warnings.map((w) => h("li", {}, w)))));
    }
    const plotted = cands.filter((c) => c.metrics.size_bytes > 0 && c.metrics.latency_p50_ms > 0);
    const c = j.constraints || {};
    parts.push(h("h2", {}, "Pareto plot"), h("figure", { id: "pareto" }, paretoSvg({
      points: plotted.map((x) => ({ index: x.index, sizeKB: kb(x.metrics.size_bytes),
        latencyMs: x.metrics.latency_p50_ms, quality: x.metrics.quality, feasible: x.feasible,
        label: `#${x.index} ${recipeText(x.recipe)}: ${size(x.metrics.size_bytes)}, ` +
               `${ms(x.metrics.latency_p50_ms)}, ${pct(x.metrics.quality)}` })),
      front, chosen,
      baseline: baseline && baseline.size_bytes ? { sizeKB: kb(baseline.size_bytes),
        latencyMs: baseline.latency_p50_ms, quality: baseline.quality,
        label: `${size(baseline.size_bytes)}, ${ms(baseline.latency_p50_ms)}, ${pct(baseline.quality)}` } : null,
      limits: { sizeKB: c.max_size_mb ? c.max_size_mb * 1000 : null,
                latencyMs: c.max_latency_ms ?? null },
      qualityName: kind,
    }), h("figcaption", {}, `x: model.onnx size, y: ONNX Runtime p50 at batch ${c.batch_size ?? 1}` +
        `, ${c.threads ?? 2} threads; colour: ${kind}. Pareto-optimal on size, latency and ${kind}.`)));
    parts.push(h("h2", {}, `Candidates (${cands.length})`),
               h("div", { class: "table-wrap" }, candidatesTable(cands, front, chosen, baseline)));
    const deltas = perClassDeltas(baseline, chosenC && chosenC.metrics);
    if (deltas) parts.push(h("h2", {}, "Per-class accuracy, chosen vs baseline"), deltas);
    if (state.artifacts) {
      parts.push(h("h2", {}, "Artifacts"), artifactsList(j.id, state.artifacts));
    }
    fill(results, ...parts);
  }

  async function finish(job) {  // once terminal: the report and the artifacts
    const [report, arts] = await Promise.allSettled([api.getReport(job.id), api.listArtifacts(job.id)]);
    state.report = report.status === "fulfilled" ? report.value : null;
    state.artifacts = arts.status === "fulfilled" ? arts.value.items : [];
    renderResults();
  }

  let finished = false;
  watchJob(id, {
    signal,
    onJob: (job) => {
      state.job = job;
      observe(job);
      renderHead();
      if (TERMINAL.has(job.status) && !finished) { finished = true; finish(job); }
    },
    onMode: (m) => { if (state.mode !== m) { state.mode = m; if (state.job) renderHead(); } },
    onEvent: (type, data) => {
      if (!state.job) return;
      if (type === "candidate") {
        state.live.push(data);
        if (!state.report) renderResults();
      } else if (type === "progress" || type === "stage") {
        state.job = { ...state.job, ...pickLive(data) };
        observe(state.job, data && data.at ? Date.parse(data.at) / 1000 : undefined);
        renderHead();
      }
    },
  }).catch((err) => {
    if (err.name !== "AbortError") fill(head, problemBox(err));
  });
}

// --- routing -------------------------------------------------------------------------------

function route() {
  viewAbort.abort();
  viewAbort = new AbortController();
  if (!getKey()) { signInView(); return; }
  document.getElementById("nav").hidden = false;
  const hash = location.hash || "#/jobs";
  const m = /^#\/jobs\/([^/]+)$/.exec(hash);
  if (m) jobView(decodeURIComponent(m[1]));
  else if (hash === "#/new") newJobView();
  else jobsView();
}

setUnauthorizedHandler((err) => {
  clearKey();
  viewAbort.abort();
  signInView(`Signed out: ${err.message}`);
});
document.getElementById("sign-out").addEventListener("click", () => {
  clearKey();
  route();
});
window.addEventListener("hashchange", route);
route();
