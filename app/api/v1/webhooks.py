"""Tenant webhooks: endpoints that receive every job's events, and their delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import SessionDep, TenantDep
from app.api.responses import AUTHED, READ, problems
from app.schemas.events import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryList,
    WebhookList,
    WebhookOut,
    WebhookUpdate,
)
from app.services import webhooks as service

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookCreated, responses=problems(*AUTHED),
             operation_id="createWebhook")
def create_webhook(body: WebhookCreate, tenant: TenantDep, session: SessionDep,
                   ) -> WebhookCreated:
    """Register an endpoint for the tenant's job events; the answer holds the signing secret
    (shown only here)."""
    hook = service.create(session, tenant.tenant_id, body)
    out = WebhookCreated(**WebhookOut.model_validate(hook).model_dump(), secret=hook.secret)
    session.commit()
    return out


@router.get("", response_model=WebhookList, responses=problems(*AUTHED),
            operation_id="listWebhooks")
def list_webhooks(tenant: TenantDep, session: SessionDep) -> WebhookList:
    """The tenant's webhooks, including jobs' own (``job_id`` set)."""
    return WebhookList(items=[WebhookOut.model_validate(h)
                              for h in service.list_for_tenant(session, tenant.tenant_id)])


@router.get("/{webhook_id}", response_model=WebhookOut, responses=READ,
            operation_id="getWebhook")
def get_webhook(webhook_id: str, tenant: TenantDep, session: SessionDep) -> WebhookOut:
    return WebhookOut.model_validate(service.get(session, tenant.tenant_id, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookOut, responses=READ,
              operation_id="updateWebhook")
def update_webhook(webhook_id: str, body: WebhookUpdate, tenant: TenantDep,
                   session: SessionDep) -> WebhookOut:
    out = WebhookOut.model_validate(service.update(session, tenant.tenant_id, webhook_id, body))
    session.commit()
    return out


@router.delete("/{webhook_id}", status_code=204, responses=READ, operation_id="deleteWebhook")
def delete_webhook(webhook_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Delete the endpoint and its delivery log; pending deliveries are dropped."""
    service.delete(session, tenant.tenant_id, webhook_id)
    session.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveryList, responses=READ,
            operation_id="listWebhookDeliveries")
def list_webhook_deliveries(webhook_id: str, tenant: TenantDep, session: SessionDep,
                            limit: Annotated[int, Query(ge=1, le=100)] = 50,
                            ) -> WebhookDeliveryList:
    """The endpoint's latest deliveries (newest first), each with its attempts."""
    return WebhookDeliveryList(items=service.deliveries_for_webhook(
        session, tenant.tenant_id, webhook_id, limit))
