"""`PagedAdamW`: AdamW whose states can live in (pinned) host memory and be paged to the GPU per parameter.

Math (identical to `torch.optim.AdamW`, single-tensor path), per parameter p with gradient g at step t:
    p      *= 1 - lr * weight_decay
    m       = lerp(m, g, 1 - beta1)
    v       = beta2 * v + (1 - beta2) * g * g
    p      -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Where the states live:
  * `paged=True` (default): tensors with >= `page_min_numel` elements keep their states on the host (pinned when CUDA is
    available). For a CUDA parameter the states are copied to the GPU right before its update and back after; the next
    parameter's states are prefetched on a side stream while the current one is updated. On CPU the same math runs in
    place on the host states. Smaller tensors keep their states next to the parameter (as bitsandbytes).
  * `paged=False`: all states next to their parameter (plain CUDA mode).
  * `optim_bits=8`: tensors with >= `min_8bit_size` elements keep m and v as blockwise 8-bit codes (block 256) with
    fp32 per-block absmax: m with the signed dynamic map, v with the unsigned one (as bitsandbytes' 8-bit Adam). Each
    update decodes to fp32, applies the math above, and re-encodes.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import torch

from .nf4 import create_dynamic_map

BLOCK_8BIT = 256
_STATE_KEYS_32 = ("exp_avg", "exp_avg_sq")
_STATE_KEYS_8 = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


@functools.lru_cache(maxsize=None)
def _code_map(signed: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(map [256] sorted fp32, midpoints [255]) of bitsandbytes' dynamic map on `device`."""
    cm = create_dynamic_map(signed=signed)
    return cm.to(device), ((cm[:-1] + cm[1:]) / 2).to(device)


def quantize_state(x: torch.Tensor, signed: bool, blocksize: int = BLOCK_8BIT) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit encoding of an fp32 state: x [n] -> (codes uint8 [n], absmax fp32 [ceil(n / blocksize)])."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    xb = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = xb.abs().amax(dim=1)
    scaled = (xb / absmax.clamp(min=1e-30)[:, None]).clamp_(-1.0, 1.0)
    _, mids = _code_map(signed, str(x.device))
    codes = torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8).view(-1)[:n]
    return codes, absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                     blocksize: int = BLOCK_8BIT) -> torch.Tensor:
    """Inverse of `quantize_state`: fp32 [n]."""
    cm, _ = _code_map(signed, str(codes.device))
    n = codes.numel()
    pad = (-n) % blocksize
    vals = torch.nn.functional.pad(cm[codes.long()], (0, pad)).view(-1, blocksize)
    return (vals * absmax[:, None]).view(-1)[:n]


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
    """AdamW with host-paged and optionally 8-bit states. Same hyper-parameters as `torch.optim.AdamW`.

    Args: params, lr, betas, eps, weight_decay; optim_bits 32 | 8; paged (states on the host, paged to the GPU per
    parameter); min_8bit_size (smaller tensors keep fp32 states in 8-bit mode); page_min_numel (smaller tensors are not
    paged).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, optim_bits: int = 32, paged: bool = True,
                 min_8bit_size: int = 4096, page_min_numel: int | float = 1e5):
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
        self.optim_bits, self.paged = optim_bits, bool(paged)
        self.min_8bit_size, self.page_min_numel = int(min_8bit_size), int(page_min_numel)
        self._pin = torch.cuda.is_available()
        self._stream = None
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    # ---- state placement --------------------------------------------------------------------------------------
    def _is_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.paged and p.numel() >= self.page_min_numel

    def _home(self, p: torch.Tensor) -> torch.device:
        """Where p's states live between updates."""
        return torch.device("cpu") if self._is_paged(p) else p.device

    def _new_state_tensor(self, p: torch.Tensor, numel_or_shape, dtype: torch.dtype) -> torch.Tensor:
        home = self._home(p)
        pin = self._pin and home.type == "cpu" and p.device.type == "cuda"
        return torch.zeros(numel_or_shape, dtype=dtype, device=home, pin_memory=pin)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        st["step"] = 0
        if self._is_8bit(p):
            nb = -(-p.numel() // BLOCK_8BIT)
            for k in ("exp_avg", "exp_avg_sq"):
                # codes of 0.0 in each map; absmax 0 -> decodes to exactly 0
                cm, _ = _code_map(k == "exp_avg", "cpu")
                zero_code = int(torch.argmin(cm.abs()))
                st[f"{k}_codes"] = self._new_state_tensor(p, p.numel(), torch.uint8)
                st[f"{k}_codes"].fill_(zero_code)
                st[f"{k}_absmax"] = self._new_state_tensor(p, nb, torch.float32)
        else:
            st["exp_avg"] = self._new_state_tensor(p, p.shape, torch.float32)
            st["exp_avg_sq"] = self._new_state_tensor(p, p.shape, torch.float32)
        return st

    def _state_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        return _STATE_KEYS_8 if self._is_8bit(p) else _STATE_KEYS_32

    # ---- paging ----------------------------------------------------------------------------------------------
    def _fetch(self, p: torch.Tensor, st: dict) -> dict[str, torch.Tensor]:
        """The state tensors on p's device (async copies on the side stream when paged to a GPU)."""
        keys = self._state_keys(p)
        if st[keys[0]].device == p.device:
            return {k: st[k] for k in keys}
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=p.device)
        with torch.cuda.stream(self._stream):
            out = {k: st[k].to(p.device, non_blocking=True) for k in keys}
        ev = torch.cuda.Event()
        ev.record(self._stream)
        out["_event"] = ev
        return out

    @staticmethod
    def _writeback(st: dict, dev_states: dict[str, torch.Tensor]) -> None:
        for k, t in dev_states.items():
            if st[k].data_ptr() != t.data_ptr():
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
                self._writeback(st, dev)
            else:
                self._update(p, grad, dev["exp_avg"], dev["exp_avg_sq"], args)
                self._writeback(st, dev)
        if self._stream is not None:
            torch.cuda.current_stream().synchronize()  # host states must be final before anyone reads them
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
        """torch's layout: {"state": {index: {...}}, "param_groups": [...]}; tensors are CPU copies."""
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
