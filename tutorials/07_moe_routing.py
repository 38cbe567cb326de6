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
# # 07 · MoE routing: which experts each token uses
#
# **What it teaches.** The Moonlight router on real activations: sigmoid scores per expert, the
# selection-only correction bias, the top-k choices of every token as a heat map, the load of each expert,
# the fact that experts nobody chose are never read, and two interventions through a trace edit: forcing
# an expert into every token's choices, and switching the routed experts off.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
#
# **How long.** About 7 s on 2 cores with the demo checkpoint (five short answers); tens of minutes with the
# real one.

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
from pykimi.moe import route_logits

model = pykimi.load(MODEL_DIR)
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
tc = model.config.text
E, k = tc.n_routed_experts, tc.num_experts_per_tok
moe_layers = [i for i in range(tc.num_hidden_layers) if tc.is_moe_layer(i)]
print(f"{E} routed experts, top-{k}, {tc.n_shared_experts} shared; MoE layers {moe_layers}; "
      f"scoring {tc.scoring_func}, method {tc.topk_method}, scale {tc.routed_scaling_factor}")

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %% [markdown]
# One traced forward pass over the prompt records, for every MoE layer, the router's logits, the chosen
# experts (`topk_ids`, sorted), their weights, and the router's decision record (`routing`: scores, choices,
# the margin between the last chosen and the first unchosen expert). We look at the first MoE layer.

# %%
inputs = proc.prepare(scenes.messages_for("Describe the image."), images=[image])
ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"]
is_img = ids == model.config.media_placeholder_token_id                     # [S]
names = ["*.mlp.gate.router_logits", "*.mlp.topk_ids", "*.mlp.topk_weights", "*.mlp.routing"]
with pykimi.trace(model, names=names) as t:
    logits = model.forward(ids, pv, grid)                                   # [S, V]
L1 = moe_layers[0]
p = f"language_model.model.layers.{L1}.mlp"
rec = t.records[p + ".routing"][0]                                          # the router's RoutingRecord
show(router_logits=t[p + ".gate.router_logits"], topk_ids=t[p + ".topk_ids"],
     topk_weights=t[p + ".topk_weights"], scores=rec.scores, margin=rec.topk_margin)

# %% [markdown]
# ## 1. Router scores
#
# `logits = h·W_gᵀ` in fp32, `scores = sigmoid(logits)`: an independent yes/no score per expert (not a
# softmax). The image tokens and the text tokens use the experts differently.

# %%
fig, ax = plt.subplots(figsize=(11, 3))
im = ax.imshow(rec.scores.T, aspect="auto", cmap="viridis", interpolation="nearest")
ax.set_xlabel("token position"); ax.set_ylabel("expert"); plt.colorbar(im, label="sigmoid score")
idx = np.flatnonzero(is_img)
for xline in (idx[0] - 0.5, idx[-1] + 0.5):
    ax.axvline(xline, color="w", ls="--", lw=1.5)
ax.set_title(f"layer {L1}: router scores (image tokens between the dashed lines)"); plt.show()

# %% [markdown]
# ## 2. The correction bias
#
# `e_score_correction_bias` (aux-loss-free load balancing) is added to the scores **for choosing only**;
# the weights use the unbiased scores, normalised to sum 1 and multiplied by `routed_scaling_factor`.
# Routing again with a zero bias shows what it changes.

# %%
bias = model.ckpt.f32(p + ".gate.e_score_correction_bias")                  # [E]
no_bias = route_logits(rec.logits, np.zeros(E, np.float32), tc)
changed = (np.sort(no_bias.topk_ids, 1) != rec.topk_ids).any(axis=1)       # [S]
show(bias=bias)
print(f"tokens whose expert set changes without the bias: {int(changed.sum())} of {len(ids)}")
print("weights per token sum to", np.unique(rec.topk_weights.sum(1).round(3)))
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].bar(range(E), bias); axes[0].set_title("e_score_correction_bias"); axes[0].set_xlabel("expert")
axes[1].bar(np.arange(E) - 0.2, rec.expert_counts(E), 0.4, label="with bias (the model)")
axes[1].bar(np.arange(E) + 0.2, no_bias.expert_counts(E), 0.4, label="without")
axes[1].set_title("tokens per expert"); axes[1].legend(); axes[1].set_xlabel("expert"); plt.show()

# %% [markdown]
# ## 3. The choices per token: a heat map of the routing weights

# %% tags=["thumbnail"]
fig, axes = plt.subplots(len(moe_layers), 1, figsize=(11, 2.2 * len(moe_layers)), squeeze=False)
for ax, l in zip(axes[:, 0], moe_layers):
    r = t.records[f"language_model.model.layers.{l}.mlp.routing"][0]
    M = np.zeros((len(ids), E), np.float32)                                 # [S, E]
    np.put_along_axis(M, r.topk_ids.astype(np.int64), r.topk_weights, axis=1)
    ax.imshow(M.T, aspect="auto", cmap="Greys", interpolation="nearest")
    for xline in (idx[0] - 0.5, idx[-1] + 0.5):
        ax.axvline(xline, color="tab:red", ls="--", lw=1)
    ax.set_ylabel(f"layer {l}\nexpert")
