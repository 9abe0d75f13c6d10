"""Generation: cached greedy == recomputed greedy, batched == one by one, sampling, top-p, stop strings, EOS."""
import pytest
import torch

from conftest import normal_init, tiny_llama
from qlora70.generation import generate, generate_ids, sample_next
from qlora70.model import Llama




def random_model(seed=0, quant=False) -> Llama:
    return tiny_llama(seed, quantize=quant, init=normal_init(0.5, 0.1), vocab_size=61, intermediate_size=96,
                      name="custom")


class CharTokenizer:
    """ids 3.. are the characters ' '..'z' (wrapping); 1 = BOS, 2 = EOS."""

    bos_id, eos_id, pad_id, add_bos_default = 1, 2, 0, True

    def encode(self, text, bos=False, eos=False):
        return ([1] if bos else []) + [3 + (ord(c) - 32) % 58 for c in text] + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(32 + i - 3) for i in ids if i >= 3)


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("prompt", [[1], [1, 7, 9, 30], list(range(3, 20))])
def test_greedy_cache_equals_recompute(prompt, quant):
    m = random_model(quant=quant)
    a = generate_ids(m, prompt, max_new_tokens=24)
    b = generate_ids(m, prompt, max_new_tokens=24, use_cache=False)
    assert a == b and len(a) == 24
    with torch.no_grad():  # and each token is the argmax of a full forward over the sequence so far
        seq = torch.tensor([prompt + a])
        logits = m(seq)[0, len(prompt) - 1:-1]
    assert logits.argmax(-1).tolist() == a


def test_left_padded_batch_equals_one_by_one():
    m = random_model(1)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 40], [1, 11, 12, 13]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batch = generate_ids(m, ids, max_new_tokens=12, attention_mask=mask)
    again = generate_ids(m, ids, max_new_tokens=12, attention_mask=mask, use_cache=False)
    single = [generate_ids(m, p, max_new_tokens=12) for p in prompts]
    assert batch == single == again


def test_sampling_seeded_and_top_p():
    m = random_model(2)
    a = generate_ids(m, [1, 4], 16, temperature=1.0, seed=123)
    b = generate_ids(m, [1, 4], 16, temperature=1.0, seed=123)
    c = generate_ids(m, [1, 4], 16, temperature=1.0, seed=124)
    assert a == b and a != c
    greedy = generate_ids(m, [1, 4], 16)
    assert generate_ids(m, [1, 4], 16, temperature=1.0, top_p=1e-6, seed=5) == greedy  # nucleus of one token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    frac = (draws == 0).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.03
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(m, [1], 2, temperature=1.0, top_p=0.0)


def test_generate_text_stop_and_eos():
    m = random_model(3)
    tok = CharTokenizer()
    ids = generate_ids(m, tok.encode("ab", bos=True), 30)
    full = tok.decode(ids)
    out = generate(m, tok, "ab", max_new_tokens=30)
    assert out == full
    stop = full[5:7]
    cut = generate(m, tok, "ab", max_new_tokens=30, stop=[stop, "zzzz-never"])
    assert cut == full[: full.find(stop)] and stop not in cut
    eos_at = ids[3]  # pretend the 4th generated token is EOS: generation stops there (EOS kept in the ids)
    assert generate_ids(m, tok.encode("ab", bos=True), 30, eos_id=eos_at) == ids[: ids.index(eos_at) + 1]
    batch = generate(m, tok, ["ab", "hello"], max_new_tokens=10)
    assert batch == [generate(m, tok, "ab", max_new_tokens=10), generate(m, tok, "hello", max_new_tokens=10)]
