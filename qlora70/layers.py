"""`Linear4bit`: a frozen NF4 linear layer whose state dict is the bitsandbytes layout."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .nf4 import NF4Weight, QS_KEY, quantize_nf4

# buffer name on the module -> suffix after "<prefix>.weight" in the bitsandbytes state dict
_PARTS = {"weight_absmax": "absmax", "weight_quant_map": "quant_map", "weight_nested_absmax": "nested_absmax",
          "weight_nested_quant_map": "nested_quant_map"}


class Linear4bit(nn.Module):
    """y = x @ dequant(W)^T + b with W [out, in] stored as NF4 (+ double quantization); W never trains.

    The packed bytes live in `self.weight` (a frozen uint8 Parameter [(n+1)//2, 1], so `.to()`, FSDP and
    `named_parameters()` see it) and the quantization state in buffers; `self.quant` views them as an `NF4Weight`.
    `state_dict()` writes `P.weight`, `P.weight.absmax`, ..., `P.weight.quant_state.bitsandbytes__nf4` exactly as
    transformers + bitsandbytes do, and `load_state_dict()` reads that layout.
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None = None, backend: str | None = None):
        super().__init__()
        if not isinstance(q, NF4Weight):
            raise TypeError(f"Linear4bit expects an NF4Weight, got {type(q).__name__}")
        self.out_features, self.in_features = q.shape
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_quant_map", q.quant_map)
        self.register_buffer("weight_nested_absmax", q.nested_absmax)
        self.register_buffer("weight_nested_quant_map", q.nested_quant_map)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._meta = dict(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, offset=q.offset,
                          nested_blocksize=q.nested_blocksize)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    backend: str | None = None) -> "Linear4bit":
        """Quantize an `nn.Linear` (its weight dtype is recorded as the original dtype)."""
        q = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, None if linear.bias is None else linear.bias.detach(), backend=backend)

    @classmethod
    def from_weight(cls, q: NF4Weight, bias: torch.Tensor | None = None, backend: str | None = None) -> "Linear4bit":
        return cls(q, bias, backend)

    @property
    def quant(self) -> NF4Weight:
        """The NF4Weight view of this module's tensors (no copy). Built (and validated) once and reused while the
        underlying tensors stay the same objects at the same addresses; `.to()`, `load_state_dict()` and FSDP's
        all-gather swap them, which rebuilds the view."""
        tensors = (self.weight, self.weight_absmax, self.weight_quant_map, self.weight_nested_absmax,
                   self.weight_nested_quant_map)
        key = tuple((id(t), t.data_ptr(), t.device) if t is not None else None for t in tensors) + (id(self._meta),)
        tensors = (self.weight.data,) + tensors[1:]
        cached = self.__dict__.get("_quant_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        m = self._meta
        q = NF4Weight(packed=tensors[0], absmax=tensors[1], shape=m["shape"], dtype=m["dtype"],
                      blocksize=m["blocksize"], quant_map=tensors[2], nested_absmax=tensors[3],
                      nested_quant_map=tensors[4], offset=m["offset"], nested_blocksize=m["nested_blocksize"])
        self.__dict__["_quant_cache"] = (key, q)
        return q

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return ops.dequantize(self.quant, dtype, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return ops.nf4_linear(x, self.quant, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={m['blocksize']}, double_quant={m['offset'] is not None}, dtype={m['dtype']}")

    # ---- bitsandbytes state-dict layout -----------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.quant.to_state_dict(prefix.rstrip("."))
        for k, v in sd.items():
            destination[k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        p = prefix.rstrip(".")
        own = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        try:
            q = NF4Weight.from_state_dict(state_dict, p)
        except (KeyError, ValueError, TypeError) as e:
            error_msgs.append(str(e))
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{p}: checkpoint weight shape {tuple(q.shape)} != module shape "
                              f"{(self.out_features, self.in_features)}")
            return
        dev = self.weight.device
        q = q.to(dev)
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self.weight_absmax, self.weight_quant_map = q.absmax, q.quant_map
        self.weight_nested_absmax, self.weight_nested_quant_map = q.nested_absmax, q.nested_quant_map
        self._meta = dict(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, offset=q.offset,
                          nested_blocksize=q.nested_blocksize)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        allowed = {prefix + "weight"} | {f"{prefix}weight.{s}" for s in list(_PARTS.values()) + [QS_KEY]}
        unexpected_keys.extend(k for k in own if k not in allowed)
