# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The checkpoint: safetensors, memory mapping, bf16, parameter counts
#
# **What it teaches.** What is in a Kimi-VL checkpoint and how pykimi reads it without loading it: the
# safetensors header, zero-copy memory-mapped views, the bf16 → float32 widening (a 16-bit shift), and how
# many parameters the real model has in total versus how many one token uses.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
# The parameter counts of the real model come from its config.json, which ships with
# pykimi (`pykimi/data/reference_config.json`), so they need no download.
#
# **How long.** About 3 s on 2 cores, with either checkpoint (only headers and a few small tensors are read).

# %%
import os, sys, time
import numpy as np
import matplotlib.pyplot as plt
# %matplotlib inline
try:
    import pykimi
except ImportError:                      # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(".."))
    import pykimi

# a downloaded Kimi-VL-A3B-Instruct directory named by $PYKIMI_MODEL, else the bundled demo checkpoint
MODEL_DIR = os.environ.get("PYKIMI_MODEL") or os.path.relpath(pykimi.demo_checkpoint())
IS_DEMO = not os.environ.get("PYKIMI_MODEL")
print("checkpoint:", MODEL_DIR)


def show(**arrays):
    """Print the name, shape and dtype of each array (display only)."""
    for k, v in arrays.items():
        v = np.asarray(v)
        print(f"{k:<28} {str(list(v.shape)):<20} {v.dtype}")


# %% [markdown]
# ## 1. Open the checkpoint
#
# `pykimi.Checkpoint.open` reads `config.json`, the shard index and each file's header. It reads no
# weights.

# %% tags=["timing"]
t0 = time.perf_counter()
ckpt = pykimi.Checkpoint.open(MODEL_DIR)
files = sorted({ckpt.info(n).file for n in ckpt.names()})
print(f"opened in {1e3 * (time.perf_counter() - t0):.1f} ms: {len(ckpt)} tensors in {len(files)} file(s), "
      f"{ckpt.total_bytes() / 1e6:.1f} MB of weights")
for f in files:
    print("  ", os.path.basename(f), f"{os.path.getsize(f) / 1e6:.1f} MB")

# %% [markdown]
# ## 2. The safetensors format, by hand
#
# A safetensors file is: 8 bytes (little-endian length `n`), `n` bytes of JSON, then the raw data. The
# JSON maps each tensor name to its dtype, shape and `[begin, end)` byte offsets in the data region.

# %%
import json, struct

with open(files[0], "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
meta = header.pop("__metadata__", {})
print(f"{os.path.basename(files[0])}: header of {n} bytes, {len(header)} tensors, metadata {meta}")
for name in list(header)[:6]:
    print(f"  {name:<58} {header[name]}")

# %% [markdown]
# ## 3. Memory mapping: a view, not a copy
#
# `ckpt.get(name)` returns a NumPy array that *is* the bytes of the file, mapped into memory by the OS.
# It owns no memory and is read-only; pages are read from disk only when touched. This is why the 32.8 GB
# real checkpoint opens instantly on a 24 GiB machine.

# %%
name = "language_model.model.layers.0.self_attn.kv_b_proj.weight"
info = ckpt.info(name)
raw = ckpt.get(name)
show(raw=raw)
print("stored dtype:", info.dtype, "| bytes:", info.nbytes, "| file offset:", info.offset)
print("owns its memory:", raw.flags.owndata, "| writeable:", raw.flags.writeable)

# %% [markdown]
# ## 4. The bf16 trick
#
# bfloat16 is the top half of a float32: same sign bit, same 8 exponent bits, 7 of the 23 mantissa bits.
# So widening is exact and needs no arithmetic: take the 16 bits as `uint16`, shift left by 16 into a
# `uint32`, and read those bits as `float32`. pykimi does this in tiles or inside the kernels, never for
# the whole model at once.

# %%
from pykimi.weights import bf16_to_f32, f32_to_bf16

bits = np.ascontiguousarray(raw.reshape(-1)[:4])                   # uint16 if the file is bf16
print("stored dtype:", info.dtype, "| raw view dtype:", raw.dtype)
if info.dtype == "BF16":
    by_hand = (bits.astype(np.uint32) << 16).view(np.float32)     # [4]
    print("bits     :", [f"{b:016b}" for b in bits])
    print("by hand  :", by_hand)
    print("pykimi   :", bf16_to_f32(bits))
    print("ckpt.f32 :", ckpt.f32(name).reshape(-1)[:4])

# %% [markdown]
# The 32 bits of one value: what bf16 keeps (left) and what it drops (right).

# %%
x = np.float32(-0.15625 * 3.3)
b32 = np.array([x]).view(np.uint32)[0]
row = np.array([(b32 >> (31 - i)) & 1 for i in range(32)])[None, :]     # [1, 32]
colors = np.array([0] + [1] * 8 + [2] * 23)[None, :]                   # sign, exponent, mantissa
fig, ax = plt.subplots(figsize=(10, 1.4))
ax.imshow(colors, cmap="Pastel1", aspect="auto", vmin=0, vmax=8)
for i, bit in enumerate(row[0]):
    ax.text(i, 0, str(bit), ha="center", va="center", fontsize=9)
ax.axvline(15.5, color="k", lw=2)
ax.set_yticks([]); ax.set_xticks([0, 4.5, 20])
ax.set_xticklabels(["sign", "exponent (8)", "mantissa (23): bf16 keeps 7, drops 16 ->"])
ax.set_title(f"float32 {x:.6f}  ->  bf16 {bf16_to_f32(f32_to_bf16(np.array([x])))[0]:.6f}")
plt.show()

# %% [markdown]
# Going the other way (float32 → bf16, e.g. when writing a checkpoint) rounds to nearest-even. The
# relative error is at most 2⁻⁸ ≈ 0.4 %: bf16 keeps the range of float32 but only about 3 decimal digits.

# %%
x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)   # [100000]
y = bf16_to_f32(f32_to_bf16(x))                                            # [100000]
rel = np.abs(y - x) / np.abs(x)
show(x=x, y=y)
print(f"max relative error {rel.max():.5f} (bound 2^-8 = {2.0 ** -8:.5f})")
plt.figure(figsize=(6, 2.5)); plt.hist(rel, bins=100); plt.yscale("log")
plt.xlabel("|bf16(x) - x| / |x|"); plt.title("bf16 rounding error of 100k normal samples"); plt.show()

