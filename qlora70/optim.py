"""`PagedAdamW`: AdamW whose states stay on the GPU when they fit and are offloaded to pinned host memory when not.

Math (identical to `torch.optim.AdamW`, single-tensor path), per parameter p with gradient g at step t:
    p      *= 1 - lr * weight_decay
    m       = lerp(m, g, 1 - beta1)
    v       = beta2 * v + (1 - beta2) * g * g
    p      -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Where the states live (`placement`; every placement runs the same ops on the same device, so the updates and the
state_dict are bit-identical whichever is chosen):
  * "device": every state next to its parameter (on the GPU for a CUDA parameter). Nothing moves over PCIe.
  * "offload": tensors with >= `page_min_numel` elements keep their states in host memory (pinned when CUDA is
    available). Before a parameter's update its states are copied to its device, after it they are copied back; the
    next parameter's states are copied on a side stream while the current one updates (prefetch). This costs the
    states' bytes twice per step over PCIe (about 13 GB per step for Llama-2-70B at r=64) and saves their GPU memory.
  * "auto" (default): on a CUDA device, decided once at the first `step()`, when the step's activation peak is already
    held by the caching allocator: "device" if the states fit in what the driver still has free minus a margin
    (`choose_placement`), else "offload". On a CPU, "device". The choice is logged (logger "qlora70.optim") and read
    back from `placement_of(device)`; `qlora70.planner` predicts it with the same rule.
  This is not bitsandbytes' paged optimizer, which allocates states in CUDA unified memory and lets the driver evict
  pages to the host only under memory pressure (it moves nothing while GPU memory suffices): here the decision is made
  once, explicitly, and an offloaded run moves its states every step.
  Tensors with < `page_min_numel` elements keep their states next to the parameter in every placement.
  * `optim_bits=8`: tensors with >= `min_8bit_size` elements keep m and v as blockwise 8-bit codes (block 256) with
    fp32 per-block absmax: m with the signed dynamic map, v with the unsigned one (as bitsandbytes' 8-bit Adam; the
    codec is `qlora70.nf4.quantize_blockwise_8bit`). Each update decodes to fp32, applies the math above, re-encodes.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch

from .nf4 import dequantize_blockwise_8bit, dynamic_zero_code, quantize_blockwise_8bit

BLOCK_8BIT = 256
PLACEMENTS = ("auto", "device", "offload")
_STATE_KEYS_32 = ("exp_avg", "exp_avg_sq")
_STATE_KEYS_8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
_GiB = 1024 ** 3
log = logging.getLogger("qlora70.optim")


def quantize_state(x: torch.Tensor, signed: bool, blocksize: int = BLOCK_8BIT) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit optimizer-state encoding: x [n] -> (codes uint8 [n], absmax fp32 [ceil(n / blocksize)])."""
    return quantize_blockwise_8bit(x, blocksize, signed=signed, divide=True)


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                     blocksize: int = BLOCK_8BIT) -> torch.Tensor:
    """Inverse of `quantize_state`: fp32 [n]."""
    return dequantize_blockwise_8bit(codes, absmax, blocksize, signed=signed)


