"""The serving engine (issue 20): batched decode == single decode bit for bit, greedy tokens identical alone
and beside others, cancellation, cache budget, queue limit, image / prefix reuse, sampling options."""
import os
import time

import numpy as np
import pytest

import pykimi
from pykimi import kernels, scenes
from pykimi.engine import Engine, EngineStopped, QueueFull, SamplingParams, batched_available, decode_batch
from pykimi.errors import InputError

from conftest import TINY

TIMEOUT = 120


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    """int8 and int4 copies (every weight quantized) of the demo and the tiny golden checkpoint."""
    from pykimi.quant import quantize_checkpoint
    root = tmp_path_factory.mktemp("engine_q")
    out = {}
    for name, src in (("demo", pykimi.demo_checkpoint()), ("tiny", TINY)):
        for bits in (8, 4):
            dst = root / f"{name}{bits}"
            quantize_checkpoint(src, str(dst), bits=bits, what="all", progress=False)
            out[f"{name}{bits}"] = str(dst)
    return out


def _path(which, quant_dirs):
    return {"demo": pykimi.demo_checkpoint(), "tiny": TINY}.get(which) or quant_dirs[which]


def _ids(m, rng, n):
    """n random token ids, never the image placeholder."""
    pool = np.setdiff1d(np.arange(min(m.text.vocab_size, 400)), [m.config.media_placeholder_token_id])
    return rng.choice(pool, size=int(n))


def _prefilled(m, rng, count: int, n: int) -> list:
    """count caches (capacity 32), each holding a prompt of n random ids."""
    caches = []
    for _ in range(count):
        c = m.new_cache(capacity=32)
        m.prefill(m.embed(_ids(m, rng, n)), c, all_logits=False)
        caches.append(c)
    return caches


CHECKPOINTS = ["demo", "tiny", "demo8", "demo4", "tiny8", "tiny4"]


@pytest.mark.parametrize("which,mode", [(w, "q4") for w in CHECKPOINTS] +
                         [(w, "all") for w in ("demo", "demo8", "tiny4")])
def test_decode_batch_rows_equal_single_decode(which, mode, quant_dirs, act_mode):
    """Each row of a batched step (B = 1..14, changing between steps) is bit-identical to decode_step alone, in the
    default activation mode and in "all" (where batches of 8 rows or more would take the bf16-activation and
    VNNI batch kernels: the row-wise calls must not)."""
    act_mode(mode)
    m = pykimi.load(_path(which, quant_dirs))
    V = m.text.vocab_size
    rng = np.random.default_rng(1)
    B = 14                                         # > every batch kernel's first row count (8, 12, 24)
    prompts = [_ids(m, rng, rng.integers(3, 30)) for _ in range(B)]

    def caches():
        out = []
        for p in prompts:
            c = m.new_cache(capacity=64)
            m.prefill(m.embed(p), c, all_logits=False)
            out.append(c)
        return out

    alone, batched = caches(), caches()
    for step, n in enumerate([14, 1, 5, 8, 12, 2, 13]):
        toks = [int(t) for t in _ids(m, rng, B)]
        stats = {}
        got = decode_batch(m, toks[:n], batched[:n], stats)
        for b in range(n):
            ref = m.decode_step(toks[b], alone[b])
            diff = np.flatnonzero(ref != got[b])
            assert diff.size == 0, (f"{which} step {step} batch {n} row {b}: {diff.size} logits differ, first at "
                                    f"{diff[0]}: {got[b][diff[0]]!r} vs alone {ref[diff[0]]!r}")
        for b in range(n, B):                      # the others advance alone in both
            m.decode_step(toks[b], alone[b])
            m.decode_step(toks[b], batched[b])
        if batched_available(m):
            assert stats["bytes_read"] > 0 and len(stats["experts_per_layer"]) == m.text.num_hidden_layers - 1
    if kernels.backend() == "c":
        assert batched_available(m), "the C backend should take the batched path"


