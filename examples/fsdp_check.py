#!/usr/bin/env python
"""FSDP2 QLoRA check: N processes under torchrun equal one process with the same global batch (tiny NF4 Llama, fp32).

    torchrun --nproc_per_node 1 examples/fsdp_check.py           # CUDA + NCCL when a GPU is visible, else CPU + gloo
    torchrun --nproc_per_node 2 examples/fsdp_check.py --cpu     # force CPU + gloo
    python -c "from qlora70.distributed import launch; launch(2, ['--cpu'], script='examples/fsdp_check.py')"

Rank 0 also trains the single-process reference (micro-batch = 2 x world size, global batch 8, fp32) and prints one
JSON line: backend, device, per-step losses of both runs, max |difference| of the losses and of the adapters, and the
dtype / bytes of each decoder layer's all-gather. Exit code 0 when losses and adapters agree within 1e-5.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU + gloo even when CUDA is available")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    a = ap.parse_args()

    from safetensors.torch import load_file

    from qlora70.config import LlamaConfig, LoRAConfig, TrainConfig
    from qlora70.data import TokenizedData
    from qlora70.distributed import DistributedTrainer, barrier, init_distributed
    from qlora70.model import Llama, quantize_model_
    from qlora70.trainer import Trainer

    info = init_distributed(backend="gloo" if a.cpu else None)
    dev = info.device
    micro = 2
    if 8 % (micro * info.world_size):
        raise SystemExit(f"world size {info.world_size}: the global batch of 8 needs world size 1, 2 or 4")
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0)

    def model() -> Llama:
        torch.manual_seed(0)
        return quantize_model_(Llama(LlamaConfig.from_name("tiny"))).to(dev)

    rng = np.random.default_rng(0)
    lens = rng.integers(6, 20, 40)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    data = TokenizedData(rng.integers(3, 512, int(lens.sum())).astype(np.int32), offsets,
                         (lens // 2).astype(np.int32), [f"rand:{i}" for i in range(40)])
    out = a.out or (tempfile.mkdtemp(prefix="fsdp_check-") if info.is_main else None)
    if info.world_size > 1:
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]

    def cfg(d: str, m: int) -> TrainConfig:
        return TrainConfig(lr=1e-3, batch_size=8, micro_batch_size=m, max_steps=a.steps, save_every=3,
                           warmup_ratio=0.2, lr_schedule="cosine", max_grad_norm=0.3, out_dir=d, progress=False, seed=3,
                           val_size=4, eval_every=3, gradient_checkpointing=True, compute_dtype="fp32")

    gathers: list[tuple[str, int]] = []
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    orig = getattr(dist, name)

    def rec(o, i, *args, **kw):
        gathers.append((str(o.dtype), o.numel() * o.element_size()))
        return orig(o, i, *args, **kw)

    t = DistributedTrainer(model(), cfg(os.path.join(out, "fsdp"), micro), data, lora_config=lora)
    setattr(dist, name, rec)
    with torch.no_grad():
        t.model(torch.randint(3, 512, (1, 8), device=dev), return_hidden=True)
    setattr(dist, name, orig)
    t.train(resume=False)
    ok = True
    if info.is_main:
        ref = Trainer(model(), cfg(os.path.join(out, "single"), micro * info.world_size), data, lora_config=lora)
        ref.train(resume=False)
        la = [r["loss"] for r in t.history if "loss" in r]
        lb = [r["loss"] for r in ref.history if "loss" in r]
        wa = load_file(os.path.join(out, "fsdp", "adapter_model.safetensors"))
        wb = load_file(os.path.join(out, "single", "adapter_model.safetensors"))
        dl = float(np.max(np.abs(np.array(la) - np.array(lb))))
        dw = max(float((wa[k] - wb[k]).abs().max()) for k in wb)
        ok = dl <= 1e-5 and dw <= 1e-5 and len(la) == len(lb) == a.steps
        print(json.dumps({"backend": dist.get_backend(), "world_size": info.world_size, "device": str(dev),
                          "torch": torch.__version__, "losses_fsdp": la, "losses_single": lb, "max_loss_diff": dl,
                          "max_adapter_diff": dw, "layer_all_gathers": gathers, "ok": ok}))
    barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
