"""Run one job in a worker: claim the lease, fetch inputs, run the engine, store the outcome.

Every database write here is its own short transaction (the worker may run for an hour; no
transaction stays open across engine work). Bytes are stored before the rows that point at them,
and all the artifact rows of an attempt are committed in the same transaction as the job's
outcome: a job lists either its whole set of artifacts or none. Bytes of an attempt that did not
finish (a storage error, a time limit, a lost lease) are deleted by that attempt; bytes and work
files of an attempt whose process was killed are deleted by the next attempt when it claims the
job (they live under ``jobs/<id>/attempt-<n>/`` and ``<tmp>/modelpress-<id>-*``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db.models import Artifact, JobMetric, JobStatus
from app.db.repositories import artifacts as artifact_repo
from app.db.repositories import datasets as dataset_repo
from app.db.repositories import job_metrics as metric_repo
from app.db.repositories import jobs as job_repo
from app.db.repositories import models as model_repo
from app.db.session import session_factory
from app.engine.errors import Cancelled, EngineError, TimeBudgetExceeded
from app.engine.types import Constraints, JobSpec, ProgressStatus, Recipe, Result
from app.services import events
from app.storage import ArtifactStore, StorageWriteError, file_chunks, get_store

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".onnx": "application/octet-stream",
    ".pt2": "application/zip",
    ".json": "application/json",
    ".data": "application/octet-stream",
}


class LeaseLost(Cancelled):
    """Our lease was taken over (the reaper decided this worker was dead): stop quietly."""

    code = "lease_lost"


@dataclass(frozen=True)
class _Inputs:
    job_id: str
    attempt: int
    spec: JobSpec
    model_key: str
    model_format: str
    data_key: str
    data_suffix: str
    eval_key: str | None
    eval_suffix: str | None


class _Lease:
    """Heartbeat thread + progress writer sharing the cancel/lost flags of one claimed job."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, job_id: str,
                 worker_id: str) -> None:
        self.sessions, self.settings = sessions, settings
        self.job_id, self.worker_id = job_id, worker_id
        self.cancel_requested = False
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_write = 0.0  # monotonic seconds
        self._stage: str | None = None
        self._status: ProgressStatus | None = None  # the engine's latest overall status
        self._stage_started = time.monotonic()
        # The Celery soft limit again, checked at every progress point: its exception is
        # raised asynchronously wherever the task happens to be, and code that catches
        # Exception there (a search skipping a candidate that failed to build) would swallow
        # it and run on until the hard limit kills the process (then: worker_lost, not timeout).
        self.deadline = self._stage_started + settings.job_soft_time_limit_s  # monotonic s
        self.stage_seconds: dict[str, float] = {}  # wall time per engine stage
        self._events = events.ProgressEvents(settings.event_progress_step,
                                             settings.event_progress_interval_s)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}",
                                        daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _write(self, event: str | None = None, **fields: Any) -> None:
        with self._lock, self.sessions() as s:
            res = job_repo.heartbeat(s, self.job_id, self.worker_id, self.settings.job_lease_s,
                                     **fields)
            if res is not None and event is not None:
                events.record(s, self.job_id, event, status=JobStatus.running.value, **fields)
            s.commit()
        if res is None:
            self.lost = True
        else:
            self.cancel_requested = res

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self._write()
            except Exception:  # a DB blip must not kill the run; the next beat retries
                log.warning("heartbeat failed for job %s", self.job_id, exc_info=True)

    @property
    def stage(self) -> str | None:
        return self._stage

    def check(self) -> None:
        if self.lost:
            raise LeaseLost("lease lost: another worker owns this job now")
        if self.cancel_requested:
            raise Cancelled("cancelled by request")
        if time.monotonic() > self.deadline:
            raise TimeBudgetExceeded(
                f"soft time limit reached ({self.settings.job_soft_time_limit_s} s) during "
                f"{self._stage!r}")

    def on_status(self, status: ProgressStatus) -> None:
        """The engine's StatusFn (overall progress weighted by the planner's expected work,
        ETA, activity): kept for the ``on_progress`` call that follows it."""
        self._status = status

    def _status_fields(self) -> dict[str, Any]:
        st = self._status
        if st is None:  # nothing from the engine yet (fetching the inputs)
            return {}
        return {"progress": st.overall, "eta_s": st.eta_s, "activity": st.activity.to_dict()}

    def on_progress(self, stage: str, fraction: float, message: str) -> None:
        """The engine's ProgressFn: throttled writes, always on a stage change; may raise."""
        now = time.monotonic()
        changed = stage != self._stage
        if changed and self._stage is not None:
            self.stage_seconds[self._stage] = (self.stage_seconds.get(self._stage, 0.0)
                                               + now - self._stage_started)
        if changed:
            self._stage_started = now
        if changed or now - self._last_write >= self.settings.progress_write_interval_s:
            self._stage = stage
            self._last_write = now
            text = message[:2000] if message else None
            fields = self._status_fields()
            progress = round(float(fields.get("progress", 0.0)), 4)
            fields["progress"] = progress
            try:
                self._write(self._events.kind(changed, progress, text, now), stage=stage[:32],
                            message=text, **fields)
            except SQLAlchemyError:  # a DB blip must not fail the run; the beat retries
                log.warning("progress write failed for job %s", self.job_id, exc_info=True)
        self.check()


