"""Health (liveness and readiness) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import SettingsDep
from server.errors import ServerError
from server.protocol import HealthResponse
from server.service import GenerationService

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request, settings: SettingsDep) -> JSONResponse:
    """Answers while the process lives; 200 only when what its role runs works: the store
    (reachable and taking writes) and, unless the role is adapt, the engine."""
    generation: GenerationService | None = request.app.state.generation
    checks = {"store": request.app.state.adapters.store.ping}
    if generation is not None:
        checks["engine"] = generation.engine.check_health
    found = {"engine": f"none: role {settings.role!r} runs no engine"}
    for name, check in checks.items():
        try:
            await check()
            found[name] = "ok"
        except ServerError as e:
            found[name] = e.message
    ready = all(found[name] == "ok" for name in checks)
    body = HealthResponse(ready=ready, role=settings.role, **found)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics: adapt latency and cache hits, generated tokens, queue depth."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
