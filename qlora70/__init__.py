"""qlora70: from-scratch QLoRA for Llama-2 (NF4 + double quantization, LoRA, Triton kernels, medical QA evaluation).

The public API is re-exported here lazily, so `import qlora70` is cheap and never imports triton.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import VERSION as __version__

# public name -> defining module
_EXPORTS = {
    # config
    "LlamaConfig": "config", "LoRAConfig": "config", "TrainConfig": "config", "RunConfig": "config",
    "EvalConfig": "config",
    # NF4 reference + container
    "NF4Weight": "nf4", "quantize_nf4": "nf4", "dequantize_nf4": "nf4", "NF4_CODES": "nf4",
    # modules / ops
    "Linear4bit": "layers",
    # model
    "Llama": "model", "KVCache": "model",
    # loading / saving
    "load_model": "checkpoint", "save_quantized": "checkpoint",
    # tokenizer / generation
    "load_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "generate": "generation",
    # LoRA / training
    "LoRALinear": "lora", "inject_lora": "lora", "merge_lora": "lora",
    "save_adapter": "lora", "load_adapter": "lora", "save_merged": "checkpoint",
    "set_gradient_checkpointing": "model", "PagedAdamW": "optim", "chunked_cross_entropy": "losses",
    "Trainer": "trainer",
    # data / evaluation
    "build_dataset": "data", "read_entries": "data", "TokenizedData": "data", "Batches": "data",
    "SM70_TEMPLATE": "data", "contamination_check": "data",
    "evaluate_task": "evaluate", "EvalReport": "evaluate", "reports_table": "evaluate",
    "read_gguf_metadata": "tokenizer", "export_gguf": "checkpoint", "save_hf": "checkpoint",
    "plan_memory": "planner", "generate_ids": "generation",
    "count_parameters": "model", "quantize_model_": "model",
    # multi-process (FSDP2)
    "init_distributed": "distributed", "shard_model": "distributed", "DistributedTrainer": "distributed",
    "save_adapter_sharded": "distributed",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'qlora70' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"qlora70.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
