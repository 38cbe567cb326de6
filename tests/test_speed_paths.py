"""The threaded BLAS paths of prefill and vision (kernels.parallel_for): the Numba tile decoders against their
NumPy twins, the row-tiled matmul against ref.matmul, the task runner itself, and the chunked vision block /
per-head attention against the whole-array formulation of spec §6.3."""
import math

import numpy as np
import pytest

from pykimi import kernels as K
from pykimi import vision
from pykimi.kernels import linear, pool, probe, ref
from pykimi.quant import quantize_q4, quantize_q8
from pykimi.weights import Stored, f32_to_bf16

numba_kernels = pytest.importorskip("pykimi.kernels.numba_kernels")


@pytest.fixture
def threads():
    old = K.get_threads()
    yield K.set_threads
    K.set_threads(old)


def _weights(out_f, in_f, seed=0):
    x = np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)
    return {"f32": x, "BF16": Stored("w", "BF16", f32_to_bf16(x)), "q8_32": quantize_q8(x), "q4_32": quantize_q4(x)}


# ------------------------------------------------------------------------------ tile decoders (Numba)

@pytest.mark.parametrize("in_f", [1, 31, 32, 33, 70, 96, 2048])
def test_numba_tile_decoders_equal_twins(in_f):
    w = _weights(5, in_f, seed=in_f)
    out = np.empty((5, in_f), np.float32)
    numba_kernels.widen_bf16(np.ascontiguousarray(w["BF16"].data), out)
    assert np.array_equal(out.view(np.uint32), ref.bf16_to_f32(w["BF16"].data).view(np.uint32))
    q8 = w["q8_32"]
    numba_kernels.dequant_q8(np.ascontiguousarray(q8.q), np.ascontiguousarray(q8.scales), out)
    assert np.array_equal(out, ref.dequant_q8(q8.q, q8.scales, in_f))
    q4 = w["q4_32"]
    numba_kernels.dequant_q4(np.ascontiguousarray(q4.q), np.ascontiguousarray(q4.scales), out)
    assert np.array_equal(out, ref.dequant_q4(q4.q, q4.scales, in_f))


# ----------------------------------------------------------------------------------- tiled matmul

