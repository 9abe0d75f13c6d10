"""safetensors files without mmap: a header parser whose `get(name)` is one positioned read, and streaming atomic
writers (one tensor produced at a time, so a 4-bit model never materializes densely while it is saved).

We never unpickle: safetensors (and GGUF, JSON) only.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable

import torch

from .gguf_io import read_bytes
from .io import atomic_path, atomic_write_bytes

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """A safetensors file's header, validated against the file size; `get(name)` reads one tensor (one pread)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is truncated ({size} bytes): no safetensors header; re-download or "
                                 "re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > (512 << 20):
                raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file size "
                                 f"{size}); re-download or re-save it")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        avail = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dt = _ST_DTYPES.get(info.get("dtype"))
            if dt is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape, (s, e) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
            need = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            if e - s != need:
                raise ValueError(f"{path}: tensor {name!r} spans {e - s} bytes but shape {shape} {info['dtype']} needs "
                                 f"{need}; the file is corrupt")
            if e > avail:
                raise ValueError(f"{path} is truncated: tensor {name!r} needs bytes [{s}, {e}) of the data section "
                                 f"but only {avail} are present; re-download or re-save the file")
            self.entries[name] = (dt, shape, s, e)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        dt, shape, s, e = self.entries[name]
        raw = read_bytes(self.path, self.data_start + s, e - s, what=f"tensor {name!r}")
        return raw.view(dt).reshape(shape)


def _to_bytes_view(t: torch.Tensor):
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else b""


def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: specs = [(name, shape, dtype, produce)], `produce()` returns the tensor.
    Atomic (`qlora70.io.atomic_path`)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    off = 0
    for name, shape, dtype, _ in specs:
        nb = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape, dtype, produce in specs:
            t = produce()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"write_safetensors: {name} produced {tuple(t.shape)} {t.dtype}, planned "
                                 f"{tuple(shape)} {dtype}")
            f.write(_to_bytes_view(t))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (`qlora70.io.atomic_write_bytes`)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))
