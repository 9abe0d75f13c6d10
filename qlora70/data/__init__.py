"""Training data: Medical Meadow / MedAlpaca, MedQA and PubMedQA -> prompt/answer entries -> token ids with
answer-only labels, cached on disk; length-grouped or packed batches with a resumable position; contamination check.

Pipeline (`build_dataset` does all of it; one module per stage: entries, templates, tokenized, batching, contamination):
    read_entries(paths)      JSON list / JSONL of {instruction, input, output}, a directory of such files, MedQA jsonl,
                             PubMedQA json (ori_pqal layout). Bad records are reported as `file:index` and skipped.
    clean_entries(entries)   drop empty and exact-duplicate entries (reasons and ids in the `DataReport`).
    tokenize_entries(...)    template -> (prompt, answer); labels are -100 on the prompt; EOS appended; sequences longer
                             than `seq_len` lose prompt tokens from the left (after BOS), and only an answer that does
                             not fit even then is cut (from the right, without EOS). Both counted.
    token cache              safetensors file keyed by data-file hashes + tokenizer fingerprint + template + settings.
    Batches                  deterministic (seed, epoch) shuffling, group-by-length or packing, `state_dict()` resume.

Labels follow the HF convention: `labels[t]` is the target for position t and the loss shifts (logits[:, :-1] vs
labels[:, 1:]). Nothing here logs record text: reports carry counts and ids.
"""
from __future__ import annotations

from ..config import IGNORE_INDEX
from ..model import document_causal_mask
from .batching import Batches, collate, collate_packed, pack_indices
from .contamination import ContaminationReport, contamination_check, contamination_check_paths, normalize_words
from .entries import DataReport, Entry, clean_entries, detect_kind, expand_paths, read_entries, shipped_data_dir
from .templates import MEDALPACA_PRIMER, MEDALPACA_TEMPLATE, SM70_TEMPLATE, TEMPLATES, PromptTemplate, get_template
from .tokenized import (CACHE_VERSION, DEFAULT_SEQ_LEN, TokenizedData, build_dataset, dataset_cache_key,
                        default_cache_dir, encode_example, encode_text, file_sha256, resolve_add_bos,
                        tokenize_entries, tokenizer_fingerprint)

__all__ = ["Entry", "PromptTemplate", "SM70_TEMPLATE", "MEDALPACA_TEMPLATE", "TEMPLATES", "get_template", "DataReport",
           "read_entries", "clean_entries", "detect_kind", "expand_paths", "shipped_data_dir", "encode_example",
           "tokenize_entries", "TokenizedData", "encode_text", "resolve_add_bos", "build_dataset",
           "tokenizer_fingerprint", "default_cache_dir", "collate", "pack_indices", "collate_packed",
           "document_causal_mask", "Batches", "IGNORE_INDEX", "normalize_words", "contamination_check",
           "contamination_check_paths", "ContaminationReport", "DEFAULT_SEQ_LEN"]
