"""Language-model stages (spec §8): RMSNorm, MLA expanded vs absorbed vs a naive per-head reference (with and
without q-LoRA), chunked prefill, attention-probability capture, and a real-width 2-layer synthetic checkpoint
(select with ``-m realwidth`` or ``-k real_width``)."""
import dataclasses
import os
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import GOLDEN, TINY

from pykimi.attention import MLAWeights, mla_decode, mla_prefill, rms_norm
from pykimi.cache import LatentCache
from pykimi.model import LM, decoder_layer, embed_and_merge, load
from pykimi.trace import Trace


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def test_rms_norm_matches_formula_and_eps_matters():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 32)) * 1e-3).astype(np.float32)   # small: eps is visible
    w = rng.standard_normal(32).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert np.abs(rms_norm(x, w, 1e-5) - rms_norm(x, w, 1e-6)).max() > 1e-3 * np.abs(ref).max()


# -- MLA against a naive reference ---------------------------------------------------------------------------
def random_mla(cfg, rng, scale=0.3):
    H, dn, dr, dv, R, D = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                           cfg.kv_lora_rank, cfg.hidden_size)

    def m(*s):
        return (rng.standard_normal(s) * scale / np.sqrt(s[-1])).astype(np.float32)

    kw = dict(kv_a_proj_with_mqa=m(R + dr, D), kv_a_layernorm=(1 + 0.1 * rng.standard_normal(R)).astype(np.float32),
              kv_b_proj=m(H * (dn + dv), R) * 4, o_proj=m(D, H * dv))
    if cfg.q_lora_rank:
        kw.update(q_a_proj=m(cfg.q_lora_rank, D), q_b_proj=m(H * (dn + dr), cfg.q_lora_rank) * 4,
                  q_a_layernorm=(1 + 0.1 * rng.standard_normal(cfg.q_lora_rank)).astype(np.float32))
    else:
        kw.update(q_proj=m(H * (dn + dr), D) * 4)
    return MLAWeights(**kw)