def state_bytes(numel: int, optim_bits: int, min_8bit_size: int = 4096) -> int:
    """Bytes of AdamW's m and v for a tensor of `numel` elements (8-bit: codes + one fp32 absmax per 256)."""
    if optim_bits == 8 and numel >= min_8bit_size:
        return 2 * (numel + 4 * -(-numel // BLOCK_8BIT))
    return 8 * numel


def placement_margin(total_bytes: float) -> float:
    """Memory left free when the states are kept on the GPU: 1 GiB + 5% of the device (allocator slack, the update's
    fp32 temporaries, fragmentation)."""
    return 1 * _GiB + 0.05 * total_bytes


def choose_placement(states: float, free: float, total: float) -> str:
    """"device" if `states` bytes fit into `free` bytes (memory not needed by the step's peak) minus the margin of a
    device of `total` bytes, else "offload". The one rule used by `PagedAdamW(placement="auto")` and the planner."""
    return "device" if states <= free - placement_margin(total) else "offload"


def _adamw_math(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                beta1: float, beta2: float, eps: float, wd: float) -> None:
    """In-place AdamW update, the same op sequence as torch.optim.AdamW's single-tensor path."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bc1))


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with a state placement policy and optionally 8-bit states. Same hyper-parameters as `torch.optim.AdamW`.

    Args: params, lr, betas, eps, weight_decay; optim_bits 32 | 8; placement "auto" | "device" | "offload" (module
    docstring). Without `placement`: `offload=True` -> "offload", else `paged=True` -> "auto", `paged=False` ->
    "device" (the `TrainConfig.paged` / `optim_offload` fields). min_8bit_size: smaller tensors keep fp32 states in
    8-bit mode; page_min_numel: smaller tensors are never offloaded.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, optim_bits: int = 32, paged: bool = True,
                 min_8bit_size: int = 4096, page_min_numel: int | float = 1e5, offload: bool = False,
                 placement: str | None = None):
        if not lr >= 0:
            raise ValueError(f"PagedAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"PagedAdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"PagedAdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"PagedAdamW: weight_decay must be >= 0, got {weight_decay}")
        if optim_bits not in (8, 32):
            raise ValueError(f"PagedAdamW: optim_bits must be 32 or 8, got {optim_bits!r}")
        if placement is None:
            placement = "offload" if offload else "auto" if paged else "device"
        if placement not in PLACEMENTS:
            raise ValueError(f"PagedAdamW: placement must be one of {PLACEMENTS}, got {placement!r}")
        self.optim_bits, self.placement = optim_bits, placement
        self.min_8bit_size, self.page_min_numel = int(min_8bit_size), int(page_min_numel)
        self._decided: dict[torch.device, str] = {}  # "auto" on CUDA: the choice made at the first step
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ---- state placement --------------------------------------------------------------------------------------
    def _is_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def placement_of(self, device: torch.device | str) -> str:
        """"device" or "offload" for parameters on `device`; "pending" for "auto" on CUDA before the first step
        (states loaded by `load_state_dict` wait in host memory until then)."""
        device = torch.device(device)
        if self.placement != "auto":
            return self.placement
        if device.type != "cuda":
            return "device"
        return self._decided.get(device, "pending")

    def _offloaded(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.page_min_numel and self.placement_of(p.device) != "device"

    def _new_state_tensor(self, p: torch.Tensor, numel_or_shape, dtype: torch.dtype) -> torch.Tensor:
        if not self._offloaded(p):
            return torch.zeros(numel_or_shape, dtype=dtype, device=p.device)
        pin = p.device.type == "cuda"  # pinned host memory: asynchronous copies to and from the GPU
        return torch.zeros(numel_or_shape, dtype=dtype, device="cpu", pin_memory=pin)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        st["step"] = 0
        if self._is_8bit(p):
            nb = -(-p.numel() // BLOCK_8BIT)
            for k, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                # code of 0.0 in each map and absmax 0: decodes to exactly 0
                st[f"{k}_codes"] = self._new_state_tensor(p, p.numel(), torch.uint8).fill_(dynamic_zero_code(signed))
                st[f"{k}_absmax"] = self._new_state_tensor(p, nb, torch.float32)
        else:
            st["exp_avg"] = self._new_state_tensor(p, p.shape, torch.float32)
            st["exp_avg_sq"] = self._new_state_tensor(p, p.shape, torch.float32)
        return st

    def _state_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        return _STATE_KEYS_8 if self._is_8bit(p) else _STATE_KEYS_32

    def _decide(self, params: list[torch.Tensor]) -> None:
        """"auto": choose each CUDA device's placement once (first step), then move states already made (resume)."""
        if self.placement != "auto":
            return
        for dev in {p.device for p in params if p.device.type == "cuda"} - set(self._decided):
            need = sum(state_bytes(p.numel(), self.optim_bits, self.min_8bit_size) for p in params
                       if p.device == dev and p.numel() >= self.page_min_numel)
            free, total = torch.cuda.mem_get_info(dev)
            choice = choose_placement(need, free, total)
            self._decided[dev] = choice
            (log.warning if choice == "offload" else log.info)(  # offloading costs PCIe time every step: say so
                "PagedAdamW placement on %s: %s (states %.2f GiB, driver free %.2f GiB of %.2f GiB, margin "
                "%.2f GiB)", dev, choice, need / _GiB, free / _GiB, total / _GiB, placement_margin(total) / _GiB)
            for p in params:
                if p.device == dev and self.state.get(p) and not self._offloaded(p):
                    st = self.state[p]
                    for k in self._state_keys(p):
                        st[k] = st[k].to(dev)

    # ---- paging ----------------------------------------------------------------------------------------------
    def _fetch(self, p: torch.Tensor, st: dict) -> dict[str, torch.Tensor]:
        """The state tensors as the update uses them: the stored ones, or for an offloaded parameter working copies on
        its device (asynchronous copies on a side stream for CUDA, plain copies on a CPU)."""
        keys = self._state_keys(p)
        if not self._offloaded(p):
            return {k: st[k] for k in keys}
        if p.device.type != "cuda":
            return {k: st[k].clone() for k in keys}
        stream = self._streams.get(p.device)
        if stream is None:
            stream = self._streams[p.device] = torch.cuda.Stream(device=p.device)
        stream.wait_stream(torch.cuda.current_stream(p.device))  # the host copies of the last step are final
        with torch.cuda.stream(stream):
            out = {k: st[k].to(p.device, non_blocking=True) for k in keys}
        ev = torch.cuda.Event()
        ev.record(stream)
        out["_event"] = ev
        return out

    @staticmethod
    def _writeback(st: dict, work: dict[str, torch.Tensor]) -> None:
        for k, t in work.items():
            if st[k] is not t:
                st[k].copy_(t, non_blocking=True)

    # ---- step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in work:
            if p.grad.is_sparse:
                raise ValueError("PagedAdamW does not support sparse gradients")
        self._decide([p for p, _ in work])
        for p, _ in work:
            if not self.state.get(p):
                self._init_state(p)
        prefetched = self._fetch(work[0][0], self.state[work[0][0]]) if work else None
        for i, (p, group) in enumerate(work):
            st = self.state[p]
            dev = prefetched
            prefetched = self._fetch(work[i + 1][0], self.state[work[i + 1][0]]) if i + 1 < len(work) else None
            if "_event" in dev:  # states paged in on the side stream: wait, and tell the allocator who uses them
                cur = torch.cuda.current_stream(p.device)
                cur.wait_event(dev.pop("_event"))
                for t in dev.values():
                    t.record_stream(cur)
            st["step"] += 1
            beta1, beta2 = group["betas"]
            args = (st["step"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
            if self._is_8bit(p):
                m = dequantize_state(dev["exp_avg_codes"], dev["exp_avg_absmax"], signed=True).view(p.shape)
                v = dequantize_state(dev["exp_avg_sq_codes"], dev["exp_avg_sq_absmax"], signed=False).view(p.shape)
                self._update(p, grad, m, v, args)
                dev["exp_avg_codes"], dev["exp_avg_absmax"] = quantize_state(m, signed=True)
                dev["exp_avg_sq_codes"], dev["exp_avg_sq_absmax"] = quantize_state(v, signed=False)
            else:
                self._update(p, grad, dev["exp_avg"], dev["exp_avg_sq"], args)
            if self._offloaded(p):
                self._writeback(st, dev)
            else:  # kept where they live: the fresh 8-bit codes replace the stored ones (fp32 states updated in place)
                st.update(dev)
        for d in self._streams:
            torch.cuda.current_stream(d).synchronize()  # host states must be final before anyone reads them
        return loss

    @staticmethod
    def _update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, args: tuple) -> None:
        if p.dtype == torch.float32:
            _adamw_math(p, grad, m, v, *args)
        else:  # low-precision params: update an fp32 copy, write back once
            p32 = p.float()
            _adamw_math(p32, grad, m, v, *args)
            p.copy_(p32)

    # ---- (de)serialization --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's layout: {"state": {index: {...}}, "param_groups": [...]}; tensors are CPU copies. The same bytes
        whatever the placement, so a run resumes under any placement."""
        sd = super().state_dict()
        sd["state"] = {i: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                       for i, s in sd["state"].items()}
        sd["optim_bits"] = self.optim_bits
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore states saved by `state_dict()`; checks sizes and placement, keeps uint8 codes as uint8."""
        if state_dict.get("optim_bits", self.optim_bits) != self.optim_bits:
            raise ValueError(f"PagedAdamW.load_state_dict: the saved optimizer used optim_bits="
                             f"{state_dict['optim_bits']} but this one uses {self.optim_bits}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("PagedAdamW.load_state_dict: the saved parameter groups do not match this optimizer's "
                             f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in self.param_groups]}"
                             " parameters per group)")
        index = {}
        for saved, group in zip(groups, self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                index[pid] = p
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if k == "betas" else v
        self.state.clear()
        for pid, s in state_dict["state"].items():
            pid = int(pid)
            if pid not in index:
                raise ValueError(f"PagedAdamW.load_state_dict: state for unknown parameter index {pid}")
            p = index[pid]
            st = self._init_state(p)
            if set(s) != {"step", *self._state_keys(p)}:
                raise ValueError(f"PagedAdamW.load_state_dict: parameter {pid} has state keys {sorted(s)}, expected "
                                 f"{sorted(['step', *self._state_keys(p)])}")
            st["step"] = int(s["step"].item() if torch.is_tensor(s["step"]) else s["step"])
            for k in self._state_keys(p):
                src = s[k]
                if src.numel() != st[k].numel():
                    raise ValueError(f"PagedAdamW.load_state_dict: parameter {pid} {k} has {src.numel()} elements, "
                                     f"expected {st[k].numel()} (a different model or LoRA rank?)")
                st[k].copy_(src.reshape(st[k].shape).to(st[k].dtype))