@pytest.mark.parametrize("which", ["demo", "tiny4"])
def test_one_sequence_step_is_the_single_step_with_the_same_reads(which, quant_dirs):
    """decode_batch of one sequence runs model.decode_step (the fused layer stack): its logits == the batched
    path's for that row, bit for bit, and its stats (counted without the routing: k experts a layer) == the
    batched path's (counted from the routing)."""
    m = pykimi.load(_path(which, quant_dirs))
    if not batched_available(m):
        pytest.skip("the batched path needs the C backend")
    rng = np.random.default_rng(5)
    p = _ids(m, rng, 9)
    a, b = m.new_cache(capacity=32), m.new_cache(capacity=32)
    for c in (a, b):
        m.prefill(m.embed(p), c, all_logits=False)
    for step in range(3):
        t = [int(_ids(m, rng, 1)[0])]
        sa, sb = {}, {}
        la = decode_batch(m, t, [a], sa)
        lb = decode_batch(m, t, [b], sb, single_fused=False)
        np.testing.assert_array_equal(la, lb, err_msg=f"{which} step {step}")
        assert sa == sb, f"{which} step {step}: {sa} vs {sb}"


@pytest.mark.parametrize("which", ["demo", "tiny", "demo4"])
@pytest.mark.parametrize("cache_dtype", ["bf16", "f32"])
@pytest.mark.parametrize("long", [False, True])
def test_mla_batch_equals_single_fused_calls_per_cache_dtype(which, cache_dtype, long, quant_dirs):
    """pk_mla_absorbed_batch (engine._mla_batch) on B caches of either dtype == the single fused call per
    sequence, bit for bit: the output and the row it writes (the same q / kva go to both, so only the attention
    kernel is compared; a bf16 cache holds bf16 bits). long: caches of up to 2,000 rows, whose splits hold
    several chunks of rows each (the one-pass attention's online softmax), beside short ones."""
    from pykimi.attention import _inv_freq, mla_absorbed
    from pykimi.engine import _mla_batch
    if kernels.backend() != "c":
        pytest.skip("the batched attention is a C kernel")
    m = pykimi.load(_path(which, quant_dirs), cache_dtype=cache_dtype)
    t = m.text
    H, dn, dr, dv, R = t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.kv_lora_rank
    rng = np.random.default_rng(3)
    B, layer = 5, 1
    lens = [2000, 7, 1100, 0, 1500] if long else [int(n) for n in rng.integers(0, 40, B)]
    alone, batched = [], []
    for n in lens:                              # two caches holding the same rows
        c, d = m.new_cache(capacity=max(lens) + 8), m.new_cache(capacity=max(lens) + 8)
        for ly in range(t.num_hidden_layers):
            lat, kpe = rng.standard_normal((n, R)).astype(np.float32), rng.standard_normal((n, dr)).astype(np.float32)
            c.write(ly, lat, kpe)
            d.write(ly, lat, kpe)
        alone.append(c)
        batched.append(d)
    assert all(c.rows(layer).dtype == (np.uint16 if cache_dtype == "bf16" else np.float32) for c in batched)
    a = m.layer_weights(layer).attn
    q = rng.standard_normal((B, H * (dn + dr))).astype(np.float32)
    kva = rng.standard_normal((B, R + dr)).astype(np.float32)
    inv = _inv_freq(dr, float(t.rope_theta))
    got = _mla_batch(q, kva, a, t, inv, batched, layer, t.qk_head_dim ** -0.5, (H, dn, dr, dv, R))
    assert got is not None, "the batched kernel declined these caches"
    for b, c in enumerate(alone):
        rows, n = c.next_row(layer)
        ref = kernels.fast(mla_absorbed)(q[b], kva[b], a.kv_a_layernorm, t.kv_a_layernorm_eps, inv, n, rows, n,
                                         a.kv_b_proj, t.qk_head_dim ** -0.5, (H, dn, dr, dv, R))
        c.commit(layer)
        np.testing.assert_array_equal(got[b], ref, err_msg=f"{which} {cache_dtype} sequence {b} (n={n})")
        np.testing.assert_array_equal(batched[b].rows(layer), c.rows(layer), err_msg=f"{which} {cache_dtype} rows {b}")


