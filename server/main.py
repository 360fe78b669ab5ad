"""The FastAPI app: `create_app(settings)` wires the adapter maker, the store and the engine.

Tests pass a small adapter maker, a store and a fake engine factory; `genadapter serve` passes none
and gets the real ones (vLLM starts in the lifespan, in about a minute on a CPU).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI

from generator.maker import AdapterMaker, ServedModel, load_maker, load_served_model
from server.auth import ApiKeys, KeyRequired
from server.batcher import AdaptBatcher
from server.body_limit import BodyLimit
from server.engine import Engine, LoRAFolders, VllmEngine
from server.errors import install_error_handlers
from server.limits import TenantLimits
from server.routers import adapters, generate, health, openai
from server.service import AdapterService, GenerationService
from server.settings import Settings
from server.store import AdapterStore, open_store

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, ServedModel], Engine]


def create_app(
    settings: Settings | None = None,
    *,
    maker: AdapterMaker | None = None,
    store: AdapterStore | None = None,
    engine_factory: EngineFactory = VllmEngine,
) -> FastAPI:
    """The server app; what is not given is built from `settings` when the app starts."""
    settings = settings or Settings()

    def load_generator() -> AdapterMaker:
        return maker or load_maker(settings.base_model, settings.generator, settings.adapt_dtype)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model: ServedModel
        batcher = None
        if settings.role == "generate" and maker is None:  # vLLM alone loads the weights
            model = await asyncio.to_thread(
                load_served_model, settings.base_model, settings.generator
            )
        else:  # the generator's thread loads it (server.batcher says why)
            batcher = AdaptBatcher(load_generator, settings.adapt_batch, settings.adapt_pass_tokens)
            model = await batcher.loaded()
        adapter_store = store or open_store(settings)
        app.state.settings = settings
        app.state.adapters = AdapterService(
            model, adapter_store, settings, app.state.limits, batcher
        )
        app.state.generation = None
        if settings.role != "adapt":
            log.info("starting the engine for %s", model.base_model_path)
            engine = engine_factory(settings, model)
            await engine.start()
            folders = LoRAFolders(
                settings.shm_dir, 2 * settings.max_cpu_loras, on_remove=engine.openai.remove
            )
            app.state.generation = GenerationService(app.state.adapters, engine, folders, settings)
            if batcher is not None:
                batcher.yield_to(engine.busy, settings.adapt_yield_s)
        log.info("ready: role %s, base model %r", settings.role, app.state.adapters.base_name)
        try:
            yield
        finally:
            if app.state.generation is not None:
                app.state.generation.engine.shutdown()
                app.state.generation.folders.clear()
            if batcher is not None:
                batcher.close()
            await adapter_store.close()

    app = FastAPI(
        title="Generative Adapter server",
        summary="A context becomes a LoRA adapter in one forward pass; served by vLLM.",
        version=version("generative-adapter"),  # pyproject.toml's, the one place it is written
        lifespan=lifespan,
    )
    app.state.api_keys = api_keys = ApiKeys.load(settings.api_keys, settings.api_keys_file)
    if not api_keys.enabled:
        log.warning(
            "no API keys configured: single-tenant development mode, every caller sees every "
            "adapter (set GENADAPTER_API_KEYS or --api-keys-file)"
        )
    app.state.limits = TenantLimits(settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    for module in (adapters, generate, openai, health):
        app.include_router(module.router)
    if api_keys.enabled and not settings.public_docs:
        docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
        paths = {p for p in docs if p} | {app.url_path_for("metrics")}
        app.add_middleware(KeyRequired, keys=api_keys, paths=paths)
    return app


def serve(settings: Settings) -> None:
    """Run the server with uvicorn until interrupted. Without API keys it listens only on a
    loopback address, unless told `allow_insecure`."""
    import ipaddress

    import uvicorn

    keys = settings.api_keys or settings.api_keys_file
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:  # a host name
        loopback = settings.host == "localhost"
    if not (keys or loopback or settings.allow_insecure):
        raise SystemExit(
            f"genadapter serve: error: no API keys to serve on {settings.host}: set "
            "GENADAPTER_API_KEYS (or --api-keys-file), or pass --allow-insecure"
        )
    if settings.role != "all" and not settings.redis_url:
        raise SystemExit(
            f"genadapter serve: error: role {settings.role!r} shares its adapters with the "
            "other role's servers through Redis: set GENADAPTER_REDIS_URL"
        )

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
