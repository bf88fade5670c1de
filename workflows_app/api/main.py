"""The NinjaAPI object: routers, error handlers, the OpenAPI description."""

from __future__ import annotations

from ninja import NinjaAPI, Swagger

from workflows_app.api import bulk_jobs, errors, inbound, instances, operator
from workflows_app.api.body import StrictJSONParser

DESCRIPTION = """\
Start workflow instances, follow them, and report results to waiting steps.

**Authentication**: `Authorization: Bearer <token>`. Tokens are created in the
admin or with `manage.py create_api_token NAME --scopes start,read,report`.
Scopes: `start` (start instances), `read` (GET endpoints), `report`
(callbacks and events), `operate` (operator actions, approvals and bulk
jobs, as the token's user: `create_api_token NAME --scopes operate --user
USERNAME`; the timeline names that person and their permissions apply).

**Errors**: every 4xx and 5xx has the body
`{"error": {"code": "...", "message": "..."}}` (validation errors add
`details`). Bad input never creates anything. Codes: `invalid_json`,
`invalid_body`, `idempotency_key_required`, `invalid_cursor` (400);
`unauthorized` (401); `forbidden`, `approval_required` (403); `not_found`,
`unknown_definition`, `unknown_instance`, `unknown_task_token`,
`unknown_action`, `unknown_approval`, `unknown_bulk_job` (404);
`method_not_allowed` (405); `idempotency_conflict`, `already_changed`,
`transition_not_allowed` (409); `length_required` (411);
`payload_too_large` (413); `unsupported_media_type` (415); `invalid_request`
(422: shape or types), `invalid_input` (422: values the engine refuses);
`internal_error` (500); `database_unavailable` (503, with `Retry-After`:
send the request again later, with the same `Idempotency-Key`).

**Bodies**: JSON as PostgreSQL stores it: no NaN or Infinity, no number
beyond the double range, no lone surrogate (`\\ud800`), no NUL (`\\u0000`),
at most 64 levels deep. A chunked body (`Transfer-Encoding: chunked`) is
accepted.

**Replays**: callbacks and events carry an `id`; sending the same id again
returns the first answer with `replay: true` and changes nothing. Starting
with a used `Idempotency-Key` returns the existing instance (200).

**Status vocabulary**: accepted, running, needs_attention, compensating,
completed, compensated, cancelled, failed. *Accepted* means "durably recorded,
will be worked on"; *completed* means "the business outcome happened".
"""

api = NinjaAPI(
    title="Saga Desk API",
    version="1",
    description=DESCRIPTION,
    urls_namespace="api-v1",
    # Served from the app's own static files ("ninja" is an installed app),
    # so the docs page works without internet access.
    docs=Swagger(settings={"persistAuthorization": True}),
    parser=StrictJSONParser(),
)
errors.install(api)
api.add_router("", instances.router, tags=["instances"])
api.add_router("", inbound.router, tags=["inbound messages"])
api.add_router("", operator.router, tags=["operator actions"])
api.add_router("", bulk_jobs.router, tags=["bulk jobs"])
