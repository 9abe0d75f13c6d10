"""Memory planner: predict the peak GPU memory of a QLoRA run before renting the GPU.

What it predicts: `torch.cuda.max_memory_reserved()` at the peak of a training step PLUS the CUDA context (the memory
the driver holds outside PyTorch's allocator), i.e. what `nvidia-smi` shows as used at the peak and what must fit in
the card. `benchmarks/bench_train_step.py --70b-fit` measures both figures on a GPU.

The model is a sum of named terms, each an explicit formula (bytes):
  weights_4bit    linear params x (4 + 8/64 + 32/(64*256)) / 8 with double quantization (4.5 bits without)
  embeddings      embed_tokens + lm_head (untied) + norms in the compute dtype (bf16: 2 bytes)
  lora_params     r x (in + out) per adapted linear, fp32
  lora_grads      same size as lora_params, fp32
  lora_bf16       autocast's cached 16-bit copies of every LoRA weight, held for the whole forward: lora_params x 2
                  (0 when the compute dtype is fp32). About 1.5 GiB for Llama-2-70B at r=64
  optimizer       AdamW m and v: 8 bytes/param (32-bit) or 2 (8-bit, + the fp32 decode of the largest tensor);
                  placement "device": all of them; "offload": the two largest tensors' states (the one being updated and
                  the prefetched next one), the rest in pinned host memory; "auto": "device" if the states fit in what
                  the rest of the plan leaves free (`qlora70.optim.choose_placement`, the rule PagedAdamW applies at
                  its first step on measured free memory), else "offload"
  checkpoints     with gradient checkpointing: every layer's input (B, T, D) in the compute dtype (0 when offloaded)
  layer_work      one decoder layer recomputed in backward: q/k/v/o and MLP activations (B, T, ffn) x 3, attention
                  output, the LoRA A outputs (B, T, r) per target, fp32 norm statistics, the dequantized buffer of the
                  largest linear weight and two (B, T, ffn) gradients
  lora_dropout    that layer's LoRA dropout: per adapted linear a dropped copy of its input (B, T, in) in the compute
                  dtype (kept for lora_A's gradient) and its bool mask (1 byte/element); 0 when dropout is 0
  dora            with DoRA (use_dora): the magnitude vectors (one fp32 value per output feature of every adapted linear)
                  with their gradients and AdamW states (16 bytes each; tiny tensors, on the GPU), the cached fp32
                  ||W||^2 row norms of the bases (4 bytes per output feature), and in the recomputed layer the fp32
                  combine of each adapted output (B, T, out) plus, with dropout, the base output on the dropped input
                  (B, T, out) in the compute dtype (PEFT's extra matmul); 0 without DoRA
  lora_fp32_sums  under autocast an adapted linear returns base + LoRA in fp32 (`qlora70.ops.lora_sum`): the q/k
                  and gate/up outputs kept by RoPE and SwiGLU for backward cost (4 - compute bytes) more per element
                  in the recomputed layer; 0 in fp32
  logits          chunked cross-entropy: chunk x vocab x 4 bytes x 2 (logits + grad); unchunked B x T x vocab x 6
  allocator_slack 5% of the terms above (the caching allocator's reserved-but-unallocated blocks)
  cuda_context    0.5 GiB: the CUDA context, cuBLAS workspaces and loaded kernels, outside max_memory_reserved
Every term is printed so a user can see what to change (micro-batch, offload, 8-bit states).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import LLAMA_TARGETS, LlamaConfig
from .io import parse_size as _io_parse_size
from .optim import choose_placement, state_bytes

GiB = 1024 ** 3
CUDA_CONTEXT = 0.5 * GiB
ALLOCATOR_SLACK = 0.05
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
        rows.append(f"{'total (peak)':16} {self.total / GiB:9.2f}   (= peak max_memory_reserved + CUDA context)")
        pl = self.settings.get("optim_placement")
        if pl:
            rows.append(f"optimizer states: {pl} ({self.settings.get('optim_placement_reason', '')})")
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
    return float(_io_parse_size(s, unit=GiB, what="memory size"))


def _optimizer_bytes(lora_params: int, largest: int, optim_bits: int, placement: str) -> float:
    """GPU bytes of the AdamW states under `placement` ("device" or "offload")."""
    state_b = 8 if optim_bits == 32 else 2
    decode = 8 * largest if optim_bits == 8 else 0  # fp32 m and v of the tensor being updated
    return (lora_params * state_b if placement == "device" else 2 * largest * state_b) + decode


_KEPT_OUTPUTS = ("q_proj", "k_proj", "gate_proj", "up_proj")  # saved by RoPE / SwiGLU for their backward


def _activation_terms(cfg: LlamaConfig, shapes: dict[str, tuple[int, int]], B: int, T: int, cb: int, lora_r: int,
                      targets: tuple[str, ...], gradient_checkpointing: bool, offload_checkpoints: bool,
                      lora_dropout: float, ce_chunk: int | None) -> dict[str, float]:
    """checkpoints, layer_work, lora_dropout, lora_fp32_sums and logits (bytes) for B x T tokens; see the module
    docstring."""
    terms: dict[str, float] = {}
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
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
                 + B * T * lora_r * len(targets) * cb                                    # LoRA A outputs
                 + B * T * D * 4)                                                        # fp32 norm statistics
    largest_w = max(o * i for o, i in shapes.values())
    terms["layer_work"] = n_layers_live * per_layer + largest_w * cb + 2 * B * T * cfg.intermediate_size * cb
    dropped = B * T * sum(shapes[t][1] for t in targets)  # elements of the dropped inputs of one layer
    terms["lora_dropout"] = n_layers_live * dropped * (cb + 1) if lora_dropout > 0 else 0.0
    kept = B * T * sum(shapes[t][0] for t in targets if t in _KEPT_OUTPUTS)  # adapted outputs the next op saves
    terms["lora_fp32_sums"] = n_layers_live * kept * (4 - cb) if cb < 4 else 0.0
    terms["logits"] = (min(ce_chunk, B * T) * V * 4 * 2) if ce_chunk else B * T * V * (4 + 2)
    return terms


def _dora_bytes(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], L: int, B: int, T: int, cb: int,
                lora_dropout: float, n_layers_live: int) -> float:
    """The `dora` term (bytes): magnitudes + grads + AdamW states + cached row norms, and the live layers' extra
    activations (fp32 combine; with dropout the base output on the dropped input)."""
    outs = sum(shapes[t][0] for t in targets)  # output features of one layer's adapted linears
    persistent = L * outs * (4 + 4 + 8 + 4)
    live = B * T * outs * (4 + (cb if lora_dropout > 0 else 0))
    return persistent + n_layers_live * live


def plan_memory(cfg: LlamaConfig, seq_len: int = 1024, micro_batch_size: int = 1, lora_r: int = 64,
                targets: tuple[str, ...] = LLAMA_TARGETS, double_quant: bool = True, compute_dtype: str = "bf16",
                gradient_checkpointing: bool = True, offload_checkpoints: bool = False, optim_bits: int = 32,
                paged: bool = True, ce_chunk: int | None = 1024, gpu_memory: float | str | None = None,
                optim_offload: bool = False, lora_dropout: float = 0.1, use_dora: bool = False,
                _search: bool = True) -> Plan:
    """Predict peak GPU memory (bytes) of one QLoRA training step; see the module docstring for the terms.

    Optimizer placement as `PagedAdamW`: optim_offload=True -> "offload"; else paged=True -> "auto" (decided here from
    gpu_memory; "device" when no gpu_memory is given), paged=False -> "device"."""
    for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size), ("lora_r", lora_r)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {list(_DTYPE_BYTES)}, got {compute_dtype!r}")
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    shapes = _linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {list(shapes)}")
    L, D, V, B, T = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, micro_batch_size, seq_len
    cb = _DTYPE_BYTES[compute_dtype]
    bits = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    lin_params = L * sum(o * i for o, i in shapes.values())
    lora_params = L * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
    largest_lora = max(lora_r * max(shapes[t]) for t in targets)  # lora_A or lora_B, whichever is larger
    gm = parse_size(gpu_memory) if gpu_memory is not None else None
    terms = {
        "weights_4bit": lin_params * bits / 8,
        "embeddings": (V * D * (1 if cfg.tie_word_embeddings else 2) + (2 * L + 1) * D) * cb,
        "lora_params": lora_params * 4,
        "lora_grads": lora_params * 4,
        "lora_bf16": lora_params * cb if cb < 4 else 0.0,
        "optimizer": 0.0,  # filled in below, once the placement is known
    }
    terms.update(_activation_terms(cfg, shapes, B, T, cb, lora_r, targets, gradient_checkpointing,
                                   offload_checkpoints, lora_dropout, ce_chunk))
    terms["dora"] = _dora_bytes(shapes, targets, L, B, T, cb, lora_dropout,
                                1 if gradient_checkpointing else L) if use_dora else 0.0

    def finish(placement: str) -> dict[str, float]:
        t = dict(terms, optimizer=_optimizer_bytes(lora_params, largest_lora, optim_bits, placement))
        t["allocator_slack"] = ALLOCATOR_SLACK * sum(t.values())
        t["cuda_context"] = CUDA_CONTEXT
        return t

    requested = "offload" if optim_offload else "auto" if paged else "device"
    if requested != "auto":
        placement, reason = requested, "requested"
    elif gm is None:
        placement, reason = "device", "auto; no GPU memory given, assumed to fit"
    else:
        states = L * sum(state_bytes(lora_r * shapes[t][1], optim_bits) + state_bytes(shapes[t][0] * lora_r, optim_bits)
                         for t in targets)  # as PagedAdamW sizes them (8-bit: + absmax, small tensors 32-bit)
        rest = sum(finish("offload").values())
        placement = choose_placement(states, gm - rest, gm)
        reason = (f"auto: {states / GiB:.2f} GiB of states vs {(gm - rest) / GiB:.2f} GiB left free by the rest of "
                  f"the plan, margin 1 GiB + 5%")
    terms = finish(placement)
    total = sum(terms.values())
    settings = dict(model=cfg.name, seq_len=seq_len, micro_batch_size=micro_batch_size, lora_r=lora_r,
                    targets=list(targets), double_quant=double_quant, compute_dtype=compute_dtype,
                    gradient_checkpointing=gradient_checkpointing, offload_checkpoints=offload_checkpoints,
                    optim_bits=optim_bits, paged=paged, optim_offload=optim_offload, lora_dropout=lora_dropout,
                    use_dora=use_dora, ce_chunk=ce_chunk, optim_placement=placement, optim_placement_reason=reason)
    fits = max_mb = None
    if gm is not None:
        fits = total <= gm
        kw = dict(gpu_memory=gm / GiB, seq_len=seq_len, lora_r=lora_r, targets=targets, double_quant=double_quant,
                  compute_dtype=compute_dtype, gradient_checkpointing=gradient_checkpointing,
                  offload_checkpoints=offload_checkpoints, optim_bits=optim_bits, paged=paged, ce_chunk=ce_chunk,
                  optim_offload=optim_offload, lora_dropout=lora_dropout, use_dora=use_dora)
        max_mb = _largest_micro_batch(cfg, gm, kw) if _search else None
    return Plan(terms=terms, total=total, gpu_memory=gm, fits=fits, max_micro_batch=max_mb, settings=settings)


def _largest_micro_batch(cfg: LlamaConfig, gm: float, kw: dict) -> int:
    """The largest micro-batch (<= 4096) whose plan fits in `gm` bytes (0 if none): doubling, then bisection. Each
    candidate gets its own optimizer placement (a bigger batch can push "auto" to "offload")."""
    fits = lambda mb: bool(plan_memory(cfg, micro_batch_size=mb, _search=False, **kw).fits)  # noqa: E731
    max_mb, lo = 0, 1
    while lo <= 4096 and fits(lo):
        max_mb, lo = lo, lo * 2
    if max_mb:
        hi = min(max_mb * 2, 4097)
        while hi - max_mb > 1:
            mid = (max_mb + hi) // 2
            if fits(mid):
                max_mb = mid
            else:
                hi = mid
    return max_mb
