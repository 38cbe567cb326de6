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

    def spy(capacity=256, dtype=None):
        c = orig(capacity, dtype)
        seen["c"] = c
        seen["cap"] = c.capacity
        return c

    m.new_cache = spy
    m.generate(np.arange(10), max_new_tokens=5, stop_ids=[])
    c = seen["c"]
    assert seen["cap"] == 15 and c.capacity == 15                # sized once, never grown during decode
    assert len(c) == 14                                           # the last token is not fed back


# -- bf16 cache (--cache-dtype bf16) ------------------------------------------------------------------------

def test_bf16_cache_halves_bytes_and_stores_rounded_bits():
    from pykimi.weights import bf16_to_f32, f32_to_bf16
    t = KimiVLConfig.from_dict(reference_config()).text
    assert LatentCache.for_config(t, capacity=1, dtype="bf16").bytes_per_token() == 27 * 576 * 2 == 31104
    rng = np.random.default_rng(0)
    c = LatentCache(2, 4, 2, capacity=2, dtype="bf16")
    assert c.cache_dtype == "bf16" and c.dtype == np.uint16 and c.nbytes() == 2 * 2 * 6 * 2
    lat, kpe = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    a, k = c.append(0, lat, kpe)                                   # grows past capacity, keeps the bits
    c.append(0, lat[:1] * 2, kpe[:1] * 2)
    np.testing.assert_array_equal(c.rows(0)[:3, :4], f32_to_bf16(lat))   # round to nearest even, as weights
    np.testing.assert_array_equal(c.rows(0)[3, 4:], f32_to_bf16(kpe[0] * 2))
    assert a.dtype == np.float32 and c.latent(0).dtype == np.float32
    np.testing.assert_array_equal(c.rows_f32(0, 1, 3), bf16_to_f32(c.rows(0)[1:3]))   # exact widening
    np.testing.assert_array_equal(c.k_pe(0), bf16_to_f32(c.rows(0)[:, 4:]))
    err = np.abs(c.latent(0)[:3] - lat) / np.abs(lat)
    assert 0 < err.max() <= 2.0 ** -8                              # bf16: 8 significant bits, half a step
    f = LatentCache(2, 4, 2, capacity=2)
    f.append(0, lat, kpe)
    assert f.rows_f32(0).base is not None and f.dtype == np.float32   # an f32 cache hands out views


@pytest.mark.parametrize("bad", ["f16", "int8", np.float16, ""])
def test_bad_cache_dtype_is_one_line_input_error(bad):
    with pytest.raises(InputError, match="expected one of f32, bf16"):
        LatentCache(1, 4, 2, dtype=bad)
    with pytest.raises(InputError, match="expected one of f32, bf16"):
        load(TINY, cache_dtype=bad)


def test_model_cache_dtype_is_the_default_of_new_cache_and_generate():
    m = load(TINY, cache_dtype="bf16")
    assert m.new_cache(4).cache_dtype == "bf16" and m.new_cache(4, dtype="f32").cache_dtype == "f32"
    ids = np.arange(12)
    bf = m.generate(ids, max_new_tokens=6, stop_ids=[])
    assert m.last_stats["cache_bytes"] == 18 * m.new_cache(1).bytes_per_token()
    f32 = load(TINY).generate(ids, max_new_tokens=6, stop_ids=[], cache_dtype="f32")
    assert load(TINY).generate(ids, max_new_tokens=6, stop_ids=[], cache_dtype="bf16") == bf
    assert bf == f32                     # this prompt's greedy ids do not move (margins >> the bf16 error)


def test_next_rows_and_commit_rows_are_next_row_and_commit_of_every_layer():
    """next_rows / commit_rows (the serve engine's batched step) == next_row / commit layer by layer, growth
    included; commit_rows refuses a row past the capacity."""
    a, b = LatentCache(3, 4, 2, capacity=2, max_len=9), LatentCache(3, 4, 2, capacity=2, max_len=9)
    rng = np.random.default_rng(0)
    for step in range(5):
        bufs, ns = a.next_rows()
        for layer in range(3):
            rows, n = b.next_row(layer)
            assert n == ns[layer] and rows.shape == bufs[layer].shape and bufs[layer] is a._rows[layer]
            v = rng.standard_normal(6).astype(np.float32)
            rows[n], bufs[layer][n] = v, v
            b.commit(layer)
        a.commit_rows()
        assert len(a) == len(b) == step + 1 and a.capacity == b.capacity
        for layer in range(3):
            np.testing.assert_array_equal(a.rows(layer), b.rows(layer))
    c = LatentCache(2, 4, 2, capacity=1)
    c.commit_rows()
    with pytest.raises(InputError, match="past its capacity"):
        c.commit_rows()