def _download(store: ArtifactStore, key: str, path: Path) -> Path:
    with path.open("wb") as f:
        for chunk in store.open(key):
            f.write(chunk)
    return path


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _load_inputs(s: Session, job_id: str, attempt: int) -> _Inputs:
    job = job_repo.get_any(s, job_id)
    assert job is not None
    model = model_repo.get_any(s, job.model_id)
    data = dataset_repo.get_any(s, job.dataset_id)
    ev = dataset_repo.get_any(s, job.eval_dataset_id) if job.eval_dataset_id else None
    if model is None or data is None or (job.eval_dataset_id and ev is None):
        raise EngineError("the job's model or data set no longer exists")
    spec = JobSpec(constraints=Constraints.from_dict(job.constraints),
                   recipe=None if job.recipe is None else Recipe.from_dict(job.recipe),
                   device=job.device,  # type: ignore[arg-type]
                   seed=job.seed)
    return _Inputs(job_id=job.id, attempt=attempt, spec=spec, model_key=model.storage_key,
                   model_format=model.format, data_key=data.storage_key,
                   data_suffix="." + data.format,
                   eval_key=None if ev is None else ev.storage_key,
                   eval_suffix=None if ev is None else "." + ev.format)


def _candidate_summary(c: Any) -> dict[str, Any]:
    m = c.metrics
    return {"recipe": c.recipe.to_dict(), "feasible": c.feasible, "distilled": c.distilled,
            "quality": m.quality, "quality_drop_ci95": m.quality_drop_ci95,
            "latency_p50_ms": m.latency_p50_ms,
            "size_bytes": m.size_bytes, "reasons": list(c.reasons)}