axes[-1, 0].set_xlabel("token position")
plt.suptitle("routing weight of each chosen expert (white: not chosen; image tokens between the red lines)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. Expert load, text vs image tokens

# %%
fig, axes = plt.subplots(1, len(moe_layers), figsize=(3.5 * len(moe_layers), 2.8), squeeze=False)
for ax, l in zip(axes[0], moe_layers):
    r = t.records[f"language_model.model.layers.{l}.mlp.routing"][0]
    img_load = np.bincount(r.topk_ids[is_img].ravel(), minlength=E)
    txt_load = np.bincount(r.topk_ids[~is_img].ravel(), minlength=E)
    ax.bar(range(E), txt_load, label="text"); ax.bar(range(E), img_load, bottom=txt_load, label="image")
    ax.set_title(f"layer {l}"); ax.set_xlabel("expert")
axes[0, 0].legend(); axes[0, 0].set_ylabel("tokens"); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Experts nobody chose are never read
#
# The checkpoint counts reads per tensor. Decode one token: each MoE layer reads exactly the k experts
# that token chose (that is what makes a 16B model usable from a memory-mapped file).

# %%
cache = model.new_cache(capacity=len(ids) + 1)
model.prefill(model.embed(ids, pv, grid), cache, all_logits=False)
model.ckpt.read_counter.clear()
with pykimi.trace(model, names=["*.mlp.topk_ids"]) as td:
    model.decode_step(int(np.argmax(logits[-1])), cache)
for l in moe_layers:
    read = sorted(e for e in range(E)
                  if model.ckpt.read_counter.get(f"language_model.model.layers.{l}.mlp.experts.{e}.gate_proj.weight"))
    chose = td[f"language_model.model.layers.{l}.mlp.topk_ids"][0].tolist()
    print(f"layer {l}: chose {chose}, read {read}")
    assert read == sorted(chose)


# %% [markdown]
# ## 6. Interventions: force an expert, switch the experts off
#
# `pykimi.trace(model, edit={name: fn})` replaces an intermediate with `fn(value)` and lets the new value
# flow on; names may be glob patterns. Editing `mlp.topk_ids` changes the decision itself: the experts run
# are exactly the ids given (with the weights of their slots). We put one expert into every token's
# choices, in its last slot, in the first MoE layer.
#
# (Editing `mlp.gate.router_logits` instead re-runs the selection; but a boosted logit can only push the
# sigmoid score to 1, and a negative correction bias can still keep that expert out.)

# %%
def force(e):
    """An edit of mlp.topk_ids [S, k]: tokens whose choices lack expert e get it in their last slot."""
    def fn(chosen):
        chosen = chosen.copy()
        chosen[~(chosen == e).any(axis=1), -1] = e
        return chosen
    return fn

forced = int(np.argmin(rec.expert_counts(E)))                              # the least used expert
edit = {p + ".topk_ids": force(forced)}                                    # layer L1 only
with pykimi.trace(model, names=[p + ".topk_ids"], edit=edit) as te:
    logits_forced = model.forward(ids, pv, grid)                            # [S, V]
ids_forced = te[p + ".topk_ids"]                                            # recorded after the edit
show(topk_ids_edited=ids_forced)
print(f"expert {forced} was chosen by {rec.expert_counts(E)[forced]} tokens; "
      f"now by {int((ids_forced == forced).any(1).sum())} of {len(ids)}")
print("edited:", sorted(set(te.edited)))
assert (ids_forced == forced).any(1).all()


# %% [markdown]
# How far does that move the model's prediction at each position? The KL divergence between the
# next-token distributions before and after the edit:

# %%
def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

lp, lq = log_softmax(logits), log_softmax(logits_forced)
kl = (np.exp(lp) * (lp - lq)).sum(-1)                                       # [S]
plt.figure(figsize=(10, 2.8)); plt.bar(range(len(ids)), kl, color=np.where(is_img, "tab:red", "tab:blue"))
plt.ylabel("KL(before || after)"); plt.xlabel("position (red: image tokens)")
plt.title(f"how much forcing expert {forced} in layer {L1} moves each next-token distribution"); plt.show()

# %% [markdown]
# Does it change the answer? We encode the image once and generate under different edits (`record=False`:
# edit only, record nothing). Forcing one expert into every token's choices moves the distributions, as
# the plot shows, but this small model still gives the same answer, even with the expert forced in every
# MoE layer (the glob `language_model.model.layers.*.mlp.topk_ids`).

# %%
feats = model.encode_images(pv, grid)                                       # encode once, reuse

def answer(edit=None):
    with pykimi.trace(model, edit=edit or {}, record=False):
        return proc.decode(model.generate(ids, image_features=feats, max_new_tokens=24), skip_special=True)

every = "language_model.model.layers.*.mlp"
print(f"{'unedited':<32} {answer()!r}")
print(f"{f'expert {forced} in layer {L1}':<32} {answer({p + '.topk_ids': force(forced)})!r}")
print(f"{f'expert {forced} in every layer':<32} {answer({every + '.topk_ids': force(forced)})!r}")

# %% [markdown]
# A stronger edit: set the routing weights (`mlp.topk_weights`) to zero, so the routed experts add nothing
# and only the shared expert is left. Now the model sees shapes that are not there: the routed experts
# carry part of what the image tokens tell the answer.

# %%
off = lambda weights: weights * 0                                           # [S, k] -> zeros
print(f"{'routed experts off in layer ' + str(L1):<32} {answer({p + '.topk_weights': off})!r}")
print(f"{'routed experts off everywhere':<32} {answer({every + '.topk_weights': off})!r}")
