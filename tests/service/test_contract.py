"""The OpenAPI document is the contract: schemathesis (v4) drives the app in-process against
real Postgres, authenticated with a real key, and every response must be declared (status,
content type, headers) and match its schema; no 5xx.

Two runs, both bounded and derandomized (deterministic in CI):
- per operation (``schema.parametrize``): generated and mutated requests;
- stateful (``schema.as_state_machine``): sequences that feed one response's ids (links
  inferred from the document and the ``Location`` headers) into the next request.

Path ids and the job body's ids are drawn from either the generated value or a seeded one of
this tenant (a model, a data set, a finished job with a report and an artifact, a queued job),
so responses of existing resources (200, 206, 304, 409 ...) are checked too, not only 404s.

``positive_data_acceptance`` is left out: a schema-valid request is not always acceptable
here (random bytes are a schema-valid upload but not a model; a random cursor is a valid
string but not a cursor), and the app rightly says 422.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.config import Settings
from app.main import create_app
from tests.service.conftest import QuietBroker
from tests.service.seed import Seeded, seed_tenant

pytestmark = pytest.mark.service

EXCLUDED = [positive_data_acceptance]
# Bounded for CI: about 20 s per run on the 2-core machine (most of it in the sandboxed loader
# refusing generated model uploads). derandomize: the same cases on every run.
SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
PER_OPERATION = hypothesis.settings(max_examples=12, **SETTINGS)  # type: ignore[arg-type]
STATEFUL = hypothesis.settings(max_examples=15, stateful_step_count=6,
                               **SETTINGS)  # type: ignore[arg-type]


def _load(settings: Settings, broker: QuietBroker, key: str, seeded: Seeded) -> Any:
    # A broker no worker listens to: submitted jobs stay queued.
    app = create_app(settings.model_copy(update={"broker_url": broker.url}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.update(headers={"Authorization": f"Bearer {key}"})
    real = {**seeded.path_values()}

    @schema.hook
    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
        known = {k: real[k] for k in path_parameters or () if k in real}
        if not known:
            return st.just(path_parameters)
        variants = [path_parameters, {**path_parameters, **known}]
        if "job_id" in known:  # the queued job too: cancel has two outcomes
            variants.append({**path_parameters, **known, "job_id": seeded.queued_job_id})
        return st.sampled_from(variants)

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> Any:
        if not isinstance(body, dict) or "model_id" not in body:
            return st.just(body)
        return st.sampled_from([body, {**body, "model_id": seeded.model_id,
                                       "dataset_id": seeded.dataset_id}])

    return schema


@pytest.fixture
def contract_schema(settings: Settings, quiet_broker: QuietBroker, key: str) -> Iterator[Any]:
    yield _load(settings, quiet_broker, key, seed_tenant(settings, key))


schema = schemathesis.pytest.from_fixture("contract_schema")


@schema.parametrize()
@PER_OPERATION
def test_every_operation_conforms(case: Any, key: str) -> None:
    case.call_and_validate(excluded_checks=EXCLUDED)


def test_stateful_sequences_conform(settings: Settings, quiet_broker: QuietBroker,
                                    key: str) -> None:
    loaded = _load(settings, quiet_broker, key, seed_tenant(settings, key))

    class Machine(loaded.as_state_machine()):  # type: ignore[misc]
        def validate_response(self, response: Any, case: Any, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=EXCLUDED,
                                   transport_kwargs=kwargs or None, recorder=self.recorder)

    Machine.run(settings=STATEFUL)
