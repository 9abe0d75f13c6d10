"""File plumbing under everything else: atomic writes (every file qlora70 writes goes through `atomic_path`) and
`parse_size` (the one reader of "5GB" / "80GiB" sizes).

The content is written to a temporary file in the destination's directory, fsynced, and renamed over the destination
with `os.replace`, so a reader (or a crash, or Ctrl-C) sees either the old file or the complete new one, never a torn
one. On any error the temporary file is removed and the destination is left as it was. Parent directories are
created as needed. `atomic_dir` does the same for a whole directory.
"""
from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` for the caller to write (open it, or hand it to a writer such as
    `savefig`); on a clean exit it is fsynced and renamed over `path`, on an error removed. The temporary name keeps
    the destination's extension (`.loss_curve.png.x1y2.tmp.png`) so writers that infer the format from it work."""
    path = os.path.abspath(os.fspath(path))
    d, name = os.path.split(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp" + os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a new empty directory `.tmp-<name>-XXXX` beside `path` to fill; on a clean exit it replaces `path` (an
    existing directory is renamed aside, then deleted), on an error it is deleted."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    try:
        yield tmp
        if os.path.isdir(path):
            trash = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
            os.replace(path, trash)  # onto an empty directory: allowed
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Write `obj` as JSON (plus a final newline) to `path` atomically; it is serialized before anything is written,
    so an unserializable object leaves `path` untouched."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", re.IGNORECASE)


def parse_size(size: int | float | str, *, unit: int = 1, what: str = "size") -> int:
    """A byte count from 5_000_000_000, "5GB" (10^9), "500MiB" (2^20), "80 GiB" or "80G" (a bare K/M/G/T is binary,
    as in "80G" of GPU memory). A bare number (int, float or a digits-only string) is in `unit` bytes (1 for file
    sizes, 2^30 for GPU memory). Raises ValueError naming `what` and the value."""
    if isinstance(size, bool):
        raise ValueError(f"cannot parse {what} {size!r}; use e.g. '5GB' or '80GiB'")
    if isinstance(size, (int, float)):
        return int(size * unit)
    m = _SIZE.fullmatch(str(size))
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot parse {what} {size!r}; use e.g. '5GB' or '80GiB'")
    prefix, binary, b = m.group(2).upper(), bool(m.group(3)), bool(m.group(4))
    if not prefix:
        return int(float(m.group(1)) * (1 if b else unit))
    base = 1024 if (binary or not b) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(prefix))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (data fingerprints, GGUF provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
