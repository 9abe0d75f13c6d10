"""Evaluation: letter/option log-likelihoods against a direct full-sequence computation with transformers' Llama,
metrics (Wilson CI, macro-F1), answer extraction, truncation, k-shot prompts, sampling, reports."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import check_inputs, sha256_json, state_fingerprint, tiny_llama
from qlora70 import evaluate as E
from qlora70.data import Entry, tokenize_entries
from qlora70.tasks import load_medqa, load_pubmedqa

sentencepiece = pytest.importorskip("sentencepiece")

DATA = Path(__file__).resolve().parent.parent / "data"
MEDQA_TEST = DATA / "medqa/US_4options_test_200.jsonl"
MEDQA_DEV = DATA / "medqa/US_4options_dev_300.jsonl"


# GOLDEN values; regenerate: `python tests/make_golden.py evaluate` (oracles installed; see its docstring).
# GOLDEN: transformers 5.24.0 LlamaForCausalLM (CPU fp32, one thread, torch 2.13.0+cpu), computed once:
# reference_loglik(hf, tok, prompt, " " + label) for every label of golden_items(), with tok = train_tokenizer() and
# hf = the transformers twin (m.config.to_hf(), m.state_dict()) of seeded_llama(tok); "inputs" =
# state_fingerprint(seeded_llama(tok).state_dict()), "encoded" = sha256_json of tok.encode(prompt + " " + label) (the
# sentencepiece training is part of the inputs).
HF_LOGLIK_GOLDEN = {"inputs": [407.745085785, 135853.332597042],
                    "encoded": "7225cb18a36266bbe49746485271f94e1ffbf93628a5297841003e563365cdbf"}
HF_LOGLIK_REFS = [
    -29.36902, -22.261142, -38.544552, -42.485811, -29.790746, -22.692169, -37.953848, -43.76786,
    -31.143619, -23.632164, -38.857617, -43.538583, -28.901545, -22.072765, -37.273996, -42.873098,
    -28.979734, -22.44445, -38.222193, -42.184466, -30.23795, -21.682433, -38.033498, -42.671439,
    -55.932896, -41.399257, -174.086262, -54.451272, -42.083052, -175.147352, -54.178865, -41.361653,
    -173.981074, -53.888392, -40.471997, -174.809867,
]


class SPTokenizer:
    """The qlora70 Tokenizer interface over a sentencepiece model trained in the test (Llama-like BPE settings)."""

    def __init__(self, proto: bytes) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


@pytest.fixture(scope="module")
def tok() -> SPTokenizer:
    return train_tokenizer()


def train_tokenizer() -> SPTokenizer:
    """A 1000-piece sentencepiece BPE trained (one thread: deterministic) on MedQA dev questions + PubMedQA contexts."""
    texts = [it.question for it in load_medqa(MEDQA_DEV).items[:150]]
    texts += [it.context for it in load_pubmedqa(DATA / "pubmedqa").items[:60]]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=1000, model_type="bpe", byte_fallback=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        max_sentence_length=20000, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True)
    return SPTokenizer(buf.getvalue())


@pytest.fixture(scope="module")
def hf(tok):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits so the letters do not tie
        m.lm_head.weight.mul_(20)
    return m


def model_fn(hf):
    return lambda ids: hf(ids).logits


def reference_loglik(hf, tok, prompt: str, continuation: str) -> float:
    """Independent reference: one unpadded forward over BOS + enc(prompt + continuation), full-sequence log-softmax,
    summed over the continuation tokens (those after enc(prompt))."""
    ctx = [tok.bos_id] + tok.encode(prompt)
    whole = [tok.bos_id] + tok.encode(prompt + continuation)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


# ------------------------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("k, n, lo, hi", [(5, 10, 0.236593, 0.763407), (0, 10, 0.0, 0.277533),
                                          (10, 10, 0.722467, 1.0)])
def test_wilson_interval(k, n, lo, hi):
    got = E.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=2e-6)
    assert all(math.isnan(x) for x in E.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        E.wilson_interval(3, 2)


@pytest.mark.parametrize("k, n", [(81, 263), (1, 7), (49, 50), (37, 100)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Wilson's bounds are the roots p0 of (k/n - p0)^2 = z^2 p0 (1 - p0) / n (an independent formulation)."""
    z2, ph = E.Z95 ** 2, k / n
    a, b, c = 1 + z2 / n, -(2 * ph + z2 / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    assert E.wilson_interval(k, n) == pytest.approx(((-b - disc) / (2 * a), (-b + disc) / (2 * a)), abs=1e-12)


def test_macro_f1_hand_computed():
    gold = ["yes", "yes", "yes", "no", "no", "maybe"]
    pred = ["yes", "yes", "no", "no", "yes", None]
    # yes: tp 2, fp 1, fn 1 -> 4/6; no: tp 1, fp 1, fn 1 -> 2/4; maybe: tp 0 -> 0
    assert E.macro_f1(gold, pred) == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)
    assert E.macro_f1(["yes", "no"], ["yes", "no"]) == 1.0
    assert E.macro_f1(gold, pred, labels=["yes", "no"]) == pytest.approx((4 / 6 + 2 / 4) / 2)
    with pytest.raises(ValueError):
        E.macro_f1(["yes"], [])