@pytest.mark.parametrize("which", ["demo8", "demo4", "tiny8", "tiny4"])
@pytest.mark.parametrize("mode", ["q4", "all"])
def test_mla_batch_equals_single_at_every_batch_size_and_level(which, mode, quant_dirs, act_mode):
    """pk_mla_absorbed_batch == the single fused call bit for bit at B = 1..10 and every SIMD level, on a
    quantized kv_b_proj in both activation modes: each head's W_uk rows are decoded once for a group of up to 8
    sequences (register-blocked by 64 or 32 columns; demo R = 64, tiny R = 32) and W_uv runs one job of B rows per
    head (the row kernels), which must give each sequence what it gets alone."""
    from pykimi.attention import _inv_freq, mla_absorbed
    from pykimi.engine import _mla_batch
    if kernels.backend() != "c":
        pytest.skip("the batched attention is a C kernel")
    from pykimi.kernels import c as C
    act_mode(mode)
    m = pykimi.load(_path(which, quant_dirs))
    t = m.text
    H, dn, dr, dv, R = t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.kv_lora_rank
    a, layer, inv = m.layer_weights(1).attn, 1, _inv_freq(dr, float(t.rope_theta))
    rng = np.random.default_rng(17)
    try:
        for level in C.simd_levels():
            C.set_simd(level)
            for B in range(1, 11):
                lens = [int(n) for n in rng.integers(0, 40, B)]
                alone, batched = [], []
                for n in lens:
                    c, d = m.new_cache(capacity=48), m.new_cache(capacity=48)
                    lat = rng.standard_normal((n, R)).astype(np.float32)
                    kpe = rng.standard_normal((n, dr)).astype(np.float32)
                    for cc in (c, d):
                        cc.write(layer, lat, kpe)
                    alone.append(c)
                    batched.append(d)
                q = rng.standard_normal((B, H * (dn + dr))).astype(np.float32)
                kva = rng.standard_normal((B, R + dr)).astype(np.float32)
                got = _mla_batch(q, kva, a, t, inv, batched, layer, t.qk_head_dim ** -0.5, (H, dn, dr, dv, R))
                assert got is not None
                for b, c in enumerate(alone):
                    rows, n = c.next_row(layer)
                    ref = kernels.fast(mla_absorbed)(q[b], kva[b], a.kv_a_layernorm, t.kv_a_layernorm_eps, inv, n,
                                                     rows, n, a.kv_b_proj, t.qk_head_dim ** -0.5, (H, dn, dr, dv, R))
                    c.commit(layer)
                    np.testing.assert_array_equal(got[b], ref, err_msg=f"{which} {mode} {level} B={B} sequence {b}")
    finally:
        C.set_simd(None)


def test_freeze_heap_collects_then_freezes_what_is_alive():
    """engine.freeze_heap (pykimi serve, after its warm-up): cyclic garbage made before it is reclaimed, not frozen;
    what is alive is frozen (gc.get_freeze_count), and a full collection no longer walks it. Undone at the end, so
    the rest of the suite collects as usual."""
    import gc
    import weakref
    from pykimi.engine import freeze_heap

    class Node:
        pass

    garbage = Node()
    garbage.me = garbage                                    # a cycle: only the cyclic collector reclaims it
    gone = weakref.ref(garbage)
    alive = [Node() for _ in range(1000)]
    del garbage
    try:
        n = freeze_heap()
        assert gone() is None, "the cycle made before the freeze was frozen instead of collected"
        assert n == gc.get_freeze_count() and n >= len(alive), (n, gc.get_freeze_count())
        assert not any(o is alive[0] for o in gc.get_objects()), "a live object is still walked by the collector"
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_engine_cache_dtype_counts_bf16_bytes():
    """The engine's budget counts a bf16 cache's bytes (half an f32 one's); default: the model's cache dtype."""
    m32, m16 = pykimi.load(TINY), pykimi.load(TINY, cache_dtype="bf16")
    assert Engine(m16).cache_dtype == "bf16" and Engine(m32).cache_dtype == "f32"
    assert Engine(m16).bytes_per_token * 2 == Engine(m32).bytes_per_token == Engine(m32, cache_dtype="f32").bytes_per_token
    assert Engine(m32, cache_dtype="bf16").bytes_per_token == Engine(m16).bytes_per_token
    with pytest.raises(InputError, match="expected one of f32, bf16"):
        Engine(m32, cache_dtype="f16")
    params = SamplingParams(max_new_tokens=6, stop_ids=())
    prompt = _ids(m16, np.random.default_rng(7), 10)
    with Engine(m16, parallel=2, cache_budget_mb=16 * Engine(m16).bytes_per_token / 2**20) as eng:
        res = eng.submit(prompt, params=params).result(TIMEOUT)      # 16 positions fit only as bf16 rows
        assert res.ids == m16.generate(prompt, max_new_tokens=6, stop_ids=[])


