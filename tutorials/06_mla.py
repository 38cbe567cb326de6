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
# # 06 · MLA: multi-head latent attention
#
# **What it teaches.** DeepSeek-V3's attention as the Moonlight LM uses it, one step at a time on layer 0: the
# queries, the compressed latent `c` and the shared rotary key `k_pe`; the expanded form (prefill) that
# rebuilds per-head keys and values; the absorbed form (decode) that folds `kv_b_proj` into the query and
# the output and attends directly over the latent cache, checked equal to the expanded form; and what the
# latent cache saves for the real model.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 5 s on 2 cores with the demo checkpoint; several minutes with the real one (two forward
# passes).

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


# %%
from pykimi import attention as mla
from pykimi.cache import LatentCache

model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
tc = model.config.text
H, dn, dr, dv, R = (tc.num_attention_heads, tc.qk_nope_head_dim, tc.qk_rope_head_dim, tc.v_head_dim,
                    tc.kv_lora_rank)
print(f"{H} heads; q/k = {dn} (no position) + {dr} (rotary) = {dn + dr}; v = {dv}; latent rank {R}; "
      f"hidden {tc.hidden_size}")

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# The input of layer 0's attention: the prompt's embeddings (image features merged in, notebook 05) after
# the layer's RMSNorm. `model.layer_weights(0)` holds the layer's weights under their checkpoint names;
# `lw.attn` is what the attention stage functions take.

# %%
inputs = proc.prepare(scenes.messages_for("How many shapes are there?"), images=[image])
ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
x = model.embed(ids, pv, grid)                                  # [S, D] inputs_embeds
S = len(ids)
positions = np.arange(S)
lw = model.layer_weights(0)
w = lw.attn                                                     # MLAWeights of layer 0
h = mla.rms_norm(x, lw.input_layernorm, tc.rms_norm_eps)        # [S, D] the attention's input
show(inputs_embeds=x, h=h)
prefix = "language_model.model.layers.0.self_attn."
for k in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
    print(f"  self_attn.{k + '.weight':<29} {list(model.ckpt.info(prefix + k + '.weight').shape)}")

# %% [markdown]
# ## 1. Projections
#
# * `q = q_proj(h)` → `[S, H, dn + dr]`, split into `q_nope` and `q_pe` (no q-LoRA in this model);
# * `kv_a_proj_with_mqa(h)` → `[S, R + dr]`: the latent `c` (then RMSNorm with eps 1e-6) and **one**
#   rotary key `k_pe` shared by all heads;
# * RoPE on `q_pe` and `k_pe` (interleaved pairs, θ from the config).
#
# Only `c` and `k_pe` need to be cached: `R + dr` numbers per token per layer.

# %%
q_nope, q_pe, c, k_pe = mla.mla_project(h, w, positions, tc)
show(q_nope=q_nope, q_pe=q_pe, c=c, k_pe=k_pe)

# %% [markdown]
# ## 2. The expanded form (prefill)
#
# `kv_b_proj` (`[H·(dn+dv), R]`) expands every cached latent into per-head `k_nope` and `v`. Scores are
# `(q_nope·k_nope + q_pe·k_pe) / sqrt(dn + dr)`, causal, softmax in fp32.

# %%
kvb = model.ckpt.f32(prefix + "kv_b_proj.weight")                          # [H*(dn+dv), R]
kv = (c @ kvb.T).reshape(S, H, dn + dv)                                   # [S, H, dn+dv]
k_nope, v = kv[..., :dn], kv[..., dn:]                                    # [S, H, dn], [S, H, dv]
scale = (dn + dr) ** -0.5
scores = (np.einsum("shd,thd->hst", q_nope, k_nope)
          + np.einsum("shd,td->hst", q_pe, k_pe)) * scale                # [H, S, S]
scores[:, np.triu(np.ones((S, S), bool), 1)] = -np.inf                    # causal mask
p = mla.softmax(scores)                                                   # [H, S, S]
o = np.einsum("hst,thd->shd", p, v).reshape(S, H * dv)                    # [S, H*dv]
out_expanded = o @ model.ckpt.f32(prefix + "o_proj.weight").T             # [S, D]
show(kv_b_proj=kvb, k_nope=k_nope, v=v, scores=scores, probs=p, out=out_expanded)

# %%
cache = LatentCache.for_config(tc, capacity=S)
out_lib = mla.mla_prefill(h, w, cache, 0, positions, tc)                  # [S, D]
show(mla_prefill=out_lib, cache_rows=cache.rows(0))
print("by hand == pykimi.attention.mla_prefill:", np.allclose(out_expanded, out_lib, atol=1e-5))

# %% tags=["thumbnail"]
pad = model.config.media_placeholder_token_id
img = np.flatnonzero(ids == pad)
cols = min(H, 4)
fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.3))
for hh, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(np.log10(p[hh] + 1e-6), cmap="viridis", vmin=-4, vmax=0)
    for xline in (img[0] - 0.5, img[-1] + 0.5):
        ax.axvline(xline, color="r", ls="--", lw=0.8)
    ax.set_title(f"head {hh}", fontsize=9); ax.set_xlabel("key"); ax.set_ylabel("query")
