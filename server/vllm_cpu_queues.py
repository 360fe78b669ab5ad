"""vLLM's shared-memory queues on a CPU: their readers spin for 10 ms after a message instead of
vLLM's 1 s before they sleep. Run by vLLM as a plugin (pyproject.toml's entry point) in each of
its processes. Only vLLM imports it.

A reader of those queues (the worker waiting for the next step, the engine core waiting for its
worker's output) loops on `sched_yield` for `busy_loop_s` after each message, then sleeps until
the writer's notification. On a 2-core CPU that took a core from whatever computed next, such as
the generator reading a context right after the engine's last step. Measured here (AMD EPYC, 2
cores): in the 0.9 s after a one-token request, vLLM's worker used 0.91 s of CPU with vLLM's 1 s,
0.02 s with 10 ms; a 300-token adapt right after a prefill took 0.36-0.37 s (outliers to 0.53)
with 1 s, 0.30-0.32 s with 10 ms. Never spinning (0) stalled generation to 43 tokens/s: a
notification lost between two quick messages leaves a sleeping reader waiting for vLLM's 5 s
recheck, which a short spin still covers (the second message is there when it looks).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

SPIN_S = 0.01  # vLLM's readers spin this long after a message before they sleep


class VllmQueuesChanged(RuntimeError):
    """The pinned vLLM's SpinCondition no longer takes `busy_loop_s`: this module needs a look."""


@functools.cache
def spin_briefly() -> None:
    """New readers of vLLM's shared-memory queues spin SPIN_S (unless vLLM names another time);
    fails loudly (the engine does not start) where vLLM's SpinCondition takes no such time."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    vllms = SpinCondition.__init__
    if "busy_loop_s" not in inspect.signature(vllms).parameters:
        raise VllmQueuesChanged(
            f"vLLM's SpinCondition{inspect.signature(vllms)} takes no busy_loop_s: update "
            "server/vllm_cpu_queues.py for this vLLM"
        )

    @functools.wraps(vllms)
    def spinning_briefly(self: SpinCondition, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("busy_loop_s", SPIN_S)
        vllms(self, *args, **kwargs)

    SpinCondition.__init__ = spinning_briefly  # type: ignore[method-assign]