def test_batched_step_reads_each_expert_once():
    """All experts chosen in a step are fetched once (the read counter counts one use per expert per step)."""
    m = pykimi.load(pykimi.demo_checkpoint())
    if not batched_available(m):
        pytest.skip("the batched path needs the C backend")
    rng = np.random.default_rng(2)
    cs = _prefilled(m, rng, 6, 8)
    m.ckpt.read_counter.clear()
    stats = {}
    decode_batch(m, [int(t) for t in _ids(m, rng, 6)], cs, stats)
    counts = {k: v for k, v in m.ckpt.read_counter.items() if ".mlp.experts." in k}
    assert counts and set(counts.values()) == {1}, counts
    n_chosen = len({k.rsplit(".", 2)[0] for k in counts})
    assert n_chosen == sum(stats["experts_per_layer"])


@pytest.mark.parametrize("which,cache_dtype", [("demo", "f32"), ("tiny", "f32"), ("demo8", "bf16"), ("tiny4", "f32"),
                                               ("tiny4", "bf16")])
def test_batched_layers_on_kept_arguments_equal_the_stage_by_stage_loop(which, cache_dtype, quant_dirs, monkeypatch):
    """decode_batch's layers on the kept C arguments (engine._batch_plan / _layers_batched) == the stage-by-stage
    loop (_layers_generic) bit for bit: logits, the cache rows written, and the stats of the reads; the caches
    grow during the steps (their kept row pointers must follow)."""
    from pykimi import engine
    m = pykimi.load(_path(which, quant_dirs), cache_dtype=cache_dtype)
    if not batched_available(m):
        pytest.skip("the batched path needs the C backend")
    rng = np.random.default_rng(11)
    B = 5
    a, b = [m.new_cache(capacity=2) for _ in range(B)], [m.new_cache(capacity=2) for _ in range(B)]
    for ca, cb in zip(a, b):
        p = _ids(m, rng, rng.integers(2, 20))
        m.prefill(m.embed(p), ca, all_logits=False)
        m.prefill(m.embed(p), cb, all_logits=False)
    assert engine._batch_plan(m, a) is not None, "the kept-argument path declined these weights"
    toks = [int(v) for v in _ids(m, rng, B)]
    for step in range(6):
        sa, sb = {}, {}
        la = decode_batch(m, toks, a, sa)
        with monkeypatch.context() as mp:
            mp.setattr(engine, "_batch_plan", lambda *args: None)
            lb = decode_batch(m, toks, b, sb)
        np.testing.assert_array_equal(la, lb, err_msg=f"{which} step {step}")
        assert sa == sb, f"{which} step {step}: {sa} vs {sb}"
        for ca, cb in zip(a, b):
            assert len(ca) == len(cb)
            for ly in range(m.text.num_hidden_layers):
                np.testing.assert_array_equal(ca.rows(ly), cb.rows(ly))
        toks = [int(v) for v in la.argmax(axis=1)]


