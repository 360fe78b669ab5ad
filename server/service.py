"""The server's logic, free of HTTP: making adapters (AdapterService) and text (GenerationService).

Routes only translate between these and the wire format, so this is what the unit tests drive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import NoReturn

from generator.maker import AdapterMaker, MadeAdapter, ServedModel
from server import metrics
from server.batcher import AdaptBatcher
from server.engine import Delta, Engine, LoRA, LoRAFolders, SamplingOptions, check_adapter_id
from server.errors import (
    AdapterMismatch,
    AdapterNotFound,
    ContextTooLong,
    EmptyContext,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    RoleNotServed,
    ServerError,
)
from server.limits import TenantLimits
from server.protocol import (
    AdapterInfo,
    AdaptRequest,
    AdaptResponse,
    FinishReason,
    SamplingFields,
    new_id,
    now,
)
from server.settings import Settings
from server.store import AdapterStore, Factory, Listed, StoredAdapter, digest


class AdapterService:
    """Context -> adapter, cached by content address; one generator run per new context."""

    def __init__(
        self,
        maker: ServedModel,
        store: AdapterStore,
        settings: Settings,
        limits: TenantLimits,
        batcher: AdaptBatcher | None,
    ) -> None:
        self.maker = maker
        self._batcher = batcher  # None: role `generate`, no generator loaded
        self.store = store
        self.settings = settings
        self.limits = limits
        self.base_name = settings.served_model_name or maker.base_model

    @property
    def batcher(self) -> AdaptBatcher:
        """What runs the generator, which a server of role `generate` does not load (its
        routes refuse adapting first: server.deps.check_role)."""
        if self._batcher is None:
            raise RoleNotServed("this server loads no generator: its role is 'generate'")
        return self._batcher

    @property
    def generator(self) -> AdapterMaker:
        return self.batcher.maker

    def context_text(self, request: AdaptRequest) -> str:
        """One canonical string per input, so equal inputs hash to equal ids."""
        if request.messages is not None:
            if not request.messages:
                return ""
            messages = [m.model_dump() for m in request.messages]
            return self.maker.chat_text(messages, add_generation_prompt=False)
        if request.documents is not None:
            return "\n\n".join(request.documents)
        return request.context or ""

    async def adapt(self, request: AdaptRequest, tenant: str) -> AdaptResponse:
        """The adapter of this context (extending `parent` if given) or of adapters composed,
        from cache or made now."""
        start = time.perf_counter()
        with self.batcher.on_the_way() as arrived:  # read beside the adapts sent with it
            info, created = await self._get_or_make(request, tenant, arrived)
        cache = "miss" if created else "hit"
        seconds = time.perf_counter() - start
        metrics.ADAPT_CACHE.labels(cache).inc()
        metrics.ADAPT_SECONDS.labels(cache).observe(seconds)
        return AdaptResponse(
            adapter_id=info.id,
            tokens=info.tokens,
            cached=not created,
            created_at=info.created_at,
            base_model=info.base_model,
            parent=info.parent,
            composed=info.composed,
            seconds=seconds,
        )

    async def _get_or_make(
        self, request: AdaptRequest, tenant: str, arrived: Callable[[], None]
    ) -> tuple[AdapterInfo, bool]:
        make: Factory
        if request.compose is not None:
            parts = sorted(check_adapter_id(a) for a in request.compose)  # order-independent
            aid = self.generator.composed_id(parts, tenant)
            make = partial(self._compose, aid, parts, tenant)
        else:
            text, ids = await self.context_ids(request)
            parent = None if request.parent is None else check_adapter_id(request.parent)
            aid = self.generator.adapter_id(text, parent, tenant)
            make = partial(self._create, aid, ids, parent, tenant, arrived)

        async def new() -> StoredAdapter:
            await self.limits.new_adapter(tenant, self.store)  # a cache hit takes no place
            return await make()

        return await self.store.get_or_create(aid, new)

    async def context_ids(self, request: AdaptRequest) -> tuple[str, list[int]]:
        """The canonical text of a request's context and its tokens, within the limit."""
        text = self.context_text(request)
        limit = self.settings.max_context_tokens
        at_least = len(text) // self.maker.max_token_chars  # known before tokenizing it
        if at_least > limit:
            raise too_long(f"at least {at_least}", limit)
        ids = await asyncio.to_thread(self.maker.tokenize, text) if text.strip() else []
        if not ids:
            raise EmptyContext("context is empty: it has no tokens to adapt to", param="context")
        if len(ids) > limit:
            raise too_long(str(len(ids)), limit)
        return text, ids

    async def _create(
        self,
        aid: str,
        ids: list[int],
        parent_id: str | None,
        tenant: str,
        arrived: Callable[[], None],
    ) -> StoredAdapter:
        parent_state = None
        if parent_id is not None:
            parent_state = (await self._extendable(parent_id, "parent", tenant)).adapter.state
        metrics.ADAPT_QUEUE.inc()
        try:
            # a tenant runs at most `tenant_adapts` generators at once (a 429 beyond); cache
            # hits and requests waiting for the same context take none
            async with self.limits.adapting(tenant):
                adapter = await self.batcher.make(ids, parent_state, arrived)
        finally:
            metrics.ADAPT_QUEUE.dec()
        return StoredAdapter(self._info(aid, adapter, tenant, parent=parent_id), adapter)

    async def _compose(self, aid: str, part_ids: list[str], tenant: str) -> StoredAdapter:
        """The sum of the adapters' raw states, as if their contexts were windows of one: no
        text is read, so no generator slot is taken."""
        parts = [await self._extendable(p, "compose", tenant) for p in part_ids]
        adapter = await self.batcher.compose([p.adapter.state for p in parts])
        return StoredAdapter(self._info(aid, adapter, tenant, composed=part_ids), adapter)

    async def _extendable(self, aid: str, param: str, tenant: str) -> StoredAdapter:
        """A stored adapter of `tenant` whose state this generator can continue (404, 409)."""
        stored = await self.store.get(aid)
        if stored is None or stored.info.tenant != tenant:
            raise AdapterNotFound(f"{param} adapter {aid} not found", param=param)
        self.check_compatible(stored.info, extend=True)
        return stored

    def _info(
        self,
        aid: str,
        adapter: MadeAdapter,
        tenant: str,
        parent: str | None = None,
        composed: list[str] | None = None,
    ) -> AdapterInfo:
        return AdapterInfo(
            id=aid,
            created_at=now(),
            tokens=adapter.tokens,
            base_model=self.base_name,
            fingerprint=self.generator.fingerprint,
            lora_rank=self.maker.lora_rank,
            parent=parent,
            composed=composed,
            tenant=tenant,
            sha256=digest(adapter),
        )

    def check_compatible(self, info: AdapterInfo, extend: bool = False) -> None:
        """A stored adapter made for another base model or rank (or, to extend it, another
        generator) cannot be used here: say which, instead of failing inside vLLM."""
        want = {"base_model": self.base_name, "lora_rank": self.maker.lora_rank}
        if extend:
            want["fingerprint"] = self.generator.fingerprint
        for field, value in want.items():
            if getattr(info, field) != value:
                raise AdapterMismatch(
                    f"adapter {info.id} has {field} {getattr(info, field)!r}; this server "
                    f"serves {value!r} (it was made by a server with another setup)"
                )

    async def info(self, aid: str, tenant: str) -> AdapterInfo:
        """An adapter of `tenant`; any other, like one never made, is a 404 (slides its TTL)."""
        return owned(await self.store.touch(check_adapter_id(aid)), aid, tenant)

    async def delete(self, aid: str, tenant: str) -> bool:
        await self.info(aid, tenant)
        if not await self.store.delete(aid):
            raise gone(aid)
        return True

    async def list(self, tenant: str) -> list[Listed]:
        return await self.store.list(tenant)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