@pytest.mark.parametrize("text, want", [("C", "C"), (" C. Ceftriaxone", "C"), ("(B) because", "B"), ("D:", "D"),
                                        ("The answer is B.", "B"), ("Answer: (A)", "A"), ("E", None),
                                        ("Ceftriaxone is best", "C"), ("I am not sure", None), ("", None),
                                        ("Cephalosporins", None), ("the answer is a drug", None),
                                        ("My answer: D", "D")])
def test_extract_letter(text, want):
    opts = {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone", "D": "Trimethoprim"}
    assert E.extract_answer(text, list(opts), opts) == want


@pytest.mark.parametrize("text, want", [("yes", "yes"), ("No, it does not.", "no"), ("Maybe.", "maybe"),
                                        ("It is unclear, so maybe", "maybe"), ("unknown", None)])
def test_extract_word(text, want):
    assert E.extract_answer(text, ["yes", "no", "maybe"]) == want


# ------------------------------------------------------------------------------------------ log-likelihood parity

def test_letter_loglikelihoods_equal_direct_transformers(tok, hf):
    items = load_medqa(MEDQA_TEST).items[:6] + load_pubmedqa(DATA / "pubmedqa").items[:4]
    fmt_of = lambda it: E.FORMATS["lm-eval-pubmedqa" if it.context else "lm-eval-mcq"]
    requests, refs = [], []
    for it in items:
        prompt = fmt_of(it).render(it)
        for lab in it.labels:
            requests.append(E.split_continuation(tok, prompt, " " + lab, add_bos=True))
            refs.append(reference_loglik(hf, tok, prompt, " " + lab))
    assert any(len(c) > 1 for _, c in requests)  # " maybe" is several tokens with this tokenizer
    for bs in (1, 3, 16):
        got = E.loglikelihoods(model_fn(hf), requests, batch_size=bs, pad_id=tok.pad_id, progress=False)
        assert got == pytest.approx(refs, abs=2e-5, rel=1e-6)


def golden_items():
    return load_medqa(MEDQA_TEST).items[:6] + load_pubmedqa(DATA / "pubmedqa").items[:4]


def seeded_llama(tok):
    """A seeded qlora70 Llama shaped like the `hf` fixture's model (larger lm_head so the letters do not tie)."""
    m = tiny_llama(0, vocab_size=tok.vocab_size, intermediate_size=128, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


def test_letter_loglikelihoods_golden(tok):
    """Without transformers: batched, right-padded letter log-likelihoods equal the pinned one-forward-per-request
    references transformers computed for the same seeded weights (companion of
    test_letter_loglikelihoods_equal_direct_transformers)."""
    m = seeded_llama(tok)
    check_inputs(state_fingerprint(m.state_dict()), HF_LOGLIK_GOLDEN["inputs"], "test_letter_loglikelihoods_golden")
    fmt_of = lambda it: E.FORMATS["lm-eval-pubmedqa" if it.context else "lm-eval-mcq"]  # noqa: E731
    pairs = [(fmt_of(it).render(it), " " + lab) for it in golden_items() for lab in it.labels]
    assert sha256_json([tok.encode(p + c) for p, c in pairs]) == HF_LOGLIK_GOLDEN["encoded"], \
        "the trained tokenizer or the prompts changed: recompute the golden values"
    requests = [E.split_continuation(tok, p, c, add_bos=True) for p, c in pairs]
    for bs in (1, 16):
        got = E.loglikelihoods(m, requests, batch_size=bs, pad_id=tok.pad_id, progress=False)
        assert got == pytest.approx(HF_LOGLIK_REFS, abs=2e-5, rel=1e-6)


def test_one_forward_per_question(tok, hf):
    items = load_medqa(MEDQA_TEST).items[:5]
    calls = []

    def counting(ids):
        calls.append(ids.shape)
        return hf(ids).logits

    requests = [E.split_continuation(tok, E.FORMATS["lm-eval-mcq"].render(it), " " + lab, True)
                for it in items for lab in it.labels]
    E.loglikelihoods(counting, requests, batch_size=1, pad_id=0, progress=False)
    assert len(calls) == len(items)


def test_evaluate_scores_match_reference_and_argmax(tok, hf):
    td = load_medqa(MEDQA_TEST)
    rep = E.evaluate_items(model_fn(hf), tok, td, mode="letter", limit=8, seed=1, batch_size=4, progress=False)
    assert rep.n_scored == 8 and rep.prompt_format == "lm-eval-mcq"
    by_id = {it.id: it for it in td.items}
    for p in rep.predictions[:4]:
        it = by_id[p["id"]]
        prompt = E.FORMATS["lm-eval-mcq"].render(it)
        ref = {lab: reference_loglik(hf, tok, prompt, " " + lab) for lab in it.labels}
        assert p["scores"] == pytest.approx(ref, abs=2e-5)
        assert p["pred"] == max(ref, key=ref.get) and p["gold"] == it.answer
    assert rep.n_correct == sum(p["correct"] for p in rep.predictions)
    lo, hi = rep.ci95
    assert lo <= rep.accuracy <= hi


def test_option_mode_raw_and_normalized(tok, hf, tmp_path):
    td = load_medqa(MEDQA_TEST)
    rep = E.evaluate_items(model_fn(hf), tok, td, mode="option_norm", limit=4, seed=2, progress=False)
    rep.save(tmp_path, stem="opt")  # lm-eval's acc is the raw argmax, acc_norm the per-character one
    lm = json.loads((tmp_path / "lm_eval" / "results_opt.json").read_text())["results"]["medqa_4options"]
    assert lm["acc,none"] == pytest.approx(rep.accuracy_raw) and lm["acc_norm,none"] == pytest.approx(rep.accuracy_norm)
    assert rep.metrics.calibration.accuracy == pytest.approx(rep.accuracy)  # option_norm: probabilities of scores_norm
    it = {i.id: i for i in td.items}[rep.predictions[0]["id"]]
    prompt = E.FORMATS["lm-eval-mcq"].render(it)
    for lab, text in it.options.items():
        raw = reference_loglik(hf, tok, prompt, " " + text)
        assert rep.predictions[0]["scores"][lab] == pytest.approx(raw, abs=5e-5)
        assert rep.predictions[0]["scores_norm"][lab] == pytest.approx(raw / len(" " + text), abs=1e-6)
    for p in rep.predictions:
        assert p["pred_norm"] == max(p["scores_norm"], key=p["scores_norm"].get) == p["pred"]
        assert p["pred_raw"] == max(p["scores"], key=p["scores"].get)
    assert rep.accuracy == rep.accuracy_norm and rep.accuracy_raw is not None


def test_our_llama_gives_the_same_letter_scores(tok, hf):
    from qlora70 import model as model_mod
    from qlora70.config import LlamaConfig

    c = hf.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=2048)
    ours = model_mod.Llama(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    td = load_medqa(MEDQA_TEST)
    a = E.evaluate_items(ours, tok, td, limit=5, progress=False)
    b = E.evaluate_items(model_fn(hf), tok, td, limit=5, progress=False)
    for p, q in zip(a.predictions, b.predictions):  # ours goes through return_hidden + lm_head at scored positions
        assert p["scores"] == pytest.approx(q["scores"], abs=1e-4)
    entries = [Entry("Answer this question truthfully", f"What is disease {i}?", f"Disease {i} is rare.", f"t:{i}")
               for i in range(4)]
    data = tokenize_entries(entries, tok, seq_len=128, progress=False)
    la = E.answer_loss(ours, data, batch_size=3, progress=False)
    lb = E.answer_loss(model_fn(hf), data, batch_size=3, progress=False)
    assert la["n_tokens"] == lb["n_tokens"] and la["loss"] == pytest.approx(lb["loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------- prompts and sampling

def test_long_prompts_cut_question_from_the_left(tok, hf):
    td = load_medqa(MEDQA_TEST)
    calls = []

    def spy(ids):
        calls.append(ids.shape[1])
        return hf(ids).logits

    rep = E.evaluate_items(spy, tok, td, limit=12, seed=0, max_length=160, save_text=True, progress=False)
    assert rep.n_truncated > 0 and max(calls) <= 160
    by_id = {it.id: it for it in td.items}
    for p in rep.predictions:
        it = by_id[p["id"]]
        tail = "\n" + "\n".join(f"{k}. {v}" for k, v in it.options.items()) + "\nAnswer:"
        assert p["prompt"].startswith("Question: ") and p["prompt"].endswith(tail)  # options and cue intact
        q_kept = p["prompt"][len("Question: "):-len(tail)]
        assert it.question.endswith(q_kept)  # the end of the question survives
        assert p["truncated"] == (q_kept != it.question)
        if p.get("hard_truncated"):  # options alone exceed the budget: the question is gone, tokens were cut
            assert q_kept == "" and len(tok.encode(p["prompt"])) + 1 > 160
        else:
            assert len(tok.encode(p["prompt"])) + 1 <= 160
    assert rep.n_hard_truncated == sum(bool(p.get("hard_truncated")) for p in rep.predictions)


def test_k_shot_prompts(tok, hf):
    td, dev = load_medqa(MEDQA_TEST), load_medqa(MEDQA_DEV)
    rep = E.evaluate_items(model_fn(hf), tok, td, limit=3, seed=4, k_shot=2, fewshot=dev, max_length=4096,
                           save_text=True, progress=False)
    dev_by_q = {it.question: it for it in dev.items}
    for p in rep.predictions:
        parts = p["prompt"].split("\n\nQuestion: ")
        assert len(parts) == 3 and p["n_shots"] == 2
        for shot in parts[:2]:
            q = shot.removeprefix("Question: ").split("\nA. ")[0]
            assert shot.endswith(f"\nAnswer: {dev_by_q[q].answer}")
    again = E.evaluate_items(model_fn(hf), tok, td, limit=3, seed=4, k_shot=2, fewshot=dev, max_length=4096,
                             save_text=True, progress=False)
    assert [p["prompt"] for p in again.predictions] == [p["prompt"] for p in rep.predictions]
    # a tight budget drops shots before cutting the question
    tight = E.evaluate_items(model_fn(hf), tok, td, limit=3, seed=4, k_shot=2, fewshot=dev, max_length=700,
                             progress=False)
    assert tight.n_fewer_shots > 0
    with pytest.raises(ValueError, match="few-shot"):
        E.evaluate_items(model_fn(hf), tok, td, k_shot=1, progress=False)


def test_shot_seed_redraws_the_shots_not_the_items(tok, hf):
    """--shot-seeds: another shot_seed changes the shots, never the --limit sample; shot_seed == seed is the default."""
    td, dev = load_medqa(MEDQA_TEST), load_medqa(MEDQA_DEV)
    kw = dict(limit=3, seed=4, k_shot=2, fewshot=dev, max_length=4096, save_text=True, progress=False)
    base = E.evaluate_items(model_fn(hf), tok, td, **kw)
    same = E.evaluate_items(model_fn(hf), tok, td, shot_seed=4, **kw)
    other = E.evaluate_items(model_fn(hf), tok, td, shot_seed=5, **kw)
    ids = [p["id"] for p in base.predictions]
    assert [p["id"] for p in other.predictions] == ids and [p["id"] for p in same.predictions] == ids
    assert [p["prompt"] for p in same.predictions] == [p["prompt"] for p in base.predictions]
    assert [p["prompt"] for p in other.predictions] != [p["prompt"] for p in base.predictions]
    assert base.shot_seed is None and other.shot_seed == 5 and other.to_dict()["shot_seed"] == 5
    with pytest.raises(ValueError, match="needs a value in .0, 1. and a log-likelihood mode"):
        E.evaluate_items(model_fn(hf), tok, td, limit=2, mode="generate", target_accuracy=0.8, progress=False)


def test_limit_is_a_seeded_sample_not_the_first_n():
    items = load_pubmedqa(DATA / "pubmedqa").items
    a = E.sample_items(items, 20, seed=0)
    assert a == E.sample_items(items, 20, seed=0) and a != E.sample_items(items, 20, seed=1)
    assert [it.id for it in a] != [it.id for it in items[:20]]
    assert len({it.answer for it in a}) >= 2
    pos = [items.index(it) for it in a]
    assert pos == sorted(pos)  # file order kept


# ------------------------------------------------------------------------------------------------ tasks, reports

def test_pubmedqa_report_has_macro_f1_and_confusion(tok, hf, tmp_path):
    rep = E.evaluate_task(model_fn(hf), tok, "pubmedqa", DATA / "pubmedqa", limit=10, seed=3, max_length=512,
                          out_dir=tmp_path, progress=False)
    assert rep.prompt_format == "lm-eval-pubmedqa" and rep.confusion is not None
    gold = [p["gold"] for p in rep.predictions]
    pred = [p["pred"] for p in rep.predictions]
    assert rep.macro_f1 == pytest.approx(E.macro_f1(gold, pred))
    assert sum(sum(r.values()) for r in rep.confusion.values()) == 10
    saved = json.loads((tmp_path / "eval_pubmedqa.json").read_text())
    assert saved["n_scored"] == 10 and saved["macro_f1"] == pytest.approx(rep.macro_f1)
    assert saved["prompt_template"].startswith("Abstract: ")
    lines = (tmp_path / "eval_pubmedqa_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10
    questions = {it.id: it for it in load_pubmedqa(DATA / "pubmedqa").items}
    for line in lines:  # ids and scores, never the question or abstract text
        rec = json.loads(line)
        assert set(rec) == {"id", "group", "gold", "pred", "correct", "scores", "truncated", "labels", "gold_index",
                            "logliks", "probs"}
        assert rec["labels"] == list(rec["scores"]) and rec["logliks"] == list(rec["scores"].values())
        assert rec["labels"][rec["gold_index"]] == rec["gold"] and abs(sum(rec["probs"]) - 1) < 1e-9
        assert questions[rec["id"]].question not in line
    md = (tmp_path / "eval_pubmedqa.md").read_text()
    assert "| n scored |" in md and "ECE (15 equal-width bins)" in md and "](eval_pubmedqa_reliability.png)" in md
    assert saved["calibration_selective"]["calibration"]["ece"] == pytest.approx(rep.metrics.calibration.ece)
    for png in ("eval_pubmedqa_reliability.png", "eval_pubmedqa_coverage.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    lm = json.loads((tmp_path / "lm_eval" / "results_eval_pubmedqa.json").read_text())
    assert lm["results"]["pubmedqa"]["acc,none"] == pytest.approx(rep.accuracy)
    assert len((tmp_path / "lm_eval" / "samples_pubmedqa_eval_pubmedqa.jsonl").read_text().splitlines()) == 10


def test_usmle_per_step_and_exclusions(tok, hf):
    rep = E.evaluate_task(model_fn(hf), tok, "usmle", DATA / "usmle", limit=30, seed=0, max_length=1024,
                          progress=False)
    assert rep.n_scored == 30 and rep.n_excluded == 55 and rep.n_available == 321
    assert rep.excluded == {"image_question": 50, "merged_option_text": 4, "no_options": 1}
    assert "step2:115" in rep.excluded_ids["merged_option_text"]
    assert set(rep.per_group) <= {"step1", "step2", "step3"} and sum(g["n"] for g in rep.per_group.values()) == 30
    for p in rep.predictions:  # 4..8 letters, one score each
        assert p["pred"] in p["scores"] and len(p["scores"]) >= 3
    md = rep.to_markdown()
    assert "| step1 |" in md and "image_question 50" in md


def test_generation_mode_with_generate_fn(tok, hf):
    td = load_medqa(MEDQA_TEST)
    gold = {it.question: it.answer for it in td.items}

    def oracle(prompt: str) -> str:  # answers from the question text it is given
        q = prompt.removeprefix("Question: ").split("\nA. ")[0]
        return f" {gold[q]}. because"

    rep = E.evaluate_items(None, tok, td, mode="generate", limit=10, generate_fn=oracle, progress=False)
    assert rep.accuracy == 1.0 and rep.n_unparsed == 0
    rep = E.evaluate_items(None, tok, td, mode="generate", limit=10, generate_fn=lambda p: "no idea", progress=False)
    assert rep.accuracy == 0.0 and rep.n_unparsed == 10
    # the built-in greedy loop runs on any logits callable
    rep = E.evaluate_items(model_fn(hf), tok, td, mode="generate", limit=2, max_new_tokens=3, save_text=True,
                           progress=False)
    assert rep.n_scored == 2 and all(isinstance(p["reply"], str) for p in rep.predictions)


def test_generic_mcq_and_reports_table(tok, hf, tmp_path):
    rows = [{"question": f"Which organ filters blood number {i}?", "options": ["Kidney", "Lung", "Skin"], "answer": 0}
            for i in range(4)] + [{"question": "broken", "options": []}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rep = E.evaluate_task(model_fn(hf), tok, "mcq", tmp_path / "m.jsonl", mode="option", progress=False, name="before")
    assert rep.n_scored == 4 and rep.excluded == {"no_options": 1} and rep.accuracy == rep.accuracy_raw
    table = E.reports_table([rep, rep], ["before", "after"])
    assert table.count("| mcq | option | 4 |") == 2


def test_bad_arguments(tok, hf):
    td = load_medqa(MEDQA_TEST)
    with pytest.raises(ValueError, match="unknown mode"):
        E.evaluate_items(model_fn(hf), tok, td, mode="logprob", progress=False)
    with pytest.raises(ValueError, match="unknown prompt format"):
        E.evaluate_items(model_fn(hf), tok, td, prompt_format="chatml", progress=False)
    with pytest.raises(ValueError, match="logits"):
        E.evaluate_items(lambda ids: ids.float(), tok, td, limit=1, progress=False)
    with pytest.raises(ValueError, match="limit"):
        E.evaluate_items(model_fn(hf), tok, td, limit=0, progress=False)
    with pytest.raises(FileNotFoundError):
        E.evaluate_task(model_fn(hf), tok, "medqa", DATA / "nope.jsonl", progress=False)


def test_answer_loss_matches_manual(tok, hf):
    entries = [Entry("Answer this question truthfully", f"What is disease {i}?", f"Disease {i} is rare.", f"t:{i}")
               for i in range(5)]
    data = tokenize_entries(entries, tok, seq_len=128, progress=False)
    out = E.answer_loss(model_fn(hf), data, batch_size=2, pad_id=tok.pad_id, progress=False)
    total, count = 0.0, 0
    for i in range(len(data)):
        ids, labels = data.example(i)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.from_numpy(ids)[None]).logits[0].double(), -1)
        for t in range(1, len(ids)):
            if labels[t] != -100:
                total -= float(logp[t - 1, labels[t]])
                count += 1
    assert out["n_tokens"] == count and out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sm70_eval_prompt_matches_training_text(tok):
    """The "sm70" prompt format is the training template: prompt + " " + answer text == the training text."""
    from qlora70.data import SM70_TEMPLATE, read_entries

    entries, _ = read_entries([MEDQA_DEV, DATA / "pubmedqa/pqal_fold0_dev_set.json"])
    items = load_medqa(MEDQA_DEV).items + load_pubmedqa(DATA / "pubmedqa/pqal_fold0_dev_set.json").items
    fmt = E.get_format("sm70")
    for e, it in list(zip(entries, items))[::25]:
        prompt, answer = SM70_TEMPLATE.render(e)
        assert fmt.render(it) == prompt
        assert answer.startswith(fmt.target(it.answer))


def test_long_abstract_is_cut_before_the_question(tok, hf):
    td = load_pubmedqa(DATA / "pubmedqa")
    rep = E.evaluate_items(model_fn(hf), tok, td, limit=4, seed=0, max_length=120, save_text=True, progress=False)
    by_id = {it.id: it for it in td.items}
    assert rep.n_truncated == 4 and rep.n_hard_truncated == 0
    for p in rep.predictions:
        it = by_id[p["id"]]
        assert p["prompt"].endswith(f"\nQuestion: {it.question}\nAnswer:")  # whole question kept
        kept = p["prompt"][len("Abstract: "):-len(f"\nQuestion: {it.question}\nAnswer:")]
        assert it.context.endswith(kept) and len(kept) < len(it.context)