@pytest.mark.parametrize("backend", ["numpy", "numba", "c"])
@pytest.mark.parametrize("kind", ["f32", "BF16", "q8_32", "q4_32"])
def test_tiled_matmul_matches_ref_any_threads(monkeypatch, threads, backend, kind):
    ok, why = probe._probe(backend)
    if not ok:
        pytest.skip(why)
    old, old_act = K.backend(), K.act_quant()
    K.set_backend(backend)
    K.set_act_quant("none")                              # every format past SMALL_N rows takes the tiles
    try:
        monkeypatch.setattr(linear, "TASK_ELEMS", 3 * 70)        # 3 rows per tile: many tiles, a ragged last one
        w = _weights(37, 70, seed=1)[kind]
        x = np.random.default_rng(2).standard_normal((K.SMALL_N + 5, 70)).astype(np.float32)
        want = ref.matmul(x, w)
        ys = []
        for n in (1, 2, 3):
            threads(n)
            ys.append(K.matmul(x, w))
            np.testing.assert_allclose(ys[-1], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        # the same tiles whoever computes them: bitwise equal across thread counts
        assert all(np.array_equal(ys[0], y) for y in ys[1:])
    finally:
        K.set_backend(old)
        K.set_act_quant(old_act)


@pytest.mark.parametrize("kind", ["q8_32", "q4_32"])
def test_quantized_prefill_routing_matches_reference(monkeypatch, kind):
    """With quantized activations the C kernel serves up to SMALL_N_ACT rows (int4: every n at the AVX-512 level and
    at the AVX2 level with its int8 batch kernel, SMALL_N_ACT_AVX2 rows there with it off); matmul and
    matmul_many equal reference(), the twin of the path taken, on both sides of the crossover."""
    ok, why = probe._probe("c")
    if not ok:
        pytest.skip(why)
    old = K.backend()
    K.set_backend("c")
    monkeypatch.setattr(linear, "SMALL_N_ACT", dict(K.MEASURED_SMALL_N_ACT))
    try:
        w = _weights(40, 96, seed=5)[kind]
        for n in (K.SMALL_N + 1, 49, 130):
            x = np.random.default_rng(n).standard_normal((n, 96)).astype(np.float32)
            want = K.reference(x, w)
            got = K.matmul(x, w)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            many = K.matmul_many([x, x[:3]], [w, w])
            assert np.array_equal(many[0], got)
        if kind == "q4_32" and K.act_quant() != "none":
            # int4 goes through the dequantized tiles only at the AVX2 level with the int8 batch kernel off
            # (PYKIMI_VNNI_BATCH=0), past its measured crossover
            want_n = linear.SMALL_N_ACT_AVX2[(kind, "i8")] if not (linear._c_avx512() or linear._vnni(kind)) else None
            if want_n is None:
                assert linear._small_n(kind) > 10 ** 9, "int4 must stay on the C kernels (AVX-512, batch kernel)"
            else:
                assert linear._small_n(kind) == want_n, (linear._small_n(kind), want_n)
                assert linear.plan(kind, want_n)[0] == "c" and linear.plan(kind, want_n + 1)[0] == "tiles"
    finally:
        K.set_backend(old)


# ------------------------------------------------------------------------------------- parallel_for

def test_parallel_for_order_errors_nesting_and_blas_threads(threads):
    threads(2)
    f_set, f_get = pool._openblas()
    before = f_get() if f_get else None
    seen = []

    def inner(i):
        seen.append(f_get() if f_get else 1)               # BLAS is single-threaded inside a task
        return K.parallel_for(lambda j: i * 10 + j, range(3))   # nested: runs inline, same results

    assert K.parallel_for(inner, range(7)) == [[i * 10 + j for j in range(3)] for i in range(7)]
    assert set(seen) == {1}
    if f_get:
        assert f_get() == before                           # restored afterwards

    def boom(i):
        if i == 4:
            raise ValueError("task 4")
        return i

    with pytest.raises(ValueError, match="task 4"):
        K.parallel_for(boom, range(9))
    if f_get:
        assert f_get() == before
    assert K.parallel_for(lambda i: i, []) == []


_SPIN_PROBE = """
import os, sys, time
import pykimi                       # first, as the `pykimi` command imports it: before NumPy loads OpenBLAS
import numpy as np
from pykimi.kernels import pool
f_set, _ = pool._openblas()
if f_set is None:
    print("no-openblas")
    sys.exit(0)
f_set(2)
a = np.random.default_rng(0).random((768, 768), dtype=np.float32)
a @ a                               # the worker threads exist now
a @ a
c0 = time.process_time()
time.sleep(0.25)                    # the main thread sleeps: any CPU time now is OpenBLAS's idle workers spinning
print(os.environ["OPENBLAS_THREAD_TIMEOUT"], time.process_time() - c0)
"""


def _spin_after_a_call(env_timeout):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_", "GOTO_"))}
    if env_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_timeout
    r = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if r.stdout.strip() == "no-openblas":
        pytest.skip("NumPy is not linked to OpenBLAS here: nothing spins after a call")
    value, cpu = r.stdout.split()
    return value, float(cpu)


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="one CPU: OpenBLAS starts no worker threads")
def test_openblas_workers_sleep_right_after_a_call():
    """The decode stalls after a prefill (bench/RESULTS.md, "Stalls"): OpenBLAS's idle workers busy-wait 2^28
    cycles (~0.1 s) after each multi-threaded call unless OPENBLAS_THREAD_TIMEOUT says otherwise; importing pykimi
    first sets it to 20 (~0.3 ms), and a user's own value is kept."""
    value, cpu = _spin_after_a_call(None)
    assert value == "20", value
    assert cpu < 0.02, f"OpenBLAS's workers used {cpu:.3f} s of CPU in the 0.25 s after a call (expected ~0)"
    value, cpu = _spin_after_a_call("28")                 # the user's value (OpenBLAS's default): kept, and it spins
    assert value == "28", value
    assert cpu > 0.03, f"with OpenBLAS's default timeout its workers used only {cpu:.3f} s after a call: " \
                       "the probe no longer shows the spinning it guards against"


# ------------------------------------------------------------------------------------ vision block

class VC:
    num_attention_heads = 4
    layer_norm_eps = 1e-5


def _block_weights(C, F, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)          # noqa: E731
    return {"norm0.weight": 1 + 0.1 * r(C), "norm0.bias": 0.1 * r(C),
            "wqkv.weight": r(3 * C, C) / math.sqrt(C), "wqkv.bias": 0.1 * r(3 * C),
            "wo.weight": r(C, C) / math.sqrt(C), "wo.bias": 0.1 * r(C),
            "norm1.weight": 1 + 0.1 * r(C), "norm1.bias": 0.1 * r(C),
            "mlp.fc0.weight": r(F, C) / math.sqrt(C), "mlp.fc0.bias": 0.1 * r(F),
            "mlp.fc1.weight": r(C, F) / math.sqrt(F), "mlp.fc1.bias": 0.1 * r(C)}


