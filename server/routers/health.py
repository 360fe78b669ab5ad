"""Health (liveness and readiness) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import GenerationServiceDep
from server.errors import ServerError
from server.protocol import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(generation: GenerationServiceDep) -> JSONResponse:
    """Answers while the process lives; 200 only when the engine and the store both work."""
    checks = {}
    for name, check in (
        ("engine", generation.engine.check_health),
        ("store", generation.store.ping),
    ):
        try:
            await check()
            checks[name] = "ok"
        except ServerError as e:
            checks[name] = e.message
    body = HealthResponse(ready=all(v == "ok" for v in checks.values()), **checks)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics: adapt latency and cache hits, generated tokens, queue depth."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