# %% [markdown]
# `ckpt.f32(name)` is the widened float32 copy of one tensor (the kernels widen tile by tile instead).
# Trained weights are small and centred on zero:

# %%
w = ckpt.f32(name)                                                 # [out, in] float32 copy
show(kv_b_proj=w)
plt.figure(figsize=(6, 2.5)); plt.hist(w.ravel(), bins=200)
plt.title(name.split("model.")[-1] + " values"); plt.show()


# %% [markdown]
# ## 5. Where the bytes are
#
# Sum the header sizes by component. In an MoE model nearly everything is routed experts.

# %%
def component(n):
    if n.startswith("vision_tower."): return "vision tower"
    if n.startswith("multi_modal_projector."): return "projector"
    if ".mlp.experts." in n: return "routed experts"
    if "embed_tokens" in n or "lm_head" in n: return "embedding + lm_head"
    return "LM attention, norms, dense/shared FFN"

by = {}
for n in ckpt.names():
    by[component(n)] = by.get(component(n), 0) + ckpt.info(n).nbytes
for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
    print(f"  {k:<40} {v / 1e6:10.2f} MB")
plt.figure(figsize=(5, 5)); plt.pie(list(by.values()), labels=list(by), autopct="%1.0f%%")
plt.title("bytes by component (this checkpoint)"); plt.show()

# %% [markdown]
# ## 6. Parameter counts of the real Kimi-VL-A3B-Instruct
#
# `KimiVLConfig.param_counts()` derives every count from the config alone. The released config.json
# ships with pykimi as `pykimi/data/reference_config.json`: 27 MoonViT blocks, 27 decoder layers (1
# dense + 26 MoE with 64 routed experts, top-6, and 2 shared experts).

# %%
ref_path = os.path.relpath(os.path.join(os.path.dirname(pykimi.__file__), "data", "reference_config.json"))
real = pykimi.load_config(ref_path)
pc = real.param_counts()
for k, v in pc.items():
    print(f"  {k:<16} {v / 1e9:8.3f} B")
print()
print(real.summary().replace(real.path, os.path.dirname(ref_path)))      # the path as given, not absolute

# %% [markdown]
# "A3B": about 3 billion parameters active per token, out of 16.4 billion. Each token goes through the
# attention, the dense/shared FFNs and 6 of the 64 experts in each MoE layer (the embedding contributes
# one row, lm_head all of it).

# %% tags=["thumbnail"]
lm_common = pc["language"] - pc["routed_experts"]          # everything in the LM but routed experts
stored = {"vision + projector": pc["vision"] + pc["projector"], "LM (not routed experts)": lm_common,
          "routed experts": pc["routed_experts"]}
used = {"vision + projector": 0, "LM (not routed experts)": lm_common, "routed experts": pc["routed_active"]}
fig, ax = plt.subplots(figsize=(6, 3))
left = np.zeros(2)
for k, c in zip(stored, ["tab:orange", "tab:blue", "tab:green"]):
    vals = np.array([stored[k], used[k]]) / 1e9
    ax.barh(["stored", "per text token"], vals, left=left, label=k, color=c)
    left += vals
ax.set_xlabel("billion parameters"); ax.legend(fontsize=8); ax.set_title("total vs active")
plt.tight_layout(); plt.show()

# %% [markdown]
# Decoding one token reads every active weight once, so memory bandwidth bounds the speed: the bytes of
# the active weights per token (bf16: 2 bytes each) over the bytes per second the memory delivers.

# %%
V, H = real.text.vocab_size, real.text.hidden_size
per_token = (pc["active_no_embed"] + V * H) * 2          # bf16 bytes read per decoded token
print(f"bytes of weights read per decoded token (bf16, one embedding row): {per_token / 1e9:.2f} GB"
      f" -> at 20 GB/s of memory bandwidth, at most {20e9 / per_token:.1f} tokens/s")

# %% [markdown]
# ## 7. The one table of tensor names
#
# `pykimi.layout.expected_tensors(config)` lists every tensor name and shape the model reads, derived
# from the config. For the real config it regenerates all 5679 names of the released checkpoint; for
# this checkpoint it should match the file exactly.

# %%
from pykimi.layout import expected_tensors

print("real model:", len(expected_tensors(real)), "tensors")
want = dict(expected_tensors(ckpt.config))
missing = sorted(set(want) - set(ckpt.names()))
wrong = [n for n in want if n in ckpt and tuple(ckpt.info(n).shape) != tuple(want[n])]
print(f"this checkpoint: {len(want)} expected, {len(missing)} missing, {len(wrong)} with a wrong shape")
