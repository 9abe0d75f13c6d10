"""Recompute policies for gradient checkpointing: the one home of "full" / "keep_base_outputs" / "auto".

"full" recomputes each checkpointed decoder layer entirely in backward. "keep_base_outputs" runs
torch.utils.checkpoint(use_reentrant=False, context_fn=keep_base_outputs_context_fn) around a decoder layer: the first
forward records every LoRA layer's frozen base output (x @ W^T, W dequantized) and the recomputation in backward reuses
it instead of recomputing the matmul; the LoRA branch, dropout masks (RNG replayed), norms and attention are still
recomputed. Costs one (tokens, out) tensor per targeted linear per layer (kept until backward); saves one base forward
matmul + dequantization per linear. "auto" is keep_base_outputs on CPU (compute-bound) and full on CUDA (memory-bound).
"""
from __future__ import annotations

import collections
import threading

from .config import CHECKPOINT_POLICIES

RECOMPUTE_POLICIES = tuple(p for p in CHECKPOINT_POLICIES if p != "auto")  # what a model accepts

_PHASE = threading.local()


def resolve_policy(policy: str, device_type: str) -> str:
    """The concrete policy for `policy` ("auto" -> keep_base_outputs on CPU, full elsewhere) on `device_type`."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    if policy == "auto":
        return "keep_base_outputs" if device_type == "cpu" else "full"
    return policy


class _BaseOutputs:
    def __init__(self) -> None:
        self.store: dict[int, collections.deque] = {}


class _PhaseContext:
    def __init__(self, cache: _BaseOutputs, phase: str):
        self.cache, self.phase = cache, phase

    def __enter__(self):
        stack = getattr(_PHASE, "stack", None)
        if stack is None:
            stack = _PHASE.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _PHASE.stack.pop()
        return False


def keep_base_outputs_context_fn() -> tuple[_PhaseContext, _PhaseContext]:
    """`context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`: (forward context that records
    the LoRA layers' base outputs, recomputation context that replays them)."""
    cache = _BaseOutputs()
    return _PhaseContext(cache, "record"), _PhaseContext(cache, "replay")


def _current_phase() -> _PhaseContext | None:
    stack = getattr(_PHASE, "stack", None)
    return stack[-1] if stack else None