class GenerationService:
    """Prompts -> text with the base model or an adapter, through the multi-LoRA engine."""

    def __init__(
        self, adapters: AdapterService, engine: Engine, folders: LoRAFolders, settings: Settings
    ) -> None:
        self.adapters = adapters
        self.maker = adapters.maker
        self.store = adapters.store
        self.engine = engine
        self.folders = folders
        self.settings = settings
        self._materialize_lock = asyncio.Lock()  # one writer per adapter folder

    def adapter_for_model(self, model: str | None) -> str | None:
        """OpenAI's `model`: the base model's name or none (None), or an adapter id."""
        if model is None or model == self.adapters.base_name:
            return None
        if model.startswith("ga-"):
            return check_adapter_id(model)
        raise ModelNotFound(
            f"model {model!r} does not exist: use {self.adapters.base_name!r} or an adapter id",
            param="model",
        )

    async def lora(self, aid: str | None, tenant: str) -> LoRA | None:
        """The engine's handle for an adapter of `tenant`, fetched from the store if this
        process lacks it.

        Every use slides the adapter's TTL; a deleted or expired adapter is a 404 here even if
        this process still has its folder, as is another tenant's.
        """
        if aid is None:
            return None
        found = await self.store.touch(check_adapter_id(aid))
        if found is None:
            self.folders.remove(aid)  # gone from the store: gone here too
        info = owned(found, aid, tenant)
        async with self._materialize_lock:
            if (lora := self.folders.get(aid)) is not None:
                return lora
            self.adapters.check_compatible(info)
            stored = await self.store.get(aid)
            if stored is None:
                raise gone(aid)  # expired or evicted just now
            return self.folders.add(aid, stored.adapter)

    async def use_model(self, model: str | None, tenant: str) -> None:
        """Make OpenAI's `model` ready for the engine's OpenAI layer: an adapter is fetched
        (404, 409 as for any use) and made known to the layer by its id."""
        lora = await self.lora(self.adapter_for_model(model), tenant)
        if lora is not None:
            self.engine.openai.add(lora)

    def user_prompt(self, prompt: str) -> list[int]:
        """`prompt` as one user turn in the base model's chat template."""
        message = {"role": "user", "content": prompt}
        return self.maker.tokenize(self.maker.chat_text([message], add_generation_prompt=True))

    def options(
        self, request: SamplingFields, prompt_tokens: int, max_tokens: int | None = None
    ) -> SamplingOptions:
        """Sampling options; the prompt plus the new tokens must fit the engine's length."""
        room = self.settings.max_model_len - prompt_tokens
        wanted = max_tokens or request.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise InvalidRequest(
                f"prompt has {prompt_tokens} tokens and max_tokens is {wanted}; together they "
                f"must fit max_model_len {self.settings.max_model_len}",
                param="max_tokens",
            )
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        return SamplingOptions(
            max_tokens=wanted or min(self.settings.default_max_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=stop,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
        )

    async def stream(
        self, prompt_ids: list[int], options: SamplingOptions, lora: LoRA | None
    ) -> AsyncGenerator[Delta, None]:
        """Start a generation and wait for its first output, so that failures to start raise
        here (an HTTP error) rather than inside a response already sent."""
        deltas = self.engine.generate(prompt_ids, options, lora, new_id("req"))
        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            first = await anext(deltas, None)
        except BaseException as e:
            metrics.REQUESTS_IN_FLIGHT.dec()
            await deltas.aclose()
            raise_engine_error(e)
        return self._rest(deltas, first, "base" if lora is None else "adapter")

    async def _rest(
        self, deltas: AsyncGenerator[Delta, None], first: Delta | None, kind: str
    ) -> AsyncGenerator[Delta, None]:
        try:
            if first is not None:
                metrics.GENERATED_TOKENS.labels(kind).inc(len(first.token_ids))
                yield first
            async for delta in deltas:
                metrics.GENERATED_TOKENS.labels(kind).inc(len(delta.token_ids))
                yield delta
        except Exception as e:
            raise_engine_error(e)
        finally:
            metrics.REQUESTS_IN_FLIGHT.dec()
            await deltas.aclose()

    async def complete(
        self, prompt_ids: list[int], options: SamplingOptions, lora: LoRA | None
    ) -> Completion:
        text, token_ids, finish = [], [], None
        async for delta in await self.stream(prompt_ids, options, lora):
            text.append(delta.text)
            token_ids += delta.token_ids
            finish = delta.finish_reason or finish
        return Completion("".join(text), token_ids, finish, len(prompt_ids))


def owned(info: AdapterInfo | None, aid: str, tenant: str) -> AdapterInfo:
    """The metadata if the adapter exists and is `tenant`'s; another's is a 404 like a missing
    one, so a tenant cannot learn what others have."""
    if info is None or info.tenant != tenant:
        raise gone(aid)
    return info


def gone(aid: str) -> AdapterNotFound:
    """One answer for every missing adapter, so a tenant learns nothing of others'; it says what
    to do in the common case, an adapter unused past its TTL or evicted from a full store."""
    return AdapterNotFound(
        f"adapter {aid} not found: it expired (unused past its TTL, or evicted from a full "
        "store), was deleted or never existed; adapt its context again"
    )


def too_long(tokens: str, limit: int) -> ContextTooLong:
    return ContextTooLong(
        f"context has {tokens} tokens; the limit is {limit} "
        "(GENADAPTER_MAX_CONTEXT_TOKENS); split it and extend with `parent`",
        param="context",
    )


def raise_engine_error(e: BaseException) -> NoReturn:
    """Our errors pass; the engine's bad-input errors are 400s, anything else a 503."""
    if isinstance(e, ServerError) or not isinstance(e, Exception):
        raise e
    if isinstance(e, ValueError):
        raise InvalidRequest(f"the engine refused the request: {e}") from e
    raise EngineUnavailable(f"generation failed: {type(e).__name__}: {e}") from e