def naive_mla(x, w, cfg):
    """Per-head, per-query float64 loops: expanded keys/values, rotate-half on de-interleaved rope dims (the HF
    formulation, spec §8.3) -- an independent check of the interleaved in-place rotation."""
    x = x.astype(np.float64)
    S = x.shape[0]
    H, dn, dr, dv, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    f = lambda a: np.asarray(a, np.float64)

    def norm(v, g, eps):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * f(g)

    if cfg.q_lora_rank:
        q = norm(x @ f(w.q_a_proj).T, w.q_a_layernorm, 1e-6) @ f(w.q_b_proj).T
    else:
        q = x @ f(w.q_proj).T
    q = q.reshape(S, H, dn + dr)
    a = x @ f(w.kv_a_proj_with_mqa).T
    c = norm(a[:, :R], w.kv_a_layernorm, 1e-6)
    kv = (c @ f(w.kv_b_proj).T).reshape(S, H, dn + dv)
    inv = 1.0 / (np.float64(np.float32(cfg.rope_theta)) ** (np.arange(0, dr, 2) / dr))
    ang = np.arange(S)[:, None] * inv[None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)

    def rope(v):  # de-interleave (evens, odds), rotate-half
        v = np.concatenate([v[..., 0::2], v[..., 1::2]], -1)
        rot = np.concatenate([-v[..., dr // 2:], v[..., :dr // 2]], -1)
        return v * cos + rot * sin

    k_pe = rope(a[:, R:])
    out = np.zeros((S, H, dv))
    for h in range(H):
        qh = np.concatenate([q[:, h, :dn], rope(q[:, h, dn:])], -1)
        kh = np.concatenate([kv[:, h, :dn], k_pe], -1)
        s = qh @ kh.T / np.sqrt(dn + dr)
        s[np.triu(np.ones((S, S), bool), 1)] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, h] = p @ kv[:, h, dn:]
    return out.reshape(S, H * dv) @ f(w.o_proj).T


@pytest.mark.parametrize("q_lora", [None, 24], ids=["q_proj", "q_lora"])
def test_mla_expanded_and_absorbed_match_naive(tiny, q_lora):
    cfg = dataclasses.replace(tiny.config.text, q_lora_rank=q_lora)
    rng = np.random.default_rng(3)
    w = random_mla(cfg, rng)
    S = 9
    x = rng.standard_normal((S, cfg.hidden_size)).astype(np.float32)
    ref = naive_mla(x, w, cfg)
    tol = 2e-5 * np.abs(ref).max()

    c1 = LatentCache.for_config(cfg, capacity=S)
    out_prefill = mla_prefill(x, w, c1, 0, np.arange(S), cfg)
    np.testing.assert_allclose(out_prefill, ref, atol=tol, rtol=0)

    # absorbed form, whole block at once (causal mask inside) ...
    c2 = LatentCache.for_config(cfg, capacity=S)
    np.testing.assert_allclose(mla_decode(x, w, c2, 0, np.arange(S), cfg), ref, atol=tol, rtol=0)
    # ... and token by token over the latent cache (prefill 4, then decode 1 at a time)
    c3 = LatentCache.for_config(cfg, capacity=S)
    outs = [mla_prefill(x[:4], w, c3, 0, np.arange(4), cfg)]
    for s in range(4, S):
        outs.append(mla_decode(x[s:s + 1], w, c3, 0, np.array([s]), cfg))
    np.testing.assert_allclose(np.concatenate(outs), ref, atol=tol, rtol=0)
    np.testing.assert_allclose(c3.rows(0), c1.rows(0), rtol=0, atol=1e-6 * np.abs(c1.rows(0)).max())


@pytest.mark.parametrize("form", ["bf16", "q8", "q4"])
@pytest.mark.parametrize("kernel_backend", ["c", "numpy"])
def test_absorbed_decode_reads_stored_kv_b(tiny, form, kernel_backend):
    """The absorbed decode on a stored (bf16 / quantized) kv_b_proj through the kernels (heads_vecmat for
    q_nope · W_uk, heads_matvec for W_uv · o_lat, on the row blocks of the stored tensor) equals the same decode
    with kv_b_proj widened to an f32 copy (kv_b_f32, the form checked against the naive loops above)."""
    import pykimi.kernels as K
    from pykimi.quant import quantize_q4, quantize_q8
    from pykimi.weights import Stored, f32_to_bf16
    if not K.backends()[kernel_backend]["available"]:
        pytest.skip(f"backend {kernel_backend} not available")
    cfg = tiny.config.text
    rng = np.random.default_rng(5)
    w = random_mla(cfg, rng)
    kvb = w.kv_b_proj
    stored = {"bf16": lambda: Stored("kv_b", "BF16", f32_to_bf16(kvb)), "q8": lambda: quantize_q8(kvb, "kv_b"),
              "q4": lambda: quantize_q4(kvb, "kv_b")}[form]()
    w_st = dataclasses.replace(w, kv_b_proj=stored)
    w_f32 = dataclasses.replace(w, kv_b_proj=stored, kv_b_f32=stored.f32())
    S = 7
    x = rng.standard_normal((S, cfg.hidden_size)).astype(np.float32)
    prev, prev_act = K.backend(), K.act_quant()
    K.set_backend(kernel_backend)
    K.set_act_quant("none")   # float activations: the stored-form path must equal the f32 copy to rounding
    try:
        outs = {}
        for name, wt in (("stored", w_st), ("f32", w_f32)):
            c = LatentCache.for_config(cfg, capacity=S)
            rows = [mla_decode(x[:3], wt, c, 0, np.arange(3), cfg)]           # a block (S > 1) ...
            for s in range(3, S):                                             # ... then one token at a time
                rows.append(mla_decode(x[s:s + 1], wt, c, 0, np.array([s]), cfg))
            outs[name] = np.concatenate(rows)
    finally:
        K.set_backend(prev)
        K.set_act_quant(prev_act)
    err = np.abs(outs["stored"] - outs["f32"]).max() / np.abs(outs["f32"]).max()
    assert err < 2e-5, f"{form} on {kernel_backend}: stored-form absorbed decode differs from the f32 copy by {err:.2e}"


def test_blocked_keys_online_softmax_equals_one_block(tiny):
    cfg = tiny.config.text
    rng = np.random.default_rng(5)
    w = random_mla(cfg, rng)
    x = rng.standard_normal((11, cfg.hidden_size)).astype(np.float32)
    c1, c2 = LatentCache.for_config(cfg, 16), LatentCache.for_config(cfg, 16)
    one = np.concatenate([mla_prefill(x[:6], w, c1, 0, np.arange(6), cfg),
                          mla_prefill(x[6:], w, c1, 0, np.arange(6, 11), cfg)])
    blk = np.concatenate([mla_prefill(x[:6], w, c2, 0, np.arange(6), cfg, key_block=4),
                          mla_prefill(x[6:], w, c2, 0, np.arange(6, 11), cfg, key_block=3)])
    np.testing.assert_allclose(blk, one, rtol=0, atol=2e-6 * np.abs(one).max())
    np.testing.assert_allclose(one, naive_mla(x, w, cfg), rtol=0, atol=2e-5 * np.abs(one).max())


def test_query_blocks_equal_one_block(tiny):
    """mla_prefill's query blocks (each against the keys up to its last position) == all queries in one block,
    with and without a cached prefix, with one key block and with the online softmax over several (query blocks
    that see none of a key block skip it); and the blocks really skip the future: a block of queries never reads
    a key past its last position (the last token's NaN key and value reach only its own row; in one block of all
    queries its masked NaN value reaches every row through 0 x NaN)."""
    cfg = tiny.config.text
    rng = np.random.default_rng(8)
    w = random_mla(cfg, rng)
    S = 13
    x = rng.standard_normal((S, cfg.hidden_size)).astype(np.float32)
    for key_block in (4096, 5, 3):
        c0 = LatentCache.for_config(cfg, 32)
        ref = np.concatenate([mla_prefill(x[:4], w, c0, 0, np.arange(4), cfg, key_block=key_block, query_block=4),
                              mla_prefill(x[4:], w, c0, 0, np.arange(4, S), cfg, key_block=key_block,
                                          query_block=S)])
        for qb in (1, 2, 3, 5, 8):
            c = LatentCache.for_config(cfg, 32)
            got = np.concatenate([mla_prefill(x[:4], w, c, 0, np.arange(4), cfg, key_block=key_block,
                                              query_block=qb),
                                  mla_prefill(x[4:], w, c, 0, np.arange(4, S), cfg, key_block=key_block,
                                              query_block=qb)])
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err < 2e-6, f"key_block {key_block}, query_block {qb}: {err:.2e} from one block"
    xn = x.copy()
    xn[-1] = np.nan                                                      # the last token's key and value are NaN
    for key_block in (4096, 5):
        blocked = mla_prefill(xn, w, LatentCache.for_config(cfg, 32), 0, np.arange(S), cfg, key_block=key_block,
                              query_block=4)
        assert np.isfinite(blocked[:-1]).all() and np.isnan(blocked[-1]).all(), \
            f"key_block {key_block}: a block of queries read a key in its future"
    whole = mla_prefill(xn, w, LatentCache.for_config(cfg, 32), 0, np.arange(S), cfg, query_block=S)
    assert np.isnan(whole).all()                                         # one block: 0 x NaN in p @ v everywhere


@pytest.mark.parametrize("kernel_backend", ["c", "numpy"])
def test_bf16_cache_every_mla_path_agrees(tiny, kernel_backend):
    """With a bf16 latent cache every MLA path reads the same rounded rows: prefill (one key block and blocked),
    the absorbed decode of a block (step by step) and token by token (the fused kernel) agree to f32 rounding;
    the rows are bf16 bits; against the f32 naive form they differ by a bf16-sized amount (not more)."""
    import pykimi.kernels as K
    if not K.backends()[kernel_backend]["available"]:
        pytest.skip(f"backend {kernel_backend} not available")
    cfg = tiny.config.text
    rng = np.random.default_rng(6)
    w = random_mla(cfg, rng)
    S = 11
    x = rng.standard_normal((S, cfg.hidden_size)).astype(np.float32)
    prev = K.backend()
    K.set_backend(kernel_backend)
    try:
        caches = [LatentCache.for_config(cfg, capacity=S, dtype="bf16") for _ in range(4)]
        outs = {"prefill": mla_prefill(x, w, caches[0], 0, np.arange(S), cfg),
                "blocked": np.concatenate([mla_prefill(x[:6], w, caches[1], 0, np.arange(6), cfg, key_block=4),
                                           mla_prefill(x[6:], w, caches[1], 0, np.arange(6, S), cfg, key_block=3)]),
                "absorbed block": mla_decode(x, w, caches[2], 0, np.arange(S), cfg),
                "token by token": np.concatenate([mla_prefill(x[:4], w, caches[3], 0, np.arange(4), cfg)] + [
                    mla_decode(x[s:s + 1], w, caches[3], 0, np.array([s]), cfg) for s in range(4, S)])}
    finally:
        K.set_backend(prev)
    ref = outs["prefill"]
    for name, o in outs.items():
        err = np.abs(o - ref).max() / np.abs(ref).max()
        assert err < 2e-5, f"{kernel_backend} bf16 cache: {name} differs from prefill by {err:.2e}"
    for c in caches:
        assert c.rows(0).dtype == np.uint16
        assert np.abs(c.rows(0).astype(np.int32) - caches[0].rows(0).astype(np.int32)).max() <= 1
    err = np.abs(ref - naive_mla(x, w, cfg)).max() / np.abs(ref).max()
    assert 1e-6 < err < 2.0 ** -7, f"{kernel_backend} bf16 cache vs the f32 naive form: {err:.2e}"


def test_chunked_prefill_equals_single_pass(tiny):
    ids = load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"]
    full = tiny.forward(ids)
    chunked = load(TINY, prefill_chunk=7)
    out = chunked.forward(ids)
    assert out.shape == full.shape
    assert np.abs(out - full).max() / np.abs(full).max() < 2e-6
    c = chunked.new_cache(capacity=ids.size)
    last = chunked.prefill(chunked.embed(ids), c, all_logits=False)
    assert len(c) == ids.size
    np.testing.assert_allclose(last, full[-1], atol=2e-6 * np.abs(full).max())


def test_attn_probs_only_when_wanted(tiny):
    ids = np.arange(6)
    with Trace(tiny) as t:
        tiny.forward(ids)
    assert not any(k.endswith(".attn_probs") for k in t)
    name = f"{LM}.layers.1.self_attn"
    with Trace(tiny, names=["none"], attn_probs=[name]) as t:
        tiny.forward(ids)
    assert list(t) == [f"{name}.attn_probs"]
    p = t[f"{name}.attn_probs"]                                        # [H, S, N]
    assert p.shape == (4, 6, 6)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert np.all(p[:, np.triu(np.ones((6, 6), bool), 1)] == 0)         # causal


def test_stage_functions_run_by_hand(tiny):
    """The debugging API: layer 1 run by hand from the traced input of that layer reproduces its output."""
    ids = load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"][:12]
    with Trace(tiny) as t:
        tiny.forward(ids)
    x0 = embed_and_merge(ids, tiny.embed_table(), None, tiny.config.media_placeholder_token_id)
    np.testing.assert_array_equal(x0, t["inputs_embeds"])
    cache = tiny.new_cache(capacity=12)
    cfg = tiny.config.text
    x = decoder_layer(x0, tiny.layer_weights(0), cache, np.arange(12), cfg, 0)
    x = decoder_layer(x, tiny.layer_weights(1), cache, np.arange(12), cfg, 1)
    np.testing.assert_allclose(x, t[f"{LM}.layers.1"], rtol=0, atol=1e-6)


# -- real widths, 2 layers ------------------------------------------------------------------------------------
def _write_fast_checkpoint(out_dir, config):
    """A full-width random checkpoint written fast: small tensors fully random, large ones (embedding, lm_head,
    experts, dense FFN) tiled from one random bf16 block rolled per tensor -- plenty for shapes and memory
    checks, and ~2.6 GB of plain writes instead of 1.3 G random draws."""
    import json
    import zlib
    from pykimi.config import KimiVLConfig
    from pykimi.layout import expected_tensors, stored_dtype
    from pykimi.testing import random_tensor_f32
    from pykimi.weights import f32_to_bf16

    cfg = KimiVLConfig.from_dict(config)
    entries = [(n, tuple(s), stored_dtype(n, "BF16")) for n, s in expected_tensors(cfg)]
    header, off = {}, 0
    for n, s, d in entries:
        nb = int(np.prod(s)) * (4 if d == "F32" else 2)
        header[n] = {"dtype": d, "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    block = f32_to_bf16(random_tensor_f32("tiled.block", (1 << 20,), 0))
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little") + hb)
        for n, s, d in entries:
            size = int(np.prod(s))
            if n.endswith(".inv_freq"):
                data = np.zeros(size, np.uint16)                   # never read (spec §3)
            elif size <= block.size:
                x = random_tensor_f32(n, s, 0).reshape(-1)
                data = x if d == "F32" else f32_to_bf16(x)
            else:
                b = np.roll(block, zlib.crc32(n.encode()) % block.size).tobytes()
                full, rest = divmod(size, block.size)
                for _ in range(full):
                    fh.write(b)
                fh.write(b[: 2 * rest])
                continue
            fh.write(np.ascontiguousarray(data).tobytes())
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    return out_dir


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    from pykimi.testing import reference_config
    cfg = reference_config(num_hidden_layers=2)
    # the vision tower does not matter here: keep it tiny so the checkpoint writes fast
    cfg["vision_config"].update(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                init_pos_emb_height=4, init_pos_emb_width=4)
    return _write_fast_checkpoint(str(tmp_path_factory.mktemp("realwidth")), cfg)


def _bounded_matmul(x, w, tile_elems=1 << 16):
    """x @ W.T widening at most ``tile_elems`` weight elements at a time (256 KB): keeps the kernel's own
    temporaries out of the allocation measurement below."""
    from pykimi.weights import Stored
    x = np.asarray(x, np.float32)
    if isinstance(w, np.ndarray):
        return x @ w.T
    out_rows, in_dim = w.shape
    step = max(1, tile_elems // in_dim)
    out = np.empty(x.shape[:-1] + (out_rows,), np.float32)
    for r0 in range(0, out_rows, step):
        r1 = min(out_rows, r0 + step)
        out[..., r0:r1] = x @ Stored(w.name, w.dtype, w.data[r0:r1]).f32().T
    return out


@pytest.mark.realwidth
def test_real_width_shapes_and_decode_memory(real_width_dir, monkeypatch):
    import pykimi.kernels as kernels
    model = load(real_width_dir)
    t = model.config.text
    assert (t.hidden_size, t.n_routed_experts, t.vocab_size, t.num_hidden_layers) == (2048, 64, 163840, 2)
    ids = np.array([163584, 100, 2000, 30000, 163601])
    with Trace(model, names=[f"{LM}.layers.*", "logits"]) as tr:
        logits = model.forward(ids)
    assert logits.shape == (5, 163840) and logits.dtype == np.float32 and np.all(np.isfinite(logits))
    assert tr[f"{LM}.layers.0"].shape == (5, 2048) and tr[f"{LM}.layers.1.self_attn"].shape == (5, 2048)
    assert tr[f"{LM}.layers.1.mlp.topk_ids"].shape == (5, 6)
    assert tr[f"{LM}.layers.1.mlp.gate.router_logits"].shape == (5, 64)
    np.testing.assert_allclose(tr[f"{LM}.layers.1.mlp.topk_weights"].sum(-1), 2.446, rtol=1e-5)

    cache = model.new_cache(capacity=8)
    assert cache.bytes_per_token() == 2 * 576 * 4
    first = model.prefill(model.embed(ids), cache, all_logits=False)
    np.testing.assert_allclose(first, logits[-1], atol=2e-5 * np.abs(logits[-1]).max())
    tok = int(np.argmax(first))
    model.decode_step(tok, cache)                                    # warm-up: per-layer kv_b cache filled

    monkeypatch.setattr(kernels, "matmul", _bounded_matmul)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        row = model.decode_step(tok, cache)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    V = t.vocab_size
    print(f"decode peak {peak} bytes, logits row {V * 4}")
    assert row.shape == (V,)
    # the logits row (V × 4 bytes = 640 KB) plus bounded working memory (weight tiles, the 64×2048 router,
    # activations); a second vocabulary-sized float32 temporary would add another 640 KB and fail this
    assert peak < V * 4 + 600_000, f"decode step allocated {peak} bytes at peak (logits row = {V * 4})"
