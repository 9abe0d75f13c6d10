"""A hand-written Llama-2 decoder (gpt-fast / nanoGPT style) whose `state_dict()` keys equal HF `LlamaForCausalLM`.

    Llama
      model.embed_tokens        nn.Embedding(V, D)
      model.layers[i]           LlamaDecoderLayer
        input_layernorm           RMSNorm(D)
        self_attn                 q_proj (H*hd, D), k_proj / v_proj (KV*hd, D), o_proj (D, H*hd)
        post_attention_layernorm  RMSNorm(D)
        mlp                       gate_proj / up_proj (F, D), down_proj (D, F)       SwiGLU
      model.norm                RMSNorm(D)
      lm_head                   nn.Linear(D, V)  (the same Parameter as embed_tokens when tied)

Rotary embeddings use HF's rotate-half layout (dimension i pairs with i + hd/2). Attention runs through
`F.scaled_dot_product_attention` with grouped-query attention (H query heads share KV key/value heads).
Every decoder linear may be swapped for a frozen NF4 `Linear4bit` (`quantize_model_`) or a LoRA wrapper: modules are
always called as `self.q_proj(x)`, so a `setattr(parent, name, new_module)` replacement just works.

Masking (`attention_mask`, optional, (B, T) or (B, start_pos + T) integers):
  0 marks padding, any positive value is a document id. Query i attends key j iff j <= i (causal), the key is not
  padding and both carry the same document id. An HF-style 0/1 mask is the one-document case; a packed row of several examples
  passes ids 1, 1, 1, 2, 2, 3, ... (0 for the padding tail) so attention never crosses examples; pass matching
  `position_ids` (restarting at 0 per example) for HF-equivalent results. Padding queries attend only to themselves
  (their outputs are finite but meaningless: mask them out of the loss).
  With a KV cache the document ids of cached keys are kept in the cache; later calls without a mask treat the new tokens
  as document 1 (the usual left-padded batch generation case).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import ops
from .config import LlamaConfig
from .layers import Linear4bit
from .recompute import RECOMPUTE_POLICIES, keep_base_outputs_context_fn

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back (as HF)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return ops.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) long -> cos, sin (B, T, hd) in `dtype` (computed in fp32, rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))  # (hd/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated keys/values of every layer: k, v (L, B, KV, max_len, hd). Positions [0, start_pos + T) are valid
    after a forward at `start_pos` with T new tokens. `doc` (B, max_len) holds the keys' document ids once a forward
    passed an `attention_mask` (None until then)."""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.doc: torch.Tensor | None = None
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(cls, model: "Llama", batch_size: int, max_len: int) -> "KVCache":
        w = model.model.embed_tokens.weight
        return cls(model.config, batch_size, max_len, dtype=w.dtype, device=w.device)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, hd) at [start_pos, start_pos + T); return all keys/values so far (B, KV, S, hd)."""
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, D)
        dt = ops.compute_dtype_of(x)  # q and k leave RoPE in the dtype SDPA computes in (autocast's, else x's)
        q = ops.rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin, dt)  # (B, H, T, hd)
        k = ops.rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin, dt)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)  # (B, KV, S, hd), S = start_pos + T
        causal = mask is None and q.shape[2] == k.shape[2] and T > 1
        # GQA: each KV head serves H / KV consecutive query heads; SDPA reads the shared heads in place (no
        # repeat_interleave copies of k and v, nor their gradients' sums: ~15% of a GQA attention step on a CPU)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_head != self.n_kv)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, D)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, Fd = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, Fd, bias=False)
        self.up_proj = nn.Linear(D, Fd, bias=False)
        self.down_proj = nn.Linear(Fd, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        V, D = config.vocab_size, config.hidden_size
        # on the meta device (streaming loads) skip the normal_ init: meta normal_ imports torch._dynamo (+155 MB RSS)
        self.embed_tokens = nn.Embedding(V, D, _weight=torch.empty(V, D) if torch.empty(0).is_meta else None)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def document_causal_mask(q_doc: torch.Tensor, k_doc: torch.Tensor | None = None, start_pos: int = 0) -> torch.Tensor:
    """The one document mask: q_doc (B, T), k_doc (B, S) document ids (0 = padding; default k_doc = q_doc, a packed
    row as `qlora70.data.collate_packed` returns it) -> bool mask (B, 1, T, S) for SDPA, True where query i may attend
    key j: same document, key not padding, j <= i (queries sit at absolute positions start_pos..start_pos+T-1). Every
    query also sees itself, so padding rows never softmax over nothing (no NaN)."""
    k_doc = q_doc if k_doc is None else k_doc
    T, S = q_doc.shape[1], k_doc.shape[1]
    qi = torch.arange(start_pos, start_pos + T, device=q_doc.device)[:, None]  # (T, 1) absolute query positions
    kj = torch.arange(S, device=q_doc.device)[None, :]  # (1, S)
    allowed = (kj <= qi)[None] & (q_doc[:, :, None] == k_doc[:, None, :]) & (k_doc[:, None, :] != 0)  # (B, T, S)
    allowed |= (kj == qi)[None]  # every query sees itself, so padding rows never softmax over nothing
    return allowed[:, None]


class Llama(nn.Module):
    """The Llama decoder + LM head. `forward(input_ids (B, T)) -> logits (B, T, V)` (see module docstring for masks)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.checkpoint_offload = False
        self.checkpoint_policy = "full"

    def tie_weights_(self) -> None:
        """Re-point lm_head at the embedding after the embedding Parameter was replaced (tied configs only)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None, start_pos: int = 0,
                return_hidden: bool = False, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) long -> logits (B, T, V) in the model dtype, or with `return_hidden` the final-norm hidden
        states (B, T, D). `position_ids` (B, T) or (T,) default to start_pos + arange(T). With `cache`, keys/values are
        written at [start_pos, start_pos + T) and attention covers [0, start_pos + T)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = input_ids.device
        if cache is not None and (start_pos + T > cache.max_len or B != cache.batch_size):
            raise ValueError(f"KVCache holds batch {cache.batch_size} x {cache.max_len} positions; got batch {B} "
                             f"writing positions [{start_pos}, {start_pos + T}); allocate a larger cache")
        if position_ids is None:
            position_ids = torch.arange(start_pos, start_pos + T, device=dev)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)  # (B, T, hd)
        mask = self._mask(attention_mask, cache, start_pos, B, T, dev)
        use_ckpt = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_ckpt:
                ctx = (torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if self.checkpoint_offload
                       else contextlib.nullcontext())
                kw = {}
                if self.checkpoint_policy == "keep_base_outputs":  # reuse the frozen base matmuls of LoRA layers
                    kw["context_fn"] = keep_base_outputs_context_fn
                with ctx:  # checkpoint saves the layer inputs through the ambient hooks: to CPU when offloading
                    x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False, **kw)
            else:
                x = layer(x, cos, sin, mask, cache, start_pos)
        x = self.model.norm(x)  # (B, T, D)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    def _mask(self, attention_mask: torch.Tensor | None, cache: KVCache | None, start_pos: int, B: int, T: int,
              dev: torch.device) -> torch.Tensor | None:
        """The bool SDPA mask (B, 1, T, S), or None when plain causal attention is exact."""
        if attention_mask is not None:
            am = attention_mask.to(dev).long()
            if am.shape == (B, start_pos + T):  # HF style: covers the cached prefix too
                am = am[:, start_pos:]
            if am.shape != (B, T):
                raise ValueError(f"attention_mask must be (B, T) = {(B, T)} or (B, start_pos + T) = "
                                 f"{(B, start_pos + T)}, got {tuple(attention_mask.shape)}")
        else:
            am = None
        if cache is None:
            if am is None:
                return None
            return document_causal_mask(am)
        if am is not None and cache.doc is None:
            cache.doc = torch.ones(cache.batch_size, cache.max_len, dtype=torch.long, device=dev)
        if cache.doc is None:
            if start_pos == 0 or T == 1:
                return None  # causal over the first T keys, or one query seeing the whole prefix
            S = start_pos + T
            return (torch.arange(S, device=dev)[None] <= torch.arange(start_pos, S, device=dev)[:, None])
        q_doc = am if am is not None else torch.ones(B, T, dtype=torch.long, device=dev)
        cache.doc[:, start_pos:start_pos + T] = q_doc
        return document_causal_mask(q_doc, cache.doc[:, :start_pos + T], start_pos)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache.for_model(self, batch_size, max_len)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def decoder_linears(model: Llama):
    """Yield (qualified name, parent module, attribute name, module) for the 7 linears of every decoder layer."""
    for i, layer in enumerate(model.model.layers):
        for path in LINEAR_NAMES:
            sub, attr = path.split(".")
            parent = getattr(layer, sub)
            yield f"model.layers.{i}.{path}", parent, attr, getattr(parent, attr)


@torch.no_grad()
def quantize_model_(model: Llama, blocksize: int = 64, double_quant: bool = True) -> Llama:
    """Replace every decoder nn.Linear by a frozen NF4 `Linear4bit` (in place; embeddings, norms and lm_head stay in
    high precision). The NF4 weights record the linear's dtype as their original dtype. Returns the model."""
    for name, parent, attr, mod in decoder_linears(model):
        if isinstance(mod, Linear4bit):
            continue
        if type(mod) is not nn.Linear:
            raise TypeError(f"quantize_model_: {name} is a {type(mod).__name__}, expected nn.Linear; quantize before "
                            "injecting LoRA")
        setattr(parent, attr, Linear4bit.from_linear(mod, blocksize=blocksize, double_quant=double_quant))
    return model


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True, offload: bool = False,
                               policy: str = "full") -> nn.Module:
    """Recompute each decoder layer in backward (`torch.utils.checkpoint`, use_reentrant=False) instead of keeping its
    activations; only the layer inputs (B, T, D) are saved, on CPU when `offload` (pinned when the model is on CUDA).
    policy "keep_base_outputs" also keeps the LoRA layers' frozen base outputs from the forward so the recomputation
    skips those matmuls (`qlora70.recompute.keep_base_outputs_context_fn`; more memory, less compute).
    Active only when gradients are enabled and no KV cache is passed."""
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
    target = model
    while not isinstance(target, Llama):  # accept wrappers exposing the Llama as `.model` / `.base_model`
        nxt = getattr(target, "base_model", None) or getattr(target, "model", None)
        if nxt is None or nxt is target:
            raise TypeError(f"set_gradient_checkpointing expects a qlora70 Llama, got {type(model).__name__}")
        target = nxt
    target.gradient_checkpointing = bool(enabled)
    target.checkpoint_offload = bool(offload) and bool(enabled)
    target.checkpoint_policy = policy
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{'total': ..., 'trainable': ...} counting NF4 weights by their logical element count (2 per packed byte)."""
    total = trainable = 0
    seen: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = m.out_features * m.in_features if isinstance(m, Linear4bit) and p is m.weight else p.numel()
            total += n
            trainable += n if p.requires_grad else 0
    return {"total": total, "trainable": trainable}
