"""One module per table; importing this package registers every table on ``metadata``."""

from app.db.models.api_key import ApiKey
from app.db.models.artifact import Artifact
from app.db.models.blob_chunk import BlobChunk
from app.db.models.dataset import Dataset
from app.db.models.idempotency_key import IdempotencyKey
from app.db.models.job import Job, JobStatus
from app.db.models.job_event import JobEvent
from app.db.models.job_metric import JobMetric
from app.db.models.model import Model
from app.db.models.tenant import Tenant
from app.db.models.webhook import Webhook, WebhookAttempt, WebhookDelivery

__all__ = [
    "ApiKey", "Artifact", "BlobChunk", "Dataset", "IdempotencyKey", "Job", "JobEvent",
    "JobMetric", "JobStatus", "Model", "Tenant", "Webhook", "WebhookAttempt", "WebhookDelivery",
]
