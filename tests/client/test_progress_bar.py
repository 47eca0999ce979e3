"""The CLI's progress line shows the job's typed activity and ETA, not only the stage."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from app.client.cli import ProgressBar
from app.schemas.jobs import JobOut


def _job(**fields: object) -> JobOut:
    now = datetime.now(UTC)
    base: dict[str, object] = dict(
        id="j1", status="running", stage="distill", progress=0.42, message="epoch 3/12",
        attempt=1, max_attempts=3, model_id="m", dataset_id="d", eval_dataset_id=None,
        device="cpu", queue="cpu", constraints={}, recipe=None, metrics=None, error=None,
        cancel_requested=False, created_at=now, started_at=now, finished_at=None,
        updated_at=now)
    return JobOut.model_validate({**base, **fields})


def test_progress_line_shows_candidate_epoch_and_eta() -> None:
    out = io.StringIO()
    ProgressBar(out).update(_job(eta_s=65.4, activity={
        "stage": "distill", "candidate": "prune 30% int8_static", "candidate_index": 2,
        "candidates_total": 3, "epoch": 3, "epochs_total": 12}))
    line = out.getvalue()
    assert " 42.0%" in line
    assert "candidate 2/3 (prune 30% int8_static), epoch 3/12, ETA 1m05s" in line


def test_progress_line_without_activity_is_the_stage() -> None:
    out = io.StringIO()
    ProgressBar(out).update(_job(stage="load", progress=0.0, message=None))
    assert out.getvalue().rstrip().endswith("running   load")