def test_batched_step_reads_experts_again_after_read_counter_clear():
    """The batched step's kept expert records follow the read generation: after read_counter.clear() every
    expert a step chooses is resolved (read, counted) again, once; without a clear nothing is read again."""
    m = pykimi.load(pykimi.demo_checkpoint())
    if not batched_available(m):
        pytest.skip("the batched path needs the C backend")
    rng = np.random.default_rng(4)
    cs = _prefilled(m, rng, 4, 6)
    toks = [int(t) for t in _ids(m, rng, 4)]
    for step in range(3):
        m.ckpt.read_counter.clear()
        stats = {}
        logits = decode_batch(m, toks, cs, stats)
        counts = {k: v for k, v in m.ckpt.read_counter.items() if ".mlp.experts." in k}
        assert counts and set(counts.values()) == {1}, (step, counts)
        assert len({k.rsplit(".", 2)[0] for k in counts}) == sum(stats["experts_per_layer"]), step
        toks = [int(v) for v in logits.argmax(axis=1)]
    # more steps without a clear: an expert is read the first time it is chosen in the generation, never again
    for _ in range(3):
        toks = [int(v) for v in decode_batch(m, toks, cs, {}).argmax(axis=1)]
    counts = {k: v for k, v in m.ckpt.read_counter.items() if ".mlp.experts." in k}
    assert set(counts.values()) == {1}, counts


def _scene_inputs(proc, seeds):
    out = []
    for seed in seeds:
        img, shapes = scenes.random_scene(np.random.default_rng(seed))
        q = [scenes.QUESTION_COUNT, scenes.QUESTION_DESCRIBE, scenes.qa_pairs(shapes)[0][0]][seed % 3]
        out.append(proc.prepare(scenes.messages_for(q), images=[img]))
    return out


def _run(eng, inputs, params):
    reqs = [eng.submit(i["input_ids"], i.get("pixel_values"), i.get("image_grid_hws"), params=params)
            for i in inputs]
    return [r.result(TIMEOUT) for r in reqs]


def test_engine_demo_greedy_alone_equals_together_equals_generate():
    path = pykimi.demo_checkpoint()
    m = pykimi.load(path)
    proc = pykimi.Processor.from_pretrained(path)
    inputs = _scene_inputs(proc, range(100, 108))
    params = SamplingParams(max_new_tokens=24)
    gen = [m.generate(i["input_ids"], i["pixel_values"], i["image_grid_hws"], max_new_tokens=24) for i in inputs]
    with Engine(m, parallel=1) as eng:
        alone = [_run(eng, [i], params)[0] for i in inputs]
    with Engine(m, parallel=4) as eng:
        together = _run(eng, inputs, params)
        assert eng.metrics["decode_steps"] < sum(r.completion_tokens for r in together)   # steps were shared
    for k, (g, a, t) in enumerate(zip(gen, alone, together)):
        assert a.ids == g, f"request {k}: engine alone {a.ids} != model.generate {g}"
        assert t.ids == a.ids, f"request {k}: beside others {t.ids} != alone {a.ids}"
        assert t.finish_reason == "stop" and t.completion_tokens == len(t.ids)


@pytest.mark.parametrize("which", ["tiny", "tiny8", "tiny4", "demo4"])
def test_engine_text_greedy_alone_equals_together(which, quant_dirs):
    m = pykimi.load(_path(which, quant_dirs))
    rng = np.random.default_rng(3)
    prompts = [_ids(m, rng, rng.integers(4, 40)) for _ in range(6)]
    params = SamplingParams(max_new_tokens=int(rng.integers(10, 20)), stop_ids=())
    with Engine(m, parallel=1) as eng:
        alone = [_run(eng, [{"input_ids": p}], params)[0].ids for p in prompts]
    with Engine(m, parallel=6, prefix_cache=False) as eng:
        together = [r.ids for r in _run(eng, [{"input_ids": p} for p in prompts], params)]
    assert together == alone
    assert alone[0] == m.generate(prompts[0], max_new_tokens=params.max_new_tokens, stop_ids=[])


def test_cancel_frees_within_a_step_and_others_continue():
    m = pykimi.load(TINY)
    rng = np.random.default_rng(4)
    p1, p2 = _ids(m, rng, 10), _ids(m, rng, 12)
    params = SamplingParams(max_new_tokens=40, stop_ids=())
    with Engine(m, parallel=1) as eng:
        ref = eng.submit(p2, params=params).result(TIMEOUT).ids
    with Engine(m, parallel=2) as eng:
        long = eng.submit(p1, params=SamplingParams(max_new_tokens=1000, stop_ids=()))
        other = eng.submit(p2, params=params)
        it = long.events(timeout=TIMEOUT)
        for _ in range(3):
            next(it)
        long.cancel()
        res = long.result(TIMEOUT)
        assert res.finish_reason == "cancelled" and res.completion_tokens < 1000
        assert other.result(TIMEOUT).ids == ref
        t0 = time.time()
        while eng.reserved and time.time() - t0 < 10:
            time.sleep(0.01)
        assert eng.reserved == 0 and eng.metrics["requests_cancelled"] == 1