plt.suptitle("layer 0 attention (log10 p); image-token keys between the red lines"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. The absorbed form (decode)
#
# Split `kv_b_proj` per head into `W_uk [dn, R]` and `W_uv [dv, R]`. Then
# `q_nope·k_nope = q_nope·(W_uk c) = (W_ukᵀ q_nope)·c`: map the *query* into latent space once
# (`q_lat`, R numbers per head) and score it directly against the cached latents. Likewise
# `Σ p·v = W_uv (Σ p·c)`. Nothing of size `positions × heads × (dn + dv)` is ever built.

# %%
Wkv = kvb.reshape(H, dn + dv, R)
W_uk, W_uv = Wkv[:, :dn], Wkv[:, dn:]                                     # [H, dn, R], [H, dv, R]
q_lat = np.einsum("shd,hdr->shr", q_nope, W_uk)                           # [S, H, R]
scores_abs = (np.einsum("shr,tr->hst", q_lat, c)
              + np.einsum("shd,td->hst", q_pe, k_pe)) * scale            # [H, S, S]
scores_abs[:, np.triu(np.ones((S, S), bool), 1)] = -np.inf
p_abs = mla.softmax(scores_abs)
o_lat = np.einsum("hst,tr->shr", p_abs, c)                                # [S, H, R]
o_abs = np.einsum("shr,hdr->shd", o_lat, W_uv).reshape(S, H * dv)         # [S, H*dv]
show(W_uk=W_uk, W_uv=W_uv, q_lat=q_lat, o_lat=o_lat)
def rel_err(a, b):
    """max |a - b| / max |b|: the scale-relative error (the digits below 1e-6 are float32 round-off, and
    differ between kernel backends, so we print bounds)."""
    return float(np.abs(a - b).max() / np.abs(b).max())

finite = np.isfinite(scores)
print("scores: absorbed == expanded (relative error < 1e-5):", rel_err(scores_abs[finite], scores[finite]) < 1e-5)
print("output: absorbed == expanded (relative error < 1e-5):", rel_err(o_abs, o) < 1e-5)
assert rel_err(o_abs, o) < 1e-4

# %% [markdown]
# pykimi's decode path does the same over the cache: `mla_decode` on the last token, after `mla_prefill`
# of the others, equals the last row of the expanded form.

# %%
cache = LatentCache.for_config(tc, capacity=S)
mla.mla_prefill(h[:-1], w, cache, 0, positions[:-1], tc)
last = mla.mla_decode(h[-1:], w, cache, 0, positions[-1:], tc)            # [1, D]
show(decode_out=last)
print("mla_decode == the expanded form's last row (relative error < 1e-5):",
      rel_err(last[0], out_expanded[-1]) < 1e-5)
assert rel_err(last[0], out_expanded[-1]) < 1e-4

# %% [markdown]
# And for the whole model: prefill all but the last token into a cache, then one `decode_step` gives the
# logits of a full forward pass at the last position.

# %%
full = model.forward(ids, pv, grid)                                       # [S, V]
kv_cache = model.new_cache(capacity=S)
model.prefill(x[:-1], kv_cache, all_logits=False)
step = model.decode_step(int(ids[-1]), kv_cache)                          # [V]
show(forward_logits=full, decode_step_logits=step)
print("decode_step == forward's last row (relative error < 1e-5):", rel_err(step, full[-1]) < 1e-5,
      "| same argmax:", int(step.argmax()) == int(full[-1].argmax()))
assert rel_err(step, full[-1]) < 1e-3

# %% [markdown]
# ## 4. The latent cache vs a full KV cache (real model)
#
# A standard cache keeps per layer, per token, the keys `H·(dn + dr)` and values `H·dv` of every head.
# The latent cache keeps `R + dr`: for Kimi-VL, 576 instead of 5120 numbers, 8.9× less.

# %%
ref_path = os.path.join(os.path.dirname(pykimi.__file__), "data", "reference_config.json")   # shipped
real = pykimi.load_config(ref_path).text
latent = LatentCache.for_config(real, capacity=1).bytes_per_token()        # f32 bytes / token, all layers
full_kv = real.num_hidden_layers * real.num_attention_heads * (real.qk_head_dim + real.v_head_dim) * 4
print(f"real model, f32: latent {latent:,} B/token, full KV {full_kv:,} B/token ({full_kv / latent:.1f}x)")
ctx = np.array([1_000, 4_000, 16_000, 32_000, 64_000, 131_072])
plt.figure(figsize=(6, 3))
plt.plot(ctx, ctx * latent / 2 ** 30, "o-", label="latent cache (pykimi)")
plt.plot(ctx, ctx * full_kv / 2 ** 30, "o-", label="full K/V cache")
plt.axhline(24, color="gray", ls="--", label="24 GiB machine")
plt.xlabel("context (tokens)"); plt.ylabel("GiB (float32)"); plt.legend(); plt.title("KV cache size")
plt.show()

# %% [markdown]
# What absorbing saves in work: per decoded token and layer, the expanded form re-expands every cached
# latent (work that grows with the context times `H·(dn+dv)·R`); the absorbed form maps the query once and
# scores against the latents directly.

# %%
Hr, dnr, dvr, Rr, drr = (real.num_attention_heads, real.qk_nope_head_dim, real.v_head_dim, real.kv_lora_rank,
                         real.qk_rope_head_dim)
N = np.arange(1, 32_001, 500)
expanded = N * Rr * Hr * (dnr + dvr) + N * Hr * (dnr + drr) + N * Hr * dvr          # expand, score, mix
absorbed = Hr * dnr * Rr + N * Hr * (Rr + drr) + N * Hr * Rr + Hr * Rr * dvr       # q_lat, score, mix, W_uv
plt.figure(figsize=(6, 3))
plt.plot(N, expanded / 1e6, label="expanded (re-expand the cache)")
plt.plot(N, absorbed / 1e6, label="absorbed")
plt.xlabel("cached tokens"); plt.ylabel("million multiply-adds"); plt.legend()
plt.title("one decode step, one layer (real model)"); plt.show()
