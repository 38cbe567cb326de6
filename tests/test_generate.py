"""Generation: greedy ties, sampling filters on crafted logits, seeds, streaming, stop ids, input errors."""
import json
import os
import shutil
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import GOLDEN, TINY

from pykimi.errors import InputError
from pykimi.generate import (apply_repetition_penalty, default_stop_ids, filter_probs, greedy, pick_token,
                             sample)
from pykimi.model import load


@pytest.fixture(scope="module")
def model():
    return load(TINY)


@pytest.fixture(scope="module")
def prompt():
    return load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"]


# -- pure functions on crafted logits ----------------------------------------------------------------------
def test_greedy_first_index_on_ties():
    assert greedy(np.array([1.0, 3.0, 3.0, 2.0], np.float32)) == 1
    assert pick_token(np.array([0.0, 5.0, 5.0]), None, temperature=0.0) == 1


def test_top_k_keeps_k_best_lowest_id_on_ties():
    lg = np.array([1.0, 4.0, 3.0, 4.0, 0.0, 3.0], np.float32)
    ids, p = filter_probs(lg, 1.0, top_k=3)
    assert ids.tolist() == [1, 3, 2]                             # 4, 4, then the lower-id 3
    e = np.exp(np.array([4.0, 4.0, 3.0]) - 4)
    np.testing.assert_allclose(p, e / e.sum())


def test_top_p_smallest_prefix_reaching_mass():
    p0 = np.array([0.5, 0.3, 0.15, 0.05])
    lg = np.log(p0).astype(np.float32)
    assert filter_probs(lg, 1.0, top_p=0.5)[0].tolist() == [0]
    assert filter_probs(lg, 1.0, top_p=0.7)[0].tolist() == [0, 1]
    assert filter_probs(lg, 1.0, top_p=0.95)[0].tolist() == [0, 1, 2]
    ids, p = filter_probs(lg, 1.0, top_p=0.85)
    np.testing.assert_allclose(p, p0[:3] / p0[:3].sum(), rtol=1e-6)


def test_min_p_relative_to_max():
    p0 = np.array([0.5, 0.3, 0.15, 0.05])
    lg = np.log(p0).astype(np.float32)
    assert filter_probs(lg, 1.0, min_p=0.5)[0].tolist() == [0, 1]      # keeps p >= 0.25
    assert filter_probs(lg, 1.0, min_p=0.09)[0].tolist() == [0, 1, 2, 3]


def test_temperature_sharpens():
    lg = np.array([1.0, 2.0], np.float32)
    _, p1 = filter_probs(lg, 1.0)
    _, p2 = filter_probs(lg, 0.5)
    assert p2[0] > p1[0] and p1[0] == pytest.approx(1 / (1 + np.e ** -1))


def test_repetition_penalty_hf_rule():
    lg = np.array([2.0, -2.0, 1.0, 3.0], np.float32)
    out = apply_repetition_penalty(lg.copy(), np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 3.0]
    assert apply_repetition_penalty(lg.copy(), np.array([0]), 1.0).tolist() == lg.tolist()


def test_sample_distribution_and_seed():
    lg = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    rng = np.random.default_rng(0)
    draws = [sample(lg, rng, 1.0) for _ in range(3000)]
    freq = np.bincount(draws, minlength=3) / 3000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.04)
    a = [sample(lg, np.random.default_rng(7), 1.0) for _ in range(5)]
    b = [sample(lg, np.random.default_rng(7), 1.0) for _ in range(5)]
    assert a == b
    assert sample(lg, np.random.default_rng(0), 1.0, top_k=1) == 0


# -- on the tiny model ---------------------------------------------------------------------------------------
def test_same_seed_same_tokens(model, prompt):
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.1,
              stop_ids=[])
    a = model.generate(prompt, seed=123, **kw)
    b = model.generate(prompt, seed=123, **kw)
    c = [model.generate(prompt, seed=s, **kw) for s in (1, 2, 3)]
    assert a == b and len(a) == 6
    assert any(x != a for x in c)                                  # sampling actually samples


def test_stream_yields_same_ids(model, prompt):
    it = model.generate(prompt, max_new_tokens=5, stream=True, stop_ids=[])
    assert isinstance(it, types.GeneratorType)
    assert list(it) == model.generate(prompt, max_new_tokens=5, stop_ids=[])
    st = model.last_stats
    assert st["prompt_tokens"] == prompt.size and st["new_tokens"] == 5 and st["prefill_s"] > 0


def test_stops_on_stop_id_and_includes_it(model, prompt):
    full = model.generate(prompt, max_new_tokens=6, stop_ids=[])
    assert model.generate(prompt, max_new_tokens=6, stop_ids=[full[2]]) == full[: full.index(full[2]) + 1]
    assert model.generate(prompt, max_new_tokens=0) == []


def test_default_stop_ids_eos_and_im_end(model, tmp_path):
    # tiny layout keeps the real offsets: [EOS] 257, <|im_end|> 258 (= eos + 1)
    assert default_stop_ids(model) == [257, 258]
    assert model.stop_ids == [257, 258]
    # a tokenizer_config.json naming <|im_end|> wins
    d = tmp_path / "ck"
    shutil.copytree(TINY, d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"300": {"content": "<|im_end|>", "special": True}}}))
    assert default_stop_ids(load(str(d))) == [257, 300]


def test_default_stop_ids_real_layout():
    fake = types.SimpleNamespace(text=types.SimpleNamespace(eos_token_id=163585, vocab_size=163840),
                                 ckpt=types.SimpleNamespace(path=None))
    assert default_stop_ids(fake) == [163585, 163586]


def test_context_limit_errors(model):
    lim_model = load(TINY, max_context=20)
    with pytest.raises(InputError, match="context limit of 20"):
        lim_model.forward(np.arange(21))
    with pytest.raises(InputError, match="max_new_tokens"):
        lim_model.generate(np.arange(15), max_new_tokens=10)
    with pytest.raises(InputError, match="max_position_embeddings"):
        model.forward(np.zeros(4097, np.int64))
    with pytest.raises(InputError):
        load(TINY, max_context=10 ** 6)


def test_bad_options_and_ids(model):
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(min_p=2.0),
               dict(repetition_penalty=0.0), dict(max_new_tokens=-1)):
        with pytest.raises(InputError):
            model.generate([1, 2, 3], **kw)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate([1, 2, 512])
    with pytest.raises(InputError):
        model.forward([])
    with pytest.raises(InputError):                               # raised at call time even when streaming
        model.generate([1, 2, 512], stream=True)


def test_placeholder_mismatch_is_one_line_input_error(model):
    ids = np.array([1, 277, 277, 2])
    with pytest.raises(InputError) as e:
        model.forward(ids, image_features=np.zeros((3, 64), np.float32))
    assert "\n" not in str(e.value) and "2 image placeholder" in str(e.value)
    with pytest.raises(InputError):
        model.forward(ids)                                         # placeholders but no images