def test_cache_budget_waits_and_refuses_what_cannot_fit():
    m = pykimi.load(TINY)
    bpt = m.new_cache(capacity=1).bytes_per_token()
    budget_mb = 60 * bpt / 2**20                          # room for one 50-position request at a time
    rng = np.random.default_rng(5)
    prompts = [_ids(m, rng, 20) for _ in range(3)]
    params = SamplingParams(max_new_tokens=30, stop_ids=())
    with Engine(m, parallel=3, cache_budget_mb=budget_mb) as eng:
        reqs = [eng.submit(p, params=params) for p in prompts]
        peak = 0
        while not all(r.done for r in reqs):
            peak = max(peak, eng.reserved)
            time.sleep(0.002)
        assert all(r.result(1).completion_tokens == 30 for r in reqs)
        assert peak <= budget_mb * 2**20
        with pytest.raises(InputError, match="cache budget"):
            eng.submit(prompts[0], params=SamplingParams(max_new_tokens=100))


def test_queue_full_and_bad_input():
    m = pykimi.load(TINY)
    eng = Engine(m, parallel=1, max_queue=2)              # not started: requests wait
    eng.submit([1, 2, 3])
    eng.submit([1, 2, 3])
    with pytest.raises(QueueFull):
        eng.submit([1, 2, 3])
    for bad, msg in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0),
                     "max_new_tokens"), (dict(top_k=-2), "top_k"), (dict(logit_bias={"x": 1}), "logit_bias"),
                     (dict(logit_bias={5: 1000}), "logit_bias"), (dict(seed=-1), "seed"),
                     (dict(presence_penalty=3), "presence_penalty"), (dict(stop_ids=(10**9,)), "stop_ids")]:
        with pytest.raises(InputError, match=msg):
            Engine(m).submit([1, 2, 3], params=SamplingParams(**bad))
    with pytest.raises(InputError, match="context"):
        Engine(m).submit([1] * 10, params=SamplingParams(max_new_tokens=m.context_limit))
    with pytest.raises(InputError, match="vocabulary"):
        Engine(m).submit([1, 10**6])
    eng.start()
    assert eng.submit([1, 2, 3], block=True).result(TIMEOUT).completion_tokens >= 1
    eng.stop()
    with pytest.raises(EngineStopped):
        eng.submit([1, 2, 3])


def test_image_cache_and_prefix_reuse():
    path = pykimi.demo_checkpoint()
    m = pykimi.load(path)
    proc = pykimi.Processor.from_pretrained(path)
    img, shapes = scenes.random_scene(np.random.default_rng(101))
    q1 = scenes.messages_for(scenes.QUESTION_COUNT)
    with Engine(m, parallel=2) as eng:
        i1 = proc.prepare(q1, images=[img])
        r1 = _run(eng, [i1], SamplingParams(max_new_tokens=24))[0]
        assert proc.decode(r1.ids, skip_special=True) == scenes.count_answer(shapes)
        assert r1.timings["images_cached"] == 0 and r1.timings["cache_n"] == 0
        # the next turn re-sends the image and extends the conversation
        answer = proc.decode(r1.ids, skip_special=True)
        msgs = q1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": scenes.QUESTION_DESCRIBE}]
        i2 = proc.prepare(msgs, images=[img])
        r2 = _run(eng, [i2], SamplingParams(max_new_tokens=24))[0]
        assert r2.timings["images_cached"] == 1
        assert r2.timings["cache_n"] >= len(i1["input_ids"]), r2.timings
        assert eng.images.hits == 1 and eng.metrics["prefix_reused_tokens"] == r2.timings["cache_n"]
        assert proc.decode(r2.ids, skip_special=True) == scenes.describe_answer(shapes)


