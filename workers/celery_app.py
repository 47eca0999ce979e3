"""Celery configured from Settings. Start a worker with

    celery -A workers.celery_app worker -Q cpu,gpu -c 1 --pool prefork

Reliability (DESIGN §5): late acks + reject on worker loss (a killed worker's message is
redelivered), prefetch 1 (a long job never holds a second message hostage), JSON only (tasks
get ids, never objects), soft < hard time limit < visibility timeout (a live task is never
redelivered to a second worker while it still runs).
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings


def _ensure_broker_dir(url: str) -> None:
    # kombu's SQLAlchemy transport creates the SQLite file but not its directory.
    prefix = "sqla+sqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        Path(url.removeprefix(prefix)).parent.mkdir(parents=True, exist_ok=True)


def _transport_options(settings: Settings) -> dict[str, object]:
    if settings.broker_url.startswith(("redis", "rediss", "sentinel", "sqs")):
        return {"visibility_timeout": settings.broker_visibility_timeout_s}
    # kombu's SQLAlchemy transport hands its options to create_engine (visibility_timeout
    # would be rejected). It has no visibility timeout: unacked messages are restored when the
    # worker shuts down cleanly; after a hard crash the reconciler re-sends the queued job.
    return {}


def create_celery(settings: Settings) -> Celery:
    _ensure_broker_dir(settings.broker_url)
    app = Celery("modelpress", broker=settings.broker_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,  # the job row is the result
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # A broker restart must not cancel running jobs (Celery 6 flips this default): the job
        # row's lease, not the broker's unacked message, decides who owns a job, and the
        # reconciler re-sends whatever the broker lost (tests/faults/test_servers.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_timeout=5,  # seconds; /readyz and publishing must not hang
        task_queues=(Queue("cpu"), Queue("gpu")),
        task_default_queue="cpu",
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "modelpress-maintenance": {
                "task": "modelpress.maintenance.tick",
                "schedule": settings.reaper_interval_s,
                "options": {"queue": "cpu"},
            },
            # Only with webhooks_in_worker off: the in-worker thread is prompter (a task on
            # the cpu queue waits behind running jobs) and must not get a second sender.
            **({} if settings.webhooks_in_worker else {"modelpress-webhooks": {
                "task": "modelpress.webhooks.dispatch",
                "schedule": settings.webhook_poll_interval_s,
                "options": {"queue": "cpu"},
            }}),
        },
    )
    return app


app = create_celery(get_settings())
