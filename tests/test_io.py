"""qlora70.io: atomic writes (temp file beside the destination, fsync, os.replace; temp removed on any error)."""
import json
import os

import pytest
import torch

from qlora70.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

WRITERS = {
    "bytes": (lambda p: atomic_write_bytes(p, b"new\x00\xff"), b"new\x00\xff"),
    "text": (lambda p: atomic_write_text(p, "névé\n"), "névé\n".encode("utf-8")),
    "json": (lambda p: atomic_write_json(p, {"b": 1, "a": [1.5, None]}),
             b'{\n  "b": 1,\n  "a": [\n    1.5,\n    null\n  ]\n}\n'),
}


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("kind", WRITERS)
def test_writes_replace_and_create_parents(tmp_path, kind):
    write, want = WRITERS[kind]
    p = tmp_path / "a" / "b" / "out.bin"  # parents do not exist yet
    write(p)
    assert p.read_bytes() == want and listing(p.parent) == ["out.bin"]
    p.write_bytes(b"old")
    write(str(p))  # str paths too; an existing file is replaced
    assert p.read_bytes() == want and listing(p.parent) == ["out.bin"]


def test_json_sort_keys_and_default(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"b": 1, "a": (2, 3), "c": None, "d": p}, sort_keys=True, indent=None, default=str)
    assert p.read_text() == '{"a": [2, 3], "b": 1, "c": null, "d": "%s"}\n' % p


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan"), "y": {1, 2}}])
def test_failing_serializer_leaves_old_file(tmp_path, bad):
    p = tmp_path / "state.json"
    p.write_text('{"old": true}\n')
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(p, bad)
    assert p.read_text() == '{"old": true}\n' and listing(tmp_path) == ["state.json"]


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_error_mid_write_keeps_old_file_and_removes_temp(tmp_path, exc):
    p = tmp_path / "loss_curve.png"
    p.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_path(p) as tmp:
            # the temp file sits beside the destination, hidden, with the destination's extension
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".loss_curve.png.")
            assert tmp.endswith(".png")
            with open(tmp, "wb") as f:
                f.write(b"half of the new cont")
            assert p.read_bytes() == b"old"  # readers see the old file until the rename
            raise exc
    assert p.read_bytes() == b"old" and listing(tmp_path) == ["loss_curve.png"]


def test_failing_rename_removes_temp(tmp_path):
    (tmp_path / "dst").mkdir()  # os.replace of a file onto a directory fails after the write and fsync
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "dst", b"data")
    assert listing(tmp_path) == ["dst"] and listing(tmp_path / "dst") == []


def test_fsync_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.getsize(a))),
                                                     real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "f", b"12345")
    assert events == ["fsync", ("replace", 5)]


def test_atomic_dir_replaces_whole_directory(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:  # a new directory
        assert os.path.basename(d).startswith(".tmp-ckpt-") and not final.exists()
        atomic_write_text(os.path.join(d, "a.txt"), "1")
    assert listing(final) == ["a.txt"]
    with atomic_dir(str(final)) as d:  # an existing one: replaced as a whole (a.txt does not survive)
        atomic_write_text(os.path.join(d, "b.txt"), "2")
        assert listing(final) == ["a.txt"]
    assert listing(final) == ["b.txt"] and listing(tmp_path) == ["ckpt"]
    with pytest.raises(ValueError):
        with atomic_dir(final) as d:
            atomic_write_text(os.path.join(d, "c.txt"), "3")
            raise ValueError("failed half way")
    assert listing(final) == ["b.txt"] and listing(tmp_path) == ["ckpt"]


def test_callers_leave_old_file_on_error(tmp_path):
    """write_safetensors streams through atomic_path: a producer error keeps the previous file and no temp."""
    from safetensors.torch import load_file

    from qlora70.checkpoint import write_safetensors
    p = str(tmp_path / "model.safetensors")
    write_safetensors(p, [("w", (2, 3), torch.float32, lambda: torch.ones(2, 3))])
    with pytest.raises(ValueError, match="produced"):
        write_safetensors(p, [("w", (2, 3), torch.float32, lambda: torch.zeros(2, 3)),
                              ("v", (4,), torch.float32, lambda: torch.zeros(5))])
    assert listing(tmp_path) == ["model.safetensors"] and torch.equal(load_file(p)["w"], torch.ones(2, 3))


def test_adapter_config_is_sorted_json(tmp_path):
    from qlora70.config import LoRAConfig
    from qlora70.lora import ADAPTER_CONFIG, write_adapter
    write_adapter({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}, LoRAConfig(r=2, alpha=4, targets=("x",)),
                  tmp_path / "new" / "adapter")
    text = (tmp_path / "new" / "adapter" / ADAPTER_CONFIG).read_text()
    d = json.loads(text)
    assert list(d) == sorted(d) and d["r"] == 2 and text.endswith("}\n")