def test_sampling_seeded_and_logprobs():
    m = pykimi.load(TINY)
    p = np.arange(5, 20)
    with Engine(m, parallel=2) as eng:
        a, b = _run(eng, [{"input_ids": p}] * 2, SamplingParams(max_new_tokens=12, temperature=1.0, seed=7,
                                                                   stop_ids=()))
        assert a.ids == b.ids                                    # same seed, same tokens, batched or not
        req = eng.submit(p, params=SamplingParams(max_new_tokens=5, logprobs=3, stop_ids=()))
        evs = list(req.events(timeout=TIMEOUT))
        assert [e.finish_reason for e in evs] == [None] * 4 + ["length"]
        for e in evs:                                            # greedy: the chosen token is the most likely
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0][0] == e.token_id
            assert e.logprob == pytest.approx(e.top_logprobs[0][1]) and e.logprob <= 0
        bias = {int(evs[0].token_id): -100.0}
        r = eng.submit(p, params=SamplingParams(max_new_tokens=1, logit_bias=bias, stop_ids=())).result(TIMEOUT)
        assert r.ids[0] != evs[0].token_id


def test_a_failing_request_does_not_stop_the_engine():
    """An error found inside the scheduler (here the vision tower refusing an image) ends that request with
    the error; the others finish and the engine keeps serving."""
    path = pykimi.demo_checkpoint()
    m = pykimi.load(path)
    proc = pykimi.Processor.from_pretrained(path)
    inputs = _scene_inputs(proc, [100])[0]

    def refuse(pixel_values, grid):
        raise InputError("image 0: refused by the test")

    m.encode_images = refuse
    with Engine(m, parallel=2) as eng:
        text = eng.submit([5, 6, 7, 8], params=SamplingParams(max_new_tokens=20, stop_ids=()))
        bad = eng.submit(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"])
        with pytest.raises(InputError, match="refused by the test"):
            bad.result(TIMEOUT)
        with pytest.raises(InputError):
            list(bad.events(timeout=TIMEOUT))
        assert text.result(TIMEOUT).completion_tokens == 20
        assert eng.error is None and eng.metrics["requests_failed"] == 1
        assert eng.submit([9, 10], params=SamplingParams(max_new_tokens=3, stop_ids=())).result(TIMEOUT).ids
        assert eng.reserved == 0


def test_call_in_own_thread_returns_raises_and_leaves_no_openmp_team():
    """engine.call_in_own_thread: fn's value, fn's exception (the same object), and -- with the C backend -- no
    thread left behind: the OpenMP team a kernel call makes in that thread ends with it (a team left beside the
    engine's would throttle libgomp's spinning for every later step, the engine's docstring)."""
    from pykimi.engine import call_in_own_thread
    assert call_in_own_thread(lambda a, b=0: a + b, 2, b=3) == 5
    boom = ValueError("boom")
    with pytest.raises(ValueError) as info:
        call_in_own_thread(lambda: (_ for _ in ()).throw(boom))
    assert info.value is boom
    if kernels.backend() != "c" or not os.path.isdir("/proc/self/task"):
        pytest.skip("the team check needs the C backend and /proc")
    from pykimi.quant import quantize_q4
    W = quantize_q4(np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32))
    x = np.ones((1, 256), np.float32)
    kernels.matmul(x, W)                                   # this thread's own team exists before we look

    def tids():
        return set(os.listdir("/proc/self/task"))
    before = tids()
    seen = []
    got = call_in_own_thread(lambda: (kernels.matmul(x, W), seen.append(tids()))[0])
    np.testing.assert_array_equal(got, kernels.matmul(x, W))
    workers = kernels.backends()["c"].get("threads", 1) - 1          # the call's thread + its team's workers
    assert len(seen[0] - before) >= 1 + min(workers, 1), "the call ran no thread of its own (with its team)"
    deadline = time.monotonic() + 5.0
    while tids() - before and time.monotonic() < deadline:
        time.sleep(0.01)                                   # the ended thread's workers exit asynchronously
    assert not tids() - before, f"threads {sorted(tids() - before)} outlived the call"
