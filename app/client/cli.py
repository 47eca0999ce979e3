"""The client commands of ``modelpress``: upload-model, upload-data, submit, status, list,
cancel, download, report. Each talks to a running server through :mod:`app.client.sdk`.

Server URL and key: ``--url`` / ``--key``, else ``MODELPRESS_URL`` / ``MODELPRESS_API_KEY``,
else http://127.0.0.1:8000 and the key the embedded server saved in ./var/dev-api-key.
A server problem is printed as its title, status, code and detail, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, get_args

from pydantic import ValidationError

from app.client.sdk import ApiError, Client
from app.schemas.common import ErrorCode, Problem
from app.schemas.jobs import ConstraintsIn, JobCreate, JobOut, QualityMetricName, RecipeIn

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
BAR_WIDTH = 28  # characters


# --- output helpers ------------------------------------------------------------------------


def print_problem(p: Problem, out: TextIO | None = None) -> None:
    out = out or sys.stderr
    status = f"HTTP {p.status}, " if p.status else ""
    print(f"error: {p.title} ({status}code {p.code})", file=out)
    if p.detail:
        print(f"  {p.detail}", file=out)
    extra = p.model_extra or {}
    details = extra.get("details")
    if isinstance(details, dict):
        for k, v in details.items():
            print(f"  {k}: {v}", file=out)
    for e in p.errors or []:
        print(f"  - {'.'.join(e.loc)}: {e.msg}", file=out)


def _usage_problem(detail: str) -> Problem:
    return Problem(title="Invalid arguments", status=0, code=ErrorCode.validation_error,
                   detail=detail)


def _validation_detail(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


def _mb(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _activity(job: JobOut) -> str:
    """E.g. " candidate 2/7 (prune 30% int8_static), epoch 3/12, ETA 1m05s": the typed fields."""
    parts = []
    a = job.activity
    if a is not None and a.candidate_index is not None:
        parts.append(f"candidate {a.candidate_index}/{a.candidates_total}"
                     + (f" ({a.candidate})" if a.candidate else ""))
    if a is not None and a.epoch is not None:
        parts.append(f"epoch {a.epoch}/{a.epochs_total}")
    if job.eta_s is not None and job.status == "running":
        m, sec = divmod(round(job.eta_s), 60)
        parts.append(f"ETA {m}m{sec:02d}s" if m else f"ETA {sec}s")
    return (" " + ", ".join(parts)) if parts else ""


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class ProgressBar:
    """One line on stderr: redrawn in place on a terminal, one line per stage otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_key: tuple[str, str | None] | None = None
        self._drawn = False

    def update(self, job: JobOut) -> None:
        frac = min(max(job.progress, 0.0), 1.0)
        filled = round(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        what = job.stage or job.status
        msg = f" - {job.message}" if job.message else ""
        line = f"[{bar}] {frac * 100:5.1f}%  {job.status:<9} {what}{_activity(job)}{msg}"
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r\x1b[2K" + line[: cols - 1])
            self.stream.flush()
            self._drawn = True
        elif (job.status, job.stage) != self._last_key:
            print(line, file=self.stream, flush=True)
        self._last_key = (job.status, job.stage)

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def print_job(job: JobOut) -> None:
    print(f"job        {job.id}")
    print(f"status     {job.status}" + (" (cancel requested)" if job.cancel_requested
                                        and job.status == "running" else ""))
    print(f"stage      {job.stage or '-'}  progress {job.progress * 100:.1f}%{_activity(job)}"
          + (f"  {job.message}" if job.message else ""))
    print(f"attempt    {job.attempt}/{job.max_attempts}   queue {job.queue}   device {job.device}")
    print(f"model      {job.model_id}   data {job.dataset_id}")
    limits = job.constraints.model_dump(exclude_none=True)
    print(f"constraints {json.dumps(limits)}")
    if job.recipe:
        print(f"recipe     {json.dumps(job.recipe.model_dump())}")
    print(f"created    {job.created_at:%Y-%m-%d %H:%M:%S}"
          + (f"   started {job.started_at:%H:%M:%S}" if job.started_at else "")
          + (f"   finished {job.finished_at:%H:%M:%S}" if job.finished_at else ""))
    if job.error:
        print(f"error      {job.error.code}: {job.error.detail or ''}")
    print_metrics(job.metrics.model_dump(mode="json") if job.metrics else None)


def print_metrics(metrics: dict[str, Any] | None) -> None:
    if not metrics:
        return
    base, best = metrics.get("baseline") or {}, metrics.get("best") or {}
    if not best:
        return
    print(f"{'':10} {'size':>12} {'p50 latency':>12} {'quality':>10}")
    for label, m in (("original", base), ("compressed", best)):
        if m:
            print(f"{label:10} {_mb(m.get('size_bytes')):>12} "
                  f"{_num(m.get('latency_p50_ms'), '.3f'):>9} ms "
                  f"{_num(m.get('quality'), '.4f'):>10}")
    if base.get("size_bytes") and best.get("size_bytes"):
        ratio = base["size_bytes"] / best["size_bytes"]
        speed = (base["latency_p50_ms"] / best["latency_p50_ms"]
                 if base.get("latency_p50_ms") and best.get("latency_p50_ms") else None)
        drop = (base["quality"] - best["quality"]
                if base.get("quality") is not None and best.get("quality") is not None
                else None)
        ci = best.get("quality_drop_ci95")
        print(f"ratios     {ratio:.2f}x smaller, "
              f"{'-' if speed is None else f'{speed:.2f}x'} faster, "
              f"{best.get('quality_kind') or 'quality'} drop {_num(drop, '.4f')}"
              + (f" (95% interval {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""))
    if best.get("recipe"):
        print(f"recipe     {json.dumps(best['recipe'])}")
    cands = metrics.get("candidates") or []
    if cands:
        feasible = sum(1 for c in cands if c.get("feasible"))
        print(f"candidates {len(cands)} evaluated, {feasible} feasible")
    for w in metrics.get("warnings") or []:
        print(f"warning    {w}")


# --- commands -----------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.key)


def _is_file(ref: str) -> bool:
    return Path(ref).is_file()


def cmd_upload_model(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = c.upload_model(args.file)
    if args.json:
        _dump(m.model_dump(mode="json"))
    else:
        ins = ", ".join(f"{t.name}:{t.dtype}{t.shape}" for t in m.inputs)
        print(m.id)
        print(f"  {m.filename} ({m.format}, {_mb(m.size_bytes)}, {m.parameters} parameters) "
              f"inputs {ins}", file=sys.stderr)
    return EXIT_OK


def cmd_upload_data(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = c.upload_dataset(args.file, args.model)
    if args.json:
        _dump(d.model_dump(mode="json"))
    else:
        print(d.id)
        print(f"  {d.filename} ({d.format}, {d.samples} samples, labels: {d.has_labels})",
              file=sys.stderr)
    return EXIT_OK


def _recipe(arg: str | None) -> RecipeIn | None:
    if arg is None:
        return None
    text = Path(arg[1:]).read_text() if arg.startswith("@") else arg
    return RecipeIn.model_validate_json(text)


def build_job(args: argparse.Namespace, model_id: str, dataset_id: str,
              eval_id: str | None) -> JobCreate:
    limits = {k: getattr(args, k) for k in (
        "max_size_mb", "max_latency_ms", "max_accuracy_drop", "batch_size", "threads",
        "objective", "time_budget_s", "metric") if getattr(args, k) is not None}
    body: dict[str, Any] = {"model_id": model_id, "dataset_id": dataset_id,
                            "constraints": ConstraintsIn.model_validate(limits),
                            "recipe": _recipe(args.recipe), "device": args.device,
                            "seed": args.seed}
    if eval_id:
        body["eval_dataset_id"] = eval_id
    return JobCreate.model_validate(body)


def cmd_submit(args: argparse.Namespace) -> int:
    # Validate the request locally before uploading anything.
    try:
        build_job(args, "m", "d", None)
    except ValidationError as e:
        print_problem(_usage_problem(_validation_detail(e)))
        return EXIT_USAGE
    except OSError as e:
        print_problem(_usage_problem(f"--recipe: {e}"))
        return EXIT_USAGE
    with _client(args) as c:
        model_id = args.model
        if _is_file(args.model):
            model_id = c.upload_model(args.model).id
            print(f"uploaded model {args.model} -> {model_id}", file=sys.stderr)
        data_id = args.data
        if _is_file(args.data):
            data_id = c.upload_dataset(args.data, model_id).id
            print(f"uploaded data {args.data} -> {data_id}", file=sys.stderr)
        eval_id = args.eval_data
        if eval_id and _is_file(eval_id):
            eval_id = c.upload_dataset(eval_id, model_id).id
            print(f"uploaded eval data {args.eval_data} -> {eval_id}", file=sys.stderr)
        job = c.submit(build_job(args, model_id, data_id, eval_id),
                       idempotency_key=args.idempotency_key)
        if not args.wait:
            if args.json:
                _dump(job.model_dump(mode="json"))
            else:
                print(job.id)
                print(f"  {job.status}; follow with: modelpress status {job.id}",
                      file=sys.stderr)
            return EXIT_OK
        print(f"job {job.id} {job.status}", file=sys.stderr)
        bar = ProgressBar()
        try:
            job = c.wait(job.id, poll_s=args.poll_s, timeout_s=args.timeout_s,
                         on_update=bar.update)
        except KeyboardInterrupt:
            bar.close()
            print(f"stopped waiting; job {job.id} goes on (modelpress status {job.id}, "
                  f"modelpress cancel {job.id})", file=sys.stderr)
            return 130
        finally:
            bar.close()
        arts = c.artifacts(job.id).items if job.status != "cancelled" else []
    if args.json:
        _dump(job.model_dump(mode="json"))
    else:
        print_job(job)
        for a in arts:
            print(f"artifact   {a.name:<14} {_mb(a.size_bytes):>12}  sha256 {a.sha256}")
        if arts:
            print(f"download   modelpress download {job.id} --name model.onnx --out out/",
                  file=sys.stderr)
    return EXIT_OK if job.status == "succeeded" else EXIT_ERROR


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.get_job(args.id)
    if args.json:
        _dump(job.model_dump(mode="json"))
    else:
        print_job(job)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        page = c.list_jobs(args.status, args.limit, args.cursor)
    if args.json:
        _dump(page.model_dump(mode="json"))
        return EXIT_OK
    print(f"{'id':<36} {'status':<10} {'stage':<10} {'progress':>8}  created")
    for j in page.items:
        print(f"{j.id:<36} {j.status:<10} {(j.stage or '-'):<10} {j.progress * 100:7.1f}%  "
              f"{j.created_at:%Y-%m-%d %H:%M:%S}")
    if page.next_cursor:
        print(f"more: modelpress list --cursor {page.next_cursor}", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel(args.id)
    state = "cancel requested (stops at its next progress point)" if (
        job.status == "running") else job.status
    print(f"{job.id} {state}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    bar_stream = sys.stderr

    def progress(done: int, total: int | None) -> None:
        if bar_stream.isatty():
            of = f"/{_mb(total)}" if total else ""
            bar_stream.write(f"\r\x1b[2K{_mb(done)}{of}")
            bar_stream.flush()

    with _client(args) as c:
        names = [a.name for a in c.artifacts(args.id).items] if args.all else [args.name]
        for name in names:
            path = c.download(args.id, name, args.out, progress=progress)
            if bar_stream.isatty():
                bar_stream.write("\r\x1b[2K")
            print(f"{path}  ({_mb(path.stat().st_size)}, sha256 verified)")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _dump(c.report(args.id).model_dump(mode="json"))
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def _conn_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server")
    g.add_argument("--url", help="server URL (env MODELPRESS_URL, default "
                                 "http://127.0.0.1:8000)")
    g.add_argument("--key", help="API key (env MODELPRESS_API_KEY, default ./var/dev-api-key)")
    g.add_argument("--json", action="store_true", help="print the API's JSON")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "upload-model": cmd_upload_model, "upload-data": cmd_upload_data, "submit": cmd_submit,
    "status": cmd_status, "list": cmd_list, "cancel": cmd_cancel,
    "download": cmd_download, "report": cmd_report,
}


def add_parsers(sub: Any) -> None:
    """Add the client commands to an ``add_subparsers()`` object (``app.cli`` uses this)."""
    conn = _conn_parent()
    p = sub.add_parser("upload-model", parents=[conn], help="upload a .pt2 / .onnx model")
    p.add_argument("file", type=Path)
    p = sub.add_parser("upload-data", parents=[conn], help="upload .npz / .safetensors data")
    p.add_argument("file", type=Path)
    p.add_argument("--model", required=True, help="id of the model the data is for")

    p = sub.add_parser("submit", parents=[conn], help="submit a compression job",
                       description="Submit a job. --model and --data take a file (uploaded "
                                   "first) or the id of an earlier upload.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    p.add_argument("--model", help="model file (.pt2/.onnx) or model id")
    p.add_argument("--data", required=True, help="data file (.npz/.safetensors) or dataset id")
    p.add_argument("--eval-data", help="held-out evaluation data file or dataset id")
    p.add_argument("--max-size-mb", type=float, help="MB = 1e6 bytes of model.onnx")
    p.add_argument("--max-latency-ms", type=float, help="ONNX Runtime p50 latency, ms")
    p.add_argument("--max-accuracy-drop", type=float, help="absolute: 0.01 = one point")
    p.add_argument("--batch-size", type=int, help="batch size of the latency limit (1)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads of the latency limit (2)")
    p.add_argument("--objective", choices=["smallest", "fastest"])
    p.add_argument("--metric", choices=get_args(QualityMetricName),
                   help="what --max-accuracy-drop is measured in (auto)")
    p.add_argument("--time-budget-s", type=float, help="seconds for the whole search (600)")
    p.add_argument("--recipe", help="explicit recipe as JSON, or @file.json (skips the search)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    p.add_argument("--wait", action="store_true", help="poll with a progress bar until done")
    p.add_argument("--poll-s", type=float, default=0.5, help="poll interval, seconds")
    p.add_argument("--timeout-s", type=float, default=None, help="give up waiting after this")

    p = sub.add_parser("status", parents=[conn], help="show a job")
    p.add_argument("id")
    p = sub.add_parser("list", parents=[conn], help="list jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                        "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor")
    p = sub.add_parser("cancel", parents=[conn], help="cancel a job")
    p.add_argument("id")
    p = sub.add_parser("download", parents=[conn], help="download an artifact (sha256 checked)")
    p.add_argument("id")
    p.add_argument("--name", default="model.onnx", help="artifact name (default model.onnx)")
    p.add_argument("--all", action="store_true", help="every artifact of the job")
    p.add_argument("--out", type=Path, default=Path("."), help="directory (created)")
    p = sub.add_parser("report", parents=[conn], help="print a job's report.json")
    p.add_argument("id")


def run(args: argparse.Namespace) -> int:
    """Run the client command ``args.command``; problems print and return 1, never raise."""
    if args.command == "submit":
        if args.model is None:
            args.model = args.model_pos
        elif args.model_pos is not None:
            print_problem(_usage_problem("give the model once: MODEL or --model"))
            return EXIT_USAGE
        if args.model is None:
            print_problem(_usage_problem("a model is required: MODEL or --model"))
            return EXIT_USAGE
    try:
        rc = COMMANDS[args.command](args)
        sys.stdout.flush()  # inside the try: a reader that went away (| head) is handled here
        return rc
    except BrokenPipeError:
        return _reader_gone()
    except ApiError as e:
        print_problem(e.problem)
        return EXIT_ERROR
    except TimeoutError as e:
        print_problem(Problem(title="Timed out", status=0, code=ErrorCode.timeout, detail=str(e)))
        return EXIT_ERROR
    except OSError as e:
        print_problem(Problem(title="File error", status=0, code=ErrorCode.file_error,
                              detail=str(e)))
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """stdout's reader closed the pipe (``modelpress status ID | head -1``): what it read is
    all it wanted, so no error. stdout is pointed at /dev/null, or the interpreter's final
    flush fails again and prints "Exception ignored ... BrokenPipeError" (Python docs,
    "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelpress", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    return run(parser.parse_args(argv))