def _caused_by(e: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``e`` or an exception it was raised from / while handling is one of ``types``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and types:
        if isinstance(cur, types):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _describe(e: BaseException) -> str:
    # A DBAPIError's str() carries the statement and its parameters (the artifact's bytes):
    # keep only the driver's message.
    if isinstance(e, DBAPIError) and e.orig is not None:
        e = e.orig
    return f"{type(e).__name__}: {str(e).strip()[:500]}"


def _delete_keys(store: ArtifactStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception:  # best effort: the next attempt's claim sweeps the prefix again
            log.warning("could not delete %s", key, exc_info=True)


def _store_outcome(sessions: sessionmaker[Session], store: ArtifactStore, inp: _Inputs,
                   result: Result, out_dir: Path, worker_id: str,
                   stage_seconds: dict[str, float]) -> bool:
    """Store every artifact's bytes, then commit their rows with the job's outcome in one
    transaction. Returns False (and deletes the bytes) when the lease was lost meanwhile.
    Raises StorageWriteError when a write fails; whatever this attempt stored is deleted
    first, on that path and on any other exception (a time limit) alike."""
    files = dict(result.artifacts)
    if "report.json" not in files:
        p = out_dir / "report.json"
        p.write_text(json.dumps(_json_safe(result.report), indent=2))
        files["report.json"] = p
    written: list[str] = []
    artifacts: list[Artifact] = []
    committed: list[bool] = []  # set right after the commit: the bytes are the job's then
    try:
        for name, path in sorted(files.items()):
            key = f"{_attempt_prefix(inp.job_id, inp.attempt)}{name}"
            written.append(key)  # before the write: a failed write may leave part of it
            try:
                size, sha = store.put_stream(key, file_chunks(Path(path)))
            except Exception as e:
                raise StorageWriteError(
                    f"could not store artifact {name!r}: {_describe(e)}") from e
            artifacts.append(Artifact(
                job_id=inp.job_id, name=name, sha256=sha, size_bytes=size, storage_key=key,
                content_type=CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")))
        done = _commit_outcome(sessions, inp, result, artifacts, worker_id, stage_seconds,
                               committed)
    except BaseException:
        if not committed:
            _delete_keys(store, written)
        raise
    if not done:  # someone else owns the job now; its own attempt stores its own bytes
        _delete_keys(store, written)
    return done


def _commit_outcome(sessions: sessionmaker[Session], inp: _Inputs, result: Result,
                    artifacts: list[Artifact], worker_id: str,
                    stage_seconds: dict[str, float], committed: list[bool]) -> bool:
    rows = [JobMetric(job_id=inp.job_id, kind="stage", name=name[:64],
                      metrics={"seconds": round(sec, 3)})
            for name, sec in stage_seconds.items()]
    rows.append(JobMetric(job_id=inp.job_id, kind="baseline",
                          metrics=_json_safe(result.baseline.to_dict())))
    rows += [JobMetric(job_id=inp.job_id, kind="candidate", position=i,
                       recipe=c.recipe.to_dict(), metrics=_json_safe(c.metrics.to_dict()),
                       feasible=c.feasible, distilled=c.distilled, reasons=list(c.reasons))
             for i, c in enumerate(result.candidates)]
    rows.append(JobMetric(job_id=inp.job_id, kind="best", recipe=result.best.recipe.to_dict(),
                          metrics=_json_safe(result.best.metrics.to_dict()),
                          feasible=result.best.feasible, distilled=result.best.distilled,
                          reasons=list(result.best.reasons)))
    metrics = _json_safe({
        "baseline": result.baseline.to_dict(),
        "best": {**result.best.metrics.to_dict(), "recipe": result.best.recipe.to_dict(),
                 "feasible": result.best.feasible, "reasons": list(result.best.reasons)},
        "candidates": [_candidate_summary(c) for c in result.candidates],
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "warnings": list(result.warnings),
    })
    ok = result.status == "succeeded"
    with sessions() as s:
        # finish() first: its WHERE holds the lease, so a worker that lost it adds nothing.
        done = job_repo.finish(
            s, inp.job_id, worker_id,
            JobStatus.succeeded.value if ok else JobStatus.failed.value,
            stage="done", progress=1.0, metrics=metrics, report=_json_safe(result.report),
            message=result.message or None,
            error_code=None if ok else "constraints_unsatisfiable",
            error_detail=None if ok else (result.message or "no candidate met the constraints"))
        if not done:
            s.rollback()
            return False
        for a in artifacts:
            artifact_repo.add(s, a)
        metric_repo.replace_for_job(s, inp.job_id, rows)
        _record_outcome_events(s, inp.job_id, metrics)
        s.commit()
        committed.append(True)
    return True


def _record_outcome_events(s: Session, job_id: str, metrics: dict[str, Any]) -> None:
    """The stream's candidate events, then its outcome, in the outcome's transaction (so
    they carry the job's final state)."""
    for i, summary in enumerate(metrics["candidates"]):
        events.record_job(s, job_id, "candidate", candidate={"index": i, **summary})
    events.record_job(s, job_id, "outcome")


def _attempt_prefix(job_id: str, attempt: int) -> str:
    return f"jobs/{job_id}/attempt-{attempt}/"


def _work_prefix(job_id: str) -> str:
    return f"modelpress-{job_id}-"


def _clear_earlier_attempts(sessions: sessionmaker[Session], store: ArtifactStore,
                            settings: Settings, job_id: str, attempt: int) -> None:
    """After a claim: drop what earlier attempts of this job left behind. Only a process
    that died (or lost its lease) leaves anything, and we hold the lease now, so none of it
    is in use: artifact rows (none when the rows commit with the outcome, but a row must
    never point at bytes we delete), stored bytes, and this host's work directories."""
    with sessions() as s:
        artifact_repo.delete_for_job(s, job_id)
        s.commit()
    for k in range(1, attempt):
        try:
            n = store.delete_prefix(_attempt_prefix(job_id, k))
        except Exception:  # best effort: leaving an orphan must not fail the new attempt
            log.warning("job %s: could not delete attempt %d's bytes", job_id, k,
                        exc_info=True)
            continue
        if n:
            log.warning("job %s: deleted %d object(s) left by attempt %d", job_id, n, k)
    root = Path(settings.tmp_dir or tempfile.gettempdir())
    for d in root.glob(f"{_work_prefix(job_id)}*"):
        log.warning("job %s: removing work directory %s left by an earlier attempt", job_id, d)
        shutil.rmtree(d, ignore_errors=True)


def _finish_error(sessions: sessionmaker[Session], job_id: str, worker_id: str, status: str,
                  code: str, detail: str) -> None:
    with sessions() as s:
        if job_repo.finish(s, job_id, worker_id, status, error_code=code,
                           error_detail=detail[:4000]):
            events.record_job(s, job_id, "outcome")
        s.commit()


def _dead_local_owner(owner: str | None, worker_id: str) -> str | None:
    """``owner`` if it is provably dead: the same message (task id) on the same host, and its
    process gone. Celery requeues a task whose pool child died (task_reject_on_worker_lost),
    and the replacement child receives it at once, while the dead child's lease still runs
    for up to job_lease_s; this lets it take over at once. Worker ids are
    ``host:pid:task id`` (workers/tasks.py). Anything else (another host, another message, a
    live or unknown process) is left to the lease and the reaper."""
    if owner is None:
        return None
    try:
        o_host, o_pid, o_task = owner.split(":", 2)
        m_host, m_pid, m_task = worker_id.split(":", 2)
        pid = int(o_pid)
    except ValueError:
        return None
    if (o_host, o_task) != (m_host, m_task) or o_pid == m_pid or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return owner
    except PermissionError:  # exists, another user's
        return None
    return None


def preload_engine() -> None:
    """Import the engine and its libraries (torch, torchao, Torch-Pruning, ONNX, ONNX Runtime).

    Called in a Celery worker's main process before the pool forks (``worker_init``), so that
    every pool child starts with them imported, including the child that replaces one that
    was killed: without it each new child spends seconds importing torch after claiming a job.
    Imports only: no tensor work and no CUDA initialisation in the parent (forking after
    ``import torch`` is what DataLoader workers do; forking after CUDA init is not safe).
    """
    import app.engine.formats.data
    import app.engine.formats.pt2
    import app.engine.graph
    import app.engine.pipeline
    import app.engine.stages.distill
    import app.engine.stages.evaluate
    import app.engine.stages.export
    import app.engine.stages.prune
    import app.engine.stages.quantize  # noqa: F401


def run_job(job_id: str, worker_id: str, *, settings: Settings | None = None,
            timeout_exceptions: tuple[type[BaseException], ...] = (),
            engine_run: Callable[..., Result] | None = None) -> None:
    """Claim ``job_id`` and run it to a terminal state. Idempotent: a duplicate delivery of
    the message finds the lease held (or the job finished) and returns without acting."""
    settings = settings or get_settings()
    sessions = session_factory(settings)
    store = get_store(settings)
    with sessions() as s:
        job = job_repo.claim(s, job_id, worker_id, settings.job_lease_s)
        if job is None:
            s.rollback()
            dead = _dead_local_owner(job_repo.lease_owner(s, job_id), worker_id)
            if dead is not None:  # take over now rather than wait for the lease to expire
                job = job_repo.claim(s, job_id, worker_id, settings.job_lease_s,
                                     dead_owner=dead)
                if job is not None:
                    log.warning("job %s: taking over from %s, a dead process on this host",
                                job_id, dead)
        if job is None:
            s.rollback()
            log.info("job %s not claimable (finished, cancelled or leased elsewhere)", job_id)
            return
        attempt = job.attempt
        s.commit()
        try:
            inp = _load_inputs(s, job_id, attempt)
        except EngineError as e:
            _finish_error(sessions, job_id, worker_id, JobStatus.failed.value, e.code, str(e))
            return
    lease = _Lease(sessions, settings, job_id, worker_id)
    with lease:
        # Everything after the claim is inside the try: an exception anywhere (the soft time
        # limit during the seconds-long torch import, a DB error while clearing an earlier
        # attempt) must end the job here, not leave it "running" until the reaper retries it.
        try:
            if attempt > 1:
                _clear_earlier_attempts(sessions, store, settings, job_id, attempt)
            if engine_run is None:
                from app.engine.pipeline import run  # torch: imported only in the pool child

                engine_run = run
            if settings.tmp_dir is not None:
                settings.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=_work_prefix(job_id),
                                             dir=settings.tmp_dir) as tmp:
                root = Path(tmp)
                lease.on_progress("load", 0.0, "fetching model and data")
                model_path = _download(store, inp.model_key, root / f"model.{inp.model_format}")
                data_path = _download(store, inp.data_key, root / f"data{inp.data_suffix}")
                eval_path = None
                if inp.eval_key is not None:
                    eval_path = _download(store, inp.eval_key,
                                          root / f"eval{inp.eval_suffix}")
                out_dir = root / "out"
                out_dir.mkdir()
                # work_dir: the engine's scratch files live in this job's directory too,
                # so one rmtree (ours, or the next attempt's) removes everything.
                result = engine_run(model_path, data_path, inp.spec, out_dir,
                                    lease.on_progress, eval_data_path=eval_path,
                                    work_dir=root, model_format=inp.model_format,
                                    on_status=lease.on_status)
                lease.check()
                lease.on_progress("store", 0.0, "storing artifacts")  # closes the last stage
                _store_outcome(sessions, store, inp, result, out_dir, worker_id,
                               lease.stage_seconds)
        except LeaseLost:
            log.warning("job %s: lease lost, leaving it to its new owner", job_id)
        except Cancelled as e:
            _finish_error(sessions, job_id, worker_id, JobStatus.cancelled.value, "cancelled",
                          str(e))
        except timeout_exceptions as e:
            _finish_error(sessions, job_id, worker_id, JobStatus.failed.value, "timeout",
                          f"soft time limit reached ({settings.job_soft_time_limit_s} s): {e}")
        except Exception as e:
            # The soft limit's exception is raised wherever the task is, and library code may
            # wrap it (torch.onnx.export raises ConversionError from it; a stage raises
            # InvalidRecipe from whatever failed): look for it in the cause chain.
            if _caused_by(e, timeout_exceptions):
                _finish_error(sessions, job_id, worker_id, JobStatus.failed.value, "timeout",
                              f"soft time limit reached ({settings.job_soft_time_limit_s} s)"
                              f" during {lease.stage!r} (raised as {type(e).__name__})")
            elif isinstance(e, EngineError | StorageWriteError):
                if isinstance(e, StorageWriteError):
                    log.warning("job %s: %s", job_id, e)
                _finish_error(sessions, job_id, worker_id, JobStatus.failed.value, e.code,
                              str(e))
            else:
                log.exception("job %s failed", job_id)
                _finish_error(sessions, job_id, worker_id, JobStatus.failed.value,
                              "internal_error", f"{type(e).__name__}: {e}")
