"""Memory planner: predict the peak GPU memory of a QLoRA run before renting the GPU.

The model is a sum of named terms, each an explicit formula (bytes):
  weights_4bit    linear params x (4 + 8/64 + 32/(64*256)) / 8 with double quantization (4.5 bits without)
  embeddings      embed_tokens + lm_head (untied) + norms in the compute dtype (bf16: 2 bytes)
  lora_params     r x (in + out) per adapted linear, fp32
  lora_grads      same size as lora_params, fp32
  optimizer       AdamW m and v: 8 bytes/param (32-bit) or 2 (8-bit); paged: only the largest tensor's states are
                  resident (they are paged in per parameter), the rest live in pinned host memory
  checkpoints     with gradient checkpointing: every layer's input (B, T, D) in the compute dtype (0 when offloaded)
  layer_work      one decoder layer recomputed in backward: q/k/v/o and MLP activations (B, T, ffn) x 3, attention
                  output, LoRA intermediates, and the dequantized buffer of the largest linear weight
  logits          chunked cross-entropy: chunk x vocab x 4 bytes x 2 (logits + grad); unchunked B x T x vocab x 6
  overhead        CUDA context + allocator slack: 0.6 GiB + 5% of the rest
Every term is printed so a user can see what to change (micro-batch, offload, 8-bit states).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import LLAMA_TARGETS, LlamaConfig

GiB = 1024 ** 3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Plan:
    terms: dict[str, float]
    total: float
    gpu_memory: float | None
    fits: bool | None
    max_micro_batch: int | None
    settings: dict

    def table(self) -> str:
        rows = [f"{'term':16} {'GiB':>9}"] + [f"{k:16} {v / GiB:9.2f}" for k, v in self.terms.items()]
        rows.append(f"{'total (peak)':16} {self.total / GiB:9.2f}")
        if self.gpu_memory is not None:
            rows.append(f"{'gpu memory':16} {self.gpu_memory / GiB:9.2f}")
            rows.append(f"fits: {'yes' if self.fits else 'NO'}; largest micro-batch that fits: {self.max_micro_batch}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return asdict(self)


def _linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, f = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}  # (out, in)


def parse_size(s: str | float | int) -> float:
    """'80GiB', '80GB', '141 GiB', 80 (GiB) -> bytes (`qlora70.io.parse_size` with GiB as the bare unit)."""
    from .io import parse_size as _parse_size

    return float(_parse_size(s, unit=GiB, what="memory size"))


def plan_memory(cfg: LlamaConfig, seq_len: int = 1024, micro_batch_size: int = 1, lora_r: int = 64,
                targets: tuple[str, ...] = LLAMA_TARGETS, double_quant: bool = True, compute_dtype: str = "bf16",
                gradient_checkpointing: bool = True, offload_checkpoints: bool = False, optim_bits: int = 32,
                paged: bool = True, ce_chunk: int | None = 1024, gpu_memory: float | str | None = None) -> Plan:
    """Predict peak GPU memory (bytes) of one QLoRA training step; see the module docstring for the terms."""
    for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size), ("lora_r", lora_r)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {list(_DTYPE_BYTES)}, got {compute_dtype!r}")
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
    shapes = _linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {list(shapes)}")
    L, D, V, B, T = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, micro_batch_size, seq_len
    cb = _DTYPE_BYTES[compute_dtype]
    bits = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    lin_params = L * sum(o * i for o, i in shapes.values())
    lora_per_layer = {t: lora_r * (shapes[t][0] + shapes[t][1]) for t in targets}
    lora_params = L * sum(lora_per_layer.values())
    largest_lora = max(lora_r * shapes[t][1] for t in targets)  # lora_A or lora_B, whichever is larger
    largest_lora = max(largest_lora, max(lora_r * shapes[t][0] for t in targets))
    state_b = 8 if optim_bits == 32 else 2
    terms = {
        "weights_4bit": lin_params * bits / 8,
        "embeddings": (V * D * (1 if cfg.tie_word_embeddings else 2) + (2 * L + 1) * D) * cb,
        "lora_params": lora_params * 4,
        "lora_grads": lora_params * 4,
        "optimizer": (largest_lora * 2 * state_b) if paged else lora_params * state_b,
    }
    act = B * T * D * cb
    if gradient_checkpointing:
        terms["checkpoints"] = 0.0 if offload_checkpoints else L * act
        n_layers_live = 1
    else:
        terms["checkpoints"] = 0.0
        n_layers_live = L
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    per_layer = (B * T * (2 * D + q_out * 2 + 2 * kv_out + 3 * cfg.intermediate_size) * cb  # activations kept
                 + B * T * lora_r * len(targets) * 4 * 2                                 # LoRA A outputs + dropout
                 + B * T * D * 4)                                                        # fp32 norm statistics
    largest_w = max(o * i for o, i in shapes.values())
    terms["layer_work"] = n_layers_live * per_layer + largest_w * cb + 2 * B * T * cfg.intermediate_size * cb
    terms["logits"] = (min(ce_chunk, B * T) * V * 4 * 2) if ce_chunk else B * T * V * (4 + 2)
    base = sum(terms.values())
    terms["overhead"] = 0.6 * GiB + 0.05 * base
    total = sum(terms.values())
    settings = dict(model=cfg.name, seq_len=seq_len, micro_batch_size=micro_batch_size, lora_r=lora_r,
                    targets=list(targets), double_quant=double_quant, compute_dtype=compute_dtype,
                    gradient_checkpointing=gradient_checkpointing, offload_checkpoints=offload_checkpoints,
                    optim_bits=optim_bits, paged=paged, ce_chunk=ce_chunk)
    gm = parse_size(gpu_memory) if gpu_memory is not None else None
    fits = max_mb = None
    if gm is not None:
        fits = total <= gm
        max_mb = 0
        lo = 1
        while lo <= 4096:
            p = plan_memory(cfg, seq_len, lo, lora_r, targets, double_quant, compute_dtype, gradient_checkpointing,
                            offload_checkpoints, optim_bits, paged, ce_chunk, None)
            if p.total > gm:
                break
            max_mb = lo
            lo *= 2
        if max_mb:  # refine between max_mb and 2*max_mb
            hi = max_mb * 2
            while hi - max_mb > 1:
                mid = (max_mb + hi) // 2
                p = plan_memory(cfg, seq_len, mid, lora_r, targets, double_quant, compute_dtype,
                                gradient_checkpointing, offload_checkpoints, optim_bits, paged, ce_chunk, None)
                if p.total <= gm:
                    max_mb = mid
                else:
                    hi = mid
    return Plan(terms=terms, total=total, gpu_memory=gm, fits=fits, max_micro_batch=max_mb, settings=settings)
