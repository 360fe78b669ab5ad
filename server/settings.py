"""Every server setting in one place: flags of `genadapter serve` or `GENADAPTER_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Role = Literal["all", "adapt", "generate"]
# generator.maker.ReadingDType (not imported: settings load without torch; a test keeps them equal)
AdaptDType = Literal["auto", "float32", "bfloat16"]


class Settings(BaseSettings):
    """Server configuration; each field is also the environment variable `GENADAPTER_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="GENADAPTER_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    role: Role = Field(
        "all", description="all: generator and engine; adapt: the generator; generate: the engine"
    )
    base_model: str | None = Field(None, description="HF folder or .gguf (default: SmolLM2)")
    generator: Path | None = Field(None, description="generator folder (default: shipped one)")
    served_model_name: str | None = Field(None, description="base model's API name")

    api_keys: str | None = Field(
        None, description="tenant:key pairs, comma-separated (none: single-tenant development)"
    )
    api_keys_file: Path | None = Field(None, description="a file of 'tenant key' lines")
    allow_insecure: bool = Field(
        False, description="serve without keys on an address other than loopback"
    )
    adapt_batch: int = Field(
        8, gt=0, description="contexts the generator reads in one batch (continuous batching)"
    )
    adapt_yield_s: float = Field(
        1.0,
        ge=0,
        description="longest a pass of adapting waits for the engine's requests in flight to "
        "finish first (0: never waits)",
    )
    adapt_pass_tokens: int = Field(
        2048,
        gt=0,
        description="most context tokens the generator reads in one forward; before each it "
        "lets the engine go first (adapt_yield_s)",
    )
    adapt_dtype: AdaptDType = Field(
        "auto",
        description="dtype the generator reads contexts in; auto: bfloat16 where the CPU has it "
        "natively, else float32",
    )
    public_docs: bool = Field(
        False, description="with keys, /docs, /redoc, /openapi.json and /metrics need none"
    )
    tenant_adapts: int = Field(4, gt=0, description="adapts of one tenant running at once")
    tenant_requests_per_minute: int = Field(
        0, ge=0, description="requests per minute per tenant (0: no limit)"
    )
    tenant_adapters: int = Field(
        1000, ge=0, description="adapters one tenant may store (0: no limit)"
    )
    redis_url: str | None = Field(None, description="None: in-process store")
    redis_prefix: str = Field(
        "genadapter",
        pattern=r"^[^{}]*$",  # braces would move the keys' Redis Cluster hash slots
        description="prefix of this server's Redis keys",
    )
    redis_cluster: bool = Field(False, description="the Redis URL names a node of a Redis Cluster")
    adapter_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="sliding, per adapter")
    memory_store_bytes: int = Field(2 << 30, gt=0, description="in-process store LRU budget")
    lock_timeout_s: float = Field(
        30, gt=0, description="how long the adapt lock of a server that died blocks others"
    )

    shutdown_grace_s: int = Field(
        30, gt=0, description="on SIGTERM, how long requests in flight may finish"
    )
    max_context_tokens: int = Field(32768, gt=0, description="longer contexts get 413")
    max_body_bytes: int = Field(4 << 20, gt=0, description="larger request bodies get 413")
    default_max_tokens: int = Field(256, gt=0, description="when a request sets none")
    shm_dir: Path = Field(Path("/dev/shm/genadapter"), description="RAM folder for vLLM's LoRAs")

    max_loras: int = Field(16, gt=0, description="distinct adapters in one batch")
    max_cpu_loras: int = Field(32, gt=0, description="adapters kept loaded by vLLM")
    max_model_len: int = Field(2048, gt=0, description="prompt + output tokens")
    kv_cache_gib: int = Field(
        2, gt=0, description="vLLM's KV cache on a CPU in whole GiB (a GPU sizes its own)"
    )
    dtype: str = Field(
        "auto",
        description="engine dtype; auto: bfloat16 on a GPU or a CPU with native bfloat16, "
        "else float32",
    )
    tensor_parallel_size: int = Field(1, gt=0, description="devices that share each layer")
    pipeline_parallel_size: int = Field(1, gt=0, description="device groups, each some layers")
