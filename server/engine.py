"""The generation engine: vLLM's multi-LoRA AsyncLLM, and the adapter folders it loads.

vLLM 0.3x loads a LoRA only from a PEFT folder, so each adapter is written once per process
under a RAM-backed folder (`shm_dir/<pid>/<adapter id>/`) and named in a `LoRARequest` with its
own name, path and a stable integer id derived from the adapter id: vLLM's prefix cache keys
include the LoRA's name and path, so two adapters must never share them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from fastapi import Request

from generator.maker import MadeAdapter, ServedModel
from server.errors import EngineUnavailable, InvalidAdapterId
from server.protocol import ADAPTER_ID_PATTERN, FinishReason
from server.settings import Settings
from server.vllm_openai import ChatCompletionRequest, CompletionRequest, OpenAIResult, VllmOpenAI

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

log = logging.getLogger(__name__)

MAX_LORA_INT_ID = 2**31 - 1
ENGINE_WATCH_S = 2  # how often a server checks that its engine lives
ENGINE_DIED = 70  # exit status when it did not (EX_SOFTWARE)
# vLLM's max_lora_rank accepts only these values; an adapter's rank may be any up to it.
VllmLoraRank = Literal[8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS: tuple[VllmLoraRank, ...] = get_args(VllmLoraRank)
_ADAPTER_ID = re.compile(ADAPTER_ID_PATTERN)


def check_adapter_id(adapter_id: str) -> str:
    """The id, if it has our exact form; it becomes a folder name, so nothing else may pass."""
    if not _ADAPTER_ID.fullmatch(adapter_id):
        raise InvalidAdapterId(
            f"invalid adapter id {adapter_id[:80]!r}: expected 'ga-' and 32 hex digits",
            param="adapter_id",
        )
    return adapter_id


def vllm_rank(rank: int) -> VllmLoraRank:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason (a plain str), checked to be one the wire format carries.

    vLLM reports "stop", "length" and "abort" for our requests; its other reasons ("error" for
    a failure inside the engine, "repetition" with repetition detection on) end no generation
    we can report, so they fail here as the engine's error.
    """
    match reason:
        case None | "stop" | "length" | "abort":
            return reason
    raise RuntimeError(f"the engine finished the request with reason {reason!r}")


@dataclass(frozen=True)
class LoRA:
    """What the engine needs to apply one adapter (vLLM's LoRARequest fields)."""

    name: str
    int_id: int
    path: Path


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Delta:
    """New output of one request since the previous Delta."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason = None


class OpenAILayer(Protocol):
    """OpenAI's chat completions and completions on the engine (server/vllm_openai.py)."""

    async def chat(
        self, request: ChatCompletionRequest, raw: Request | None = None
    ) -> OpenAIResult: ...

    async def complete(
        self, request: CompletionRequest, raw: Request | None = None
    ) -> OpenAIResult: ...

    def add(self, lora: LoRA) -> None:
        """Requests naming `lora.name` as their model run with it."""

    def remove(self, name: str) -> None: ...


