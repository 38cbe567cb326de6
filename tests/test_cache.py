"""Latent KV cache (spec §8.3): layout, size formula, growth, limits."""
import numpy as np
import pytest

from conftest import TINY

from pykimi.cache import LatentCache
from pykimi.config import KimiVLConfig
from pykimi.errors import InputError
from pykimi.model import load
from pykimi.testing import reference_config


def test_bytes_per_token_formula_real_config():
    t = KimiVLConfig.from_dict(reference_config()).text
    c = LatentCache.for_config(t, capacity=4)
    # 27 layers × (512 latent + 64 rope) × 4 bytes: 576 floats per layer per token, not 16 × (192 + 128)
    assert c.width == 576
    assert c.bytes_per_token() == 27 * 576 * 4 == 62208
    assert c.bytes_per_token() < 27 * 16 * (192 + 128) * 4 / 8


def test_bytes_per_token_tiny_and_allocation_matches():
    m = load(TINY)
    t = m.config.text
    c = m.new_cache(capacity=10)
    assert c.bytes_per_token() == t.num_hidden_layers * (t.kv_lora_rank + t.qk_rope_head_dim) * 4 == 480
    assert c.nbytes() == 10 * c.bytes_per_token()


def test_append_views_and_growth():
    c = LatentCache(2, 4, 2, capacity=2)
    a, k = c.append(0, np.ones((3, 4), np.float32), np.full((3, 2), 2, np.float32))   # grows past capacity
    assert a.shape == (3, 4) and k.shape == (3, 2) and c.capacity >= 3
    assert c.seq_len(0) == 3 and c.seq_len(1) == 0
    c.append(1, np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32))
    a, k = c.append(0, np.full((1, 4), 5, np.float32), np.full((1, 2), 6, np.float32))
    assert a.shape == (4, 4) and a[-1, 0] == 5 and a[0, 0] == 1 and k[-1, 0] == 6 and k[0, 0] == 2
    np.testing.assert_array_equal(c.rows(0)[:, :4], a)          # one row = [latent | k_pe]
    c.truncate(2)
    assert len(c) == 2 and c.seq_len(1) == 2


def test_reserve_limit_is_input_error():
    c = LatentCache(1, 4, 2, capacity=4, max_len=5)
    c.append(0, np.zeros((5, 4), np.float32), np.zeros((5, 2), np.float32))
    with pytest.raises(InputError, match="exceeds the KV cache limit of 5"):
        c.append(0, np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32))


def test_generate_preallocates_and_cache_holds_prompt_plus_new():
    m = load(TINY)
    seen = {}
    orig = m.new_cache

    def spy(capacity=256):
        c = orig(capacity)
        seen["c"] = c
        seen["cap"] = c.capacity
        return c

    m.new_cache = spy
    m.generate(np.arange(10), max_new_tokens=5, stop_ids=[])
    c = seen["c"]
    assert seen["cap"] == 15 and c.capacity == 15                # sized once, never grown during decode
    assert len(c) == 14                                           # the last token is not fed back
