"""Benchmark: the real-width MoonViT tower + projector (1152 wide, 16 heads, MLP 4304, 64x64 position table)
with synthetic bf16 weights held in memory, on a 448x448 image (1024 patches), pykimi vs a PyTorch fp32 twin
on the same weights, same machine.

    python bench/bench_vision.py                 # 4 blocks, then extrapolates to the 27-block tower
    python bench/bench_vision.py --full          # all 27 blocks
    python bench/bench_vision.py --size 896      # 4096 patches
    python bench/bench_vision.py --attn16k       # one layer's attention at 16,384 patches: time + peak memory
    python bench/bench_vision.py --size 1792 --blocks 1 --repeat 1   # a 3.2 MP image (16,384 patches, the
                                                 # Thinking-2506 budget): time and peak anonymous memory, both

pykimi is timed twice: widening one block's bf16 weights at a time (the default, as from the memory-mapped
checkpoint) and with the widened weights cached (compute only). The torch twin below is written for this
script from the spec (§6-7); it also serves as an independent numeric check (max rel. difference printed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pykimi  # noqa: F401,E402 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np  # noqa: E402

from pykimi import vision                                   # noqa: E402
from pykimi.config import KimiVLConfig                      # noqa: E402
from pykimi.layout import projector_tensors, vision_tensors  # noqa: E402
from pykimi.testing import random_tensor_f32, reference_config  # noqa: E402
from pykimi.weights import Stored, f32_to_bf16              # noqa: E402


class ArrayCheckpoint:
    """The part of pykimi.weights.Checkpoint the tower uses, over in-memory bf16 tensors."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __contains__(self, name):
        return name in self.tensors

    def f32(self, name):
        return self.tensors[name].f32()


def make_weights(cfg: KimiVLConfig, seed: int = 0) -> ArrayCheckpoint:
    out = {}
    for name, shape in vision_tensors(cfg) + projector_tensors(cfg):
        std = 1.0 / math.sqrt(shape[-1] if len(shape) == 2 else 588) if name.endswith("weight") else 0.02
        x = random_tensor_f32(name, shape, seed, std=std)
        out[name] = Stored(name, "BF16", f32_to_bf16(x).reshape(shape))
    return ArrayCheckpoint(out)