def _block_reference(x, w, grids, ang, H):
    """Spec §6.3 on whole arrays in float64: the formulation the chunked block must reproduce."""
    x = x.astype(np.float64)
    L, C = x.shape
    D = C // H

    def ln(a, g, b):
        mu = a.mean(-1, keepdims=True)
        return (a - mu) / np.sqrt(((a - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    def rope(z):                                          # interleaved pairs (§6.4)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = np.empty_like(z)
        out[..., 0::2] = z[..., 0::2] * c - z[..., 1::2] * s
        out[..., 1::2] = z[..., 0::2] * s + z[..., 1::2] * c
        return out

    qkv = ln(x, w["norm0.weight"], w["norm0.bias"]) @ w["wqkv.weight"].T.astype(np.float64) + w["wqkv.bias"]
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(L, H, D) for i in range(3))
    q, k = rope(q), rope(k)
    att = np.empty((L, H, D))
    cu = vision.cu_seqlens(grids)
    for s, e in zip(cu[:-1], cu[1:]):
        sc = np.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / math.sqrt(D)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att[s:e] = np.einsum("hqk,khd->qhd", p, v[s:e])
    x = x + att.reshape(L, C) @ w["wo.weight"].T + w["wo.bias"]
    f = ln(x, w["norm1.weight"], w["norm1.bias"]) @ w["mlp.fc0.weight"].T + w["mlp.fc0.bias"]
    f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
    return x + f @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]


@pytest.mark.parametrize("row_chunk,block_q", [(128, None), (5, None), (7, 3)])
def test_vision_block_chunked_equals_whole_array(monkeypatch, threads, row_chunk, block_q):
    C, F, H = 32, 48, VC.num_attention_heads
    grids = np.array([[4, 6], [2, 2], [6, 4]])            # three images: per-image attention blocks
    L = int((grids[:, 0] * grids[:, 1]).sum())
    ang = np.concatenate(vision.rope_angles(grids, C // H))
    w = _block_weights(C, F)
    x = np.random.default_rng(3).standard_normal((L, C)).astype(np.float32)
    want = _block_reference(x, w, grids, ang, H)
    monkeypatch.setattr(vision, "ROW_CHUNK", row_chunk)
    outs = []
    for n in (1, 2):
        threads(n)
        x_in = x.copy()
        y = vision.vision_block(x_in, w, grids, ang, VC, block_q=block_q)
        assert np.array_equal(x_in, x)                    # the input is not modified
        err = np.abs(y - want).max() / np.abs(want).max()
        assert err < 2e-6, f"threads={n}: max scale-relative error {err:.2e}"
        outs.append(y)
    assert np.array_equal(outs[0], outs[1])               # same chunks whoever computes them


@pytest.mark.parametrize("row_chunk,mm_rows", [(128, 1 << 20), (16, 32), (7, 20)])
def test_vision_block_stored_matrices_equal_the_f32_block(monkeypatch, threads, row_chunk, mm_rows):
    """vision_block with its four matrices stored as bf16 (the C backend's default: kernels.matmul over MM_ROWS rows
    at a time, the elementwise parts in ROW_CHUNK tasks) == the spec's float64 block on the same bf16-rounded
    weights, and == vision_block's f32-array form to its summation order, whatever MM_ROWS (one product for all
    rows, several, a short last one) and the threads; the input is not modified."""
    if K.backend() != "c":
        pytest.skip("the stored-matrix path is the C backend's")
    C, F, H = 32, 48, VC.num_attention_heads
    grids = np.array([[4, 6], [2, 2], [6, 4]])
    L = int((grids[:, 0] * grids[:, 1]).sum())
    ang = np.concatenate(vision.rope_angles(grids, C // H))
    w = _block_weights(C, F)
    bits = {k: f32_to_bf16(w[k]) for k in vision.MATRIX_KEYS}
    wf = dict(w, **{k: ref.bf16_to_f32(b) for k, b in bits.items()})          # the values bf16 can hold
    ws = dict(w, **{k: Stored(k, "BF16", b) for k, b in bits.items()})
    x = np.random.default_rng(5).standard_normal((L, C)).astype(np.float32)
    want = _block_reference(x, wf, grids, ang, H)
    f32_form = vision.vision_block(x, wf, grids, ang, VC)
    monkeypatch.setattr(vision, "ROW_CHUNK", row_chunk)
    monkeypatch.setattr(vision, "MM_ROWS", mm_rows)
    for n in (1, 2):
        threads(n)
        x_in = x.copy()
        y = vision.vision_block(x_in, ws, grids, ang, VC)
        assert np.array_equal(x_in, x)
        err = np.abs(y - want).max() / np.abs(want).max()
        assert err < 2e-6, f"threads={n}: {err:.2e} from the float64 block"
        err = np.abs(y - f32_form).max() / np.abs(f32_form).max()
        assert err < 2e-6, f"threads={n}: {err:.2e} from the f32-array form"


def test_vision_attention_strided_inputs_and_tiles(threads):
    threads(2)
    rng = np.random.default_rng(4)
    L, H, D = 53, 3, 8
    qkv = rng.standard_normal((L, 3 * H * D)).astype(np.float32)
    q, k, v = (qkv[:, i * H * D:(i + 1) * H * D].reshape(L, H, D) for i in range(3))   # strided views
    cu = [0, 20, L]
    want = vision.vision_attention(*(np.ascontiguousarray(a) for a in (q, k, v)), cu, block_q=10 ** 6)
    for bq in (None, 1, 6):
        np.testing.assert_allclose(vision.vision_attention(q, k, v, cu, block_q=bq), want, atol=1e-6)
    out, probs = vision.vision_attention(q, k, v, cu, return_probs=True)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