class Engine(Protocol):
    """What the server needs from an engine; tests pass a fake one."""

    @property
    def openai(self) -> OpenAILayer:
        """OpenAI's endpoints on this engine, once started."""
        ...

    async def start(self) -> None:
        """Finish starting (what needs the event loop)."""

    def generate(
        self, prompt_ids: list[int], options: SamplingOptions, lora: LoRA | None, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Stream the new text and token ids of one request (an async generator)."""
        ...

    def busy(self) -> bool:
        """Requests are in flight (the generator lets them run first); any thread may ask."""
        ...

    async def check_health(self) -> None:
        """Raise EngineUnavailable if it cannot serve."""

    def shutdown(self) -> None: ...


def remove_stale_folders(root: Path) -> None:
    """Folders of server processes that are gone (one that exited abruptly leaves its own)."""
    for folder in root.glob("[0-9]*"):
        try:
            os.kill(int(folder.name), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (PermissionError, ValueError):  # alive, another user's / not a pid
            continue


class LoRAFolders:
    """Adapter folders of this process, at most `capacity`, least recently used removed first.

    Integer ids come from the adapter id's hash; a clash within the process (1 in 2**31 per
    pair) moves to the next free integer, so two adapters never share a vLLM slot.
    """

    def __init__(
        self, root: Path, capacity: int, on_remove: Callable[[str], None] = lambda _: None
    ) -> None:
        self.root = root / str(os.getpid())
        self.capacity = capacity
        remove_stale_folders(root)
        self.on_remove = on_remove  # told each adapter id whose folder is gone
        self._loras: OrderedDict[str, LoRA] = OrderedDict()
        self._int_ids: dict[int, str] = {}

    def get(self, adapter_id: str) -> LoRA | None:
        lora = self._loras.get(check_adapter_id(adapter_id))
        if lora is None or not lora.path.is_dir():
            return None
        self._loras.move_to_end(adapter_id)
        return lora

    def add(self, adapter_id: str, adapter: MadeAdapter) -> LoRA:
        path = adapter.write(self.root / check_adapter_id(adapter_id))
        lora = self._loras.get(adapter_id) or LoRA(adapter_id, self._int_id(adapter_id), path)
        self._loras[adapter_id] = lora
        self._loras.move_to_end(adapter_id)
        while len(self._loras) > self.capacity:
            self.remove(next(iter(self._loras)))
        return lora

    def _int_id(self, adapter_id: str) -> int:
        n = int(adapter_id[3:11], 16) % MAX_LORA_INT_ID + 1
        while self._int_ids.get(n, adapter_id) != adapter_id:
            n = n % MAX_LORA_INT_ID + 1
        self._int_ids[n] = adapter_id
        return n

    def remove(self, adapter_id: str) -> None:
        lora = self._loras.pop(check_adapter_id(adapter_id), None)
        if lora is not None:
            del self._int_ids[lora.int_id]
            self.on_remove(adapter_id)
            shutil.rmtree(lora.path, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._loras.clear()
        self._int_ids.clear()


def engine_args(settings: Settings, model: ServedModel) -> AsyncEngineArgs:
    """vLLM's engine arguments for our adapters on `model`. A base model too large for one
    device is split across several: `tensor_parallel_size` devices share each layer,
    `pipeline_parallel_size` groups hold consecutive layers (their product: devices used)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.vllm_env import engine_dtype

    return AsyncEngineArgs(
        model=str(model.base_model_path),
        enable_lora=True,
        max_lora_rank=vllm_rank(model.lora_rank),
        # Only the modules our adapters change carry LoRA layers: the others would cost every
        # request their LoRA kernels for nothing, and vLLM 0.32's LoRA-wrapped lm_head fails on
        # prompt logprobs on a CPU (and takes the engine down with it).
        lora_target_modules=model.target_modules,
        max_loras=settings.max_loras,
        max_cpu_loras=max(settings.max_cpu_loras, settings.max_loras),
        dtype=engine_dtype(settings.dtype),
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        seed=0,
    )


class VllmEngine:
    """vLLM's AsyncLLM with LoRA enabled; starts an engine-core and a worker process per
    device."""

    openai: OpenAILayer

    def __init__(self, settings: Settings, model: ServedModel) -> None:
        from server.vllm_env import apply_vllm_env

        apply_vllm_env(settings.kv_cache_gib)
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(engine_args(settings, model))
        self._openai_args = (model.base_model_path, settings.served_model_name or model.base_model)

    async def start(self) -> None:
        self.openai = await VllmOpenAI.start(self.llm, *self._openai_args)
        self._watch = asyncio.create_task(self._exit_if_dead())

    async def _exit_if_dead(self) -> None:
        """vLLM's engine does not come back once its process died: exit non-zero, so that the
        supervisor restarts the server rather than it answering 503 for ever."""
        while not self.llm.errored:
            await asyncio.sleep(ENGINE_WATCH_S)
        log.critical("the engine died: exiting with status %d to be restarted", ENGINE_DIED)
        os._exit(ENGINE_DIED)  # the engine is gone; nothing is left to shut down in order

    async def generate(
        self, prompt_ids: list[int], options: SamplingOptions, lora: LoRA | None, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop,
            seed=options.seed,
            ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        request = None if lora is None else LoRARequest(lora.name, lora.int_id, str(lora.path))
        # vLLM marks TokensPrompt's other keys typing.NotRequired, which does not exist under
        # mypy's python_version 3.10, so mypy takes them as required.
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)  # type: ignore[typeddict-item]
        stream = self.llm.generate(prompt, params, request_id, lora_request=request)
        async for out in stream:
            c = out.outputs[0]
            reason = finish_reason(c.finish_reason) if out.finished else None
            yield Delta(c.text, list(c.token_ids), reason)

    def busy(self) -> bool:
        return self.llm.output_processor.has_unfinished_requests()

    async def check_health(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as e:  # vLLM raises its own EngineDeadError and others
            raise EngineUnavailable(f"engine unavailable: {e}") from e

    def shutdown(self) -> None:
        self._watch.cancel()  # an engine shut down on purpose is not one that died
        self.llm.shutdown()