def synthetic_image(size: int, patch: int, seed: int = 0):
    g = size // patch
    pv = np.random.default_rng(seed).uniform(-1, 1, (g * g, 3, patch, patch)).astype(np.float32)
    return pv, np.array([[g, g]], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# the PyTorch fp32 twin (spec §6-7)
# ---------------------------------------------------------------------------------------------------------
def torch_encode(torch, W: dict, cfg: KimiVLConfig, pv: np.ndarray, grids: np.ndarray):
    F = torch.nn.functional
    v = cfg.vision
    C, H, D, p = v.hidden_size, v.num_attention_heads, v.head_dim, v.patch_size
    t = lambda name: W[name]                                                    # noqa: E731
    x = F.conv2d(torch.from_numpy(pv), t("vision_tower.patch_embed.proj.weight"),
                 t("vision_tower.patch_embed.proj.bias"), stride=p).reshape(-1, C)
    table = t("vision_tower.patch_embed.pos_emb.weight").permute(2, 0, 1)[None]
    pos, cis, spans = [], [], []
    start = 0
    inv = 1.0 / (v.rope_theta ** (torch.arange(0, D, 4)[: D // 4].float() / D))
    for gh, gw in grids.tolist():
        pos.append(F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)[0]
                   .permute(1, 2, 0).reshape(-1, C))
        r = torch.arange(gh * gw)
        ang = torch.stack([torch.outer((r % gw).float(), inv), torch.outer((r // gw).float(), inv)], -1)
        cis.append(torch.polar(torch.ones_like(ang), ang).reshape(gh * gw, D // 2))   # x then y per freq
        spans.append((start, start + gh * gw))
        start += gh * gw
    x = x + torch.cat(pos)
    cis = torch.cat(cis)[:, None, :]                                              # [L, 1, D/2]

    def rope(z):
        zc = torch.view_as_complex(z.reshape(z.shape[0], H, D // 2, 2).contiguous())
        return torch.view_as_real(zc * cis).reshape(z.shape[0], H, D)

    L = x.shape[0]
    for i in range(v.num_hidden_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        h = F.layer_norm(x, (C,), t(b + "norm0.weight"), t(b + "norm0.bias"), 1e-5)
        q, k, vv = F.linear(h, t(b + "wqkv.weight"), t(b + "wqkv.bias")).reshape(L, 3, H, D).unbind(1)
        q, k = rope(q), rope(k)
        att = torch.empty(L, H, D)
        for s, e in spans:                                                        # per image: no mixing
            # 4-D [1, H, n, D] as transformers calls it: torch's CPU flash kernel then runs in tiles. With 3-D
            # inputs it falls back to the math path, which holds the [H, n, n] scores (2.3 GiB and 4x slower at
            # 4096 patches; OOM-killed at 16,384): the bench compared against that slower path before.
            att[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                                      vv[s:e].transpose(0, 1)[None])[0].transpose(0, 1)
        x = x + F.linear(att.reshape(L, C), t(b + "wo.weight"), t(b + "wo.bias"))
        h = F.layer_norm(x, (C,), t(b + "norm1.weight"), t(b + "norm1.bias"), 1e-5)
        h = F.gelu(F.linear(h, t(b + "mlp.fc0.weight"), t(b + "mlp.fc0.bias")), approximate="tanh")
        x = x + F.linear(h, t(b + "mlp.fc1.weight"), t(b + "mlp.fc1.bias"))
    x = F.layer_norm(x, (C,), t("vision_tower.encoder.final_layernorm.weight"),
                     t("vision_tower.encoder.final_layernorm.bias"), 1e-5)
    merged = []
    for (gh, gw), (s, e) in zip(grids.tolist(), spans):
        merged.append(x[s:e].reshape(gh // 2, 2, gw // 2, 2, C).permute(0, 2, 1, 3, 4).reshape(-1, 4, C))
    m = torch.cat(merged)
    m = F.layer_norm(m, (C,), t("multi_modal_projector.pre_norm.weight"),
                     t("multi_modal_projector.pre_norm.bias"), 1e-5).reshape(m.shape[0], -1)
    m = F.gelu(F.linear(m, t("multi_modal_projector.linear_1.weight"), t("multi_modal_projector.linear_1.bias")))
    return F.linear(m, t("multi_modal_projector.linear_2.weight"), t("multi_modal_projector.linear_2.bias"))


# ---------------------------------------------------------------------------------------------------------
def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (RssAnon in /proc/self/status; 0 where absent)."""
    from pykimi.procfs import status_bytes

    return status_bytes("RssAnon") or 0


def peak_anon(fn, every: float = 0.005):
    """(result, peak anonymous memory above the level before the call, in bytes): RssAnon sampled every few ms by
    a thread while ``fn`` runs. The memory-mapped (file-backed) weights of a real checkpoint are not anonymous;
    here the bf16 weights live in anonymous memory before the call and are part of the baseline."""
    import ctypes
    import gc
    gc.collect()
    try:                                       # hand freed heap back, so a run does not reuse the previous one's
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = rss_anon()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(every)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], rss_anon())
    return out, peak[0] - base


def best_of(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_attn16k(H=16, D=72, n=16384):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, H, D), dtype=np.float32) for _ in range(3))
    tracemalloc.start()
    t0 = time.perf_counter()
    vision.vision_attention(q, k, v, [0, n])
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = H * n * n * 4
    print(f"attention {n} patches x {H} heads of {D}: {dt:.1f} s, peak extra memory {peak / 2**20:.0f} MiB "
          f"(a full score matrix would be {full / 2**30:.1f} GiB; q/k/v inputs {3 * q.nbytes / 2**20:.0f} MiB "
          f"not counted)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4, help="vision blocks to run (default 4; 27 = real)")
    ap.add_argument("--full", action="store_true", help="all 27 blocks")
    ap.add_argument("--size", type=int, default=448, choices=(448, 896, 1792),
                    help="square image side in pixels (1792: 16,384 patches, about 3.2 MP)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (the machine is shared)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--attn16k", action="store_true", help="also time one 16,384-patch attention layer")
    ap.add_argument("--memory", action="store_true", help="peak anonymous memory of pykimi and torch (always at 1792)")
    a = ap.parse_args(argv)

    real = reference_config()
    nb = 27 if a.full else a.blocks
    d = dict(real)
    d["vision_config"] = dict(real["vision_config"], num_hidden_layers=nb)
    cfg = KimiVLConfig.from_dict(d)
    v = cfg.vision
    print(f"MoonViT {v.hidden_size} wide, {v.num_attention_heads} heads, MLP {v.intermediate_size}, "
          f"pos table {v.init_pos_emb_height}x{v.init_pos_emb_width}, "
          f"{nb} of {real['vision_config']['num_hidden_layers']} blocks; image {a.size}x{a.size}; numpy {np.__version__}, {os.cpu_count()} cores")
    t0 = time.perf_counter()
    ck = make_weights(cfg)
    print(f"synthetic bf16 weights: {time.perf_counter() - t0:.1f} s")
    pv, grids = synthetic_image(a.size, v.patch_size)
    L = len(pv)
    if a.size >= 1792:
        # a 3.2 MP image: one encode takes minutes on 2 cores, so only the side-by-side memory + time rounds
        cached = vision.VisionTower(ck, cfg, cache_weights=True)
        compare_memory(a, cfg, ck, cached, pv, grids, nb)
        return

    tower = vision.VisionTower(ck, cfg)
    t_stream, out = best_of(lambda: tower.encode(pv, grids), a.repeat)
    cached = vision.VisionTower(ck, cfg, cache_weights=True)
    cached.encode(pv, grids)                                   # fill the cache
    t_cached, out = best_of(lambda: cached.encode(pv, grids), a.repeat)

    # per-block cost, for the extrapolation to 27 blocks
    w0 = cached.block_weights(0)
    x = np.random.default_rng(1).standard_normal((L, v.hidden_size)).astype(np.float32)
    angles = np.concatenate(vision.rope_angles(grids, v.head_dim, v.rope_theta))
    t_block, _ = best_of(lambda: vision.vision_block(x, w0, grids, angles, v), a.repeat)
    rest = t_cached - nb * t_block
    est27 = rest + 27 * t_block
    print(f"pykimi  {L} patches: {nb} blocks {t_cached:.2f} s cached weights, {t_stream:.2f} s widening bf16 "
          f"per block; one block {t_block * 1e3:.0f} ms; 27-block estimate {est27:.1f} s (cached)")

    if not a.no_torch:
        compare_torch(a, cfg, cached, pv, grids, out, t_cached, t_stream, nb)
    if a.memory:
        compare_memory(a, cfg, ck, cached, pv, grids, nb)
    if a.attn16k:
        bench_attn16k(v.num_attention_heads, v.head_dim)


def compare_torch(a, cfg, cached, pv, grids, out, t_cached, t_stream, nb):
    try:
        import torch
    except ImportError:
        print("torch not installed: no comparison")
        return
    torch.set_grad_enabled(False)
    W = {n: torch.from_numpy(cached._f32(n)) for n, _ in vision_tensors(cfg) + projector_tensors(cfg)}
    t_torch, ref = best_of(lambda: torch_encode(torch, W, cfg, pv, grids), a.repeat)
    ref = ref.numpy()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"torch {torch.__version__} fp32 ({torch.get_num_threads()} threads): {nb} blocks {t_torch:.2f} s")
    print(f"ratio pykimi/torch: {t_cached / t_torch:.2f}x (cached weights), {t_stream / t_torch:.2f}x (widening "
          f"per block); max rel. difference of the features {err:.2e}")


def torch_attention_is_tiled(torch, n: int = 2048, H: int = 16, D: int = 72) -> bool:
    """Does torch's SDPA (4-D fp32, CPU) run without the [H, n, n] scores? A 2048-token probe: those would be
    256 MiB."""
    q = torch.randn(1, H, n, D)
    _, pk = peak_anon(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    return pk < H * n * n * 4 / 4


def compare_memory(a, cfg, ck, cached, pv, grids, nb):
    """Peak anonymous memory of one encode, pykimi (bf16 widened per block, the default) then torch fp32 on the
    same widened weights, alternating twice; each above its own baseline, times beside them."""
    try:
        import torch
        torch.set_grad_enabled(False)
        W = {n: torch.from_numpy(cached._f32(n)) for n, _ in vision_tensors(cfg) + projector_tensors(cfg)}
    except ImportError:
        torch = None
    n = int(np.prod(grids[0]))
    H = cfg.vision.num_attention_heads
    if torch is not None and not torch_attention_is_tiled(torch):
        # a torch whose SDPA materialises the scores would need ~3 x 16 GiB at 16,384 patches (the 3-D call did:
        # OOM-killed at 22 GB on this 24 GiB machine)
        print("torch fp32 skipped: this torch's scaled_dot_product_attention holds the whole score matrix")
        torch = None
    print(f"peak anonymous memory above the baseline, {n} patches, {nb} block(s) (a full [heads, n, n] f32 score "
          f"matrix would be {H * n * n * 4 / 2**30:.1f} GiB):")
    tower = vision.VisionTower(ck, cfg)
    for rnd in range(a.repeat if a.size < 1792 else max(1, min(a.repeat, 2))):
        t0 = time.perf_counter()
        out, pk = peak_anon(lambda: tower.encode(pv, grids))
        print(f"  round {rnd + 1}: pykimi {pk / 2**20:7.0f} MiB  {time.perf_counter() - t0:6.1f} s", end="", flush=True)
        if torch is not None:
            t0 = time.perf_counter()
            ref, pt = peak_anon(lambda: torch_encode(torch, W, cfg, pv, grids))
            err = np.abs(out - ref.numpy()).max() / np.abs(ref.numpy()).max()
            print(f"   | torch fp32 {pt / 2**20:7.0f} MiB  {time.perf_counter() - t0:6.1f} s   (max rel. diff "
                  f"{err:.1e})", end="")
        print(flush=True)


if __name__ == "__main__":
    main()
