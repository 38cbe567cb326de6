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
# # 02 · Tokens and the chat template
#
# **What it teaches.** How text becomes ids: the pre-tokenizer regex that cuts text into pieces, byte-level
# BPE inside each piece, the 256 special ids, the Kimi-VL chat template, and the image placeholders the
# processor expands to one id per image token. Then streaming decoding that never cuts a character in half.
#
# **What it needs.** pykimi (this repository) with NumPy, Pillow and matplotlib, and the bundled demo
# checkpoint (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes). Set the
# environment variable `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Instruct directory to run the same cells
# on the real model (weights stay memory-mapped, so it fits in 24 GiB).
# Only the tokenizer file (`tiktoken.model`) and the chat template are read, no weights.
#
# **How long.** About 3 s on 2 cores, with either checkpoint.

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
# The processor bundles the tokenizer (a tiktoken vocabulary of byte-level BPE merges), the chat template
# and the image preprocessing. Only the tokenizer file is read here.

# %%
proc = pykimi.Processor.from_pretrained(MODEL_DIR)
tok = proc.tokenizer
print(tok)
print(f"{tok.n_base} base (BPE) tokens + 256 special ids = {tok.n_vocab} ids")

# %% [markdown]
# ## 1. The pre-tokenizer
#
# Before BPE, a regex cuts the text into pieces; BPE never merges across pieces. Kimi's pattern has eight
# alternatives: runs of Han characters, words (with an optional leading space or punctuation mark and an
# English contraction), numbers of 1-3 digits, punctuation runs, newlines, spaces.
#
# Pitfall (spec §4): the pattern uses `&&`, class intersection. Python's `regex` module understands it
# only with `flags=regex.V1`; without it the letters vanish.

# %%
import regex
from pykimi.tokenizer import KIMI_PAT, KIMI_PAT_ALTERNATIVES

text = "Hello World's 12345 shapes!\n\n  你好世界 don't"
print("V1:", regex.findall(KIMI_PAT, text, flags=regex.V1))
print("V0:", regex.findall(KIMI_PAT, text), " <- wrong")

# %% [markdown]
# Which of the eight alternatives produced each piece:

# %%
named = regex.compile("|".join(f"(?P<a{i}>{alt})" for i, alt in enumerate(KIMI_PAT_ALTERNATIVES)),
                      flags=regex.V1)
labels = ["Han", "word (lower)", "word (upper)", "digits", "punct", "newlines", "spaces (!\\S)", "spaces"]
for m in named.finditer(text):
    i = int(m.lastgroup[1:])
    print(f"  {m.group()!r:<14} alternative {i + 1}: {labels[i]}")

# %% [markdown]
# ## 2. Byte-level BPE
#
# Inside each piece, the UTF-8 bytes start as single-byte tokens (every one of the 256 bytes has a
# rank of its own) and the adjacent pair with the lowest rank is merged, again and again.
# The result: frequent words are one token, rare strings fall back to bytes.

# %%
merges = sorted((r, b) for b, r in tok.mergeable_ranks.items() if len(b) > 1)
print(f"{len(merges)} merged tokens; the first ones learned:", [b for _, b in merges[:12]])
sentence = "A red circle and a blue square. 你好"
ids = tok.encode(sentence)
pieces = [tok.token_bytes(i) for i in ids]
show(ids=ids)
print(list(zip(ids, pieces)))
assert tok.decode(ids) == sentence


# %%
def strip(pieces, title, colors=None):
    """Draw tokens as boxes in a row (a picture of where the token boundaries are)."""
    fig, ax = plt.subplots(figsize=(12, 0.9))
    x = 0.0
    for j, p in enumerate(pieces):
        s = p.decode("utf-8", errors="replace") if isinstance(p, bytes) else str(p)
        w = max(len(s), 1) * 0.6 + 0.4
        c = colors[j] if colors is not None else ("#cde" if j % 2 else "#fdc")
        ax.add_patch(plt.Rectangle((x, 0), w, 1, color=c, ec="k", lw=0.5))
        ax.text(x + w / 2, 0.5, s.replace(" ", "␣").replace("\n", "⏎"), ha="center", va="center",
                fontsize=8)
        x += w
    ax.set_xlim(0, max(x, 1)); ax.set_ylim(0, 1); ax.axis("off"); ax.set_title(title, fontsize=9)
    plt.show()

strip(pieces, f"{len(ids)} tokens for {len(sentence)} characters")


# %% [markdown]
# The merge loop by hand, for one piece: start from bytes, repeatedly merge the adjacent pair whose
# concatenation has the lowest rank, stop when no adjacent pair is in the vocabulary. The result is
# exactly what the tokenizer produces.

# %%
def bpe_steps(piece: bytes):
    ranks = tok.mergeable_ranks
    parts = [bytes([b]) for b in piece]
    steps = [parts]
    while True:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                 if parts[i] + parts[i + 1] in ranks]
        if not cands:
            return steps
        _, i = min(cands)                                   # the lowest rank merges first
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        steps.append(parts)

steps = bpe_steps(" circle".encode())
for st in steps:
    print(st)
assert [tok.mergeable_ranks[b] for b in steps[-1]] == tok.encode(" circle")

# %% [markdown]
# ## 3. Special tokens
#
# The last 256 ids are special: `[BOS]`, `[EOS]`, the chat roles, the media markers, and reserved ids.
# In the real model they are 163584-163839; a small vocabulary keeps the same offsets after its own
# base tokens. They are recognised in text only when asked (`allow_special=True`).

# %%
named_specials = {n: i for n, i in tok.special_ids.items() if not n.startswith("<|reserved")}
for n, i in sorted(named_specials.items(), key=lambda kv: kv[1]):
    print(f"  {i:>7}  {n}")
print("as text   :", tok.encode("<|im_end|>"))
print("as special:", tok.encode("<|im_end|>", allow_special=True))

# %% [markdown]
# ## 4. The chat template
#
# No newlines, no BOS: each message is `<|im_{role}|>role<|im_middle|>content<|im_end|>`. A default
# system turn ("You are a helpful assistant", no final period) is added when the first message is not
# a system message, and the generation prompt `<|im_assistant|>assistant<|im_middle|>` ends the prompt.

# %%
print(proc.apply_chat_template([{"role": "user", "content": "How many shapes are there?"}]))
print()
print(proc.apply_chat_template([
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
]))

# %% [markdown]
# ## 5. Image placeholders
#
# An image part becomes `<|media_start|>image<|media_content|><|media_pad|><|media_end|>`. The processor
# expands that single `<|media_pad|>` into one placeholder id per image token: (gh/2)·(gw/2) for a grid of
# gh×gw patches. Later the model overwrites the embeddings at these positions with the image features.

# %%
from pykimi import scenes

rng = np.random.default_rng(404)               # one of the fixed scenes of tests/test_demo.py
image, shapes = scenes.random_scene(rng)
print("image size (w, h):", image.size)
for s in shapes:
    print("  ", s)
plt.figure(figsize=(3, 2.2)); plt.imshow(image); plt.title("the scene"); plt.xticks([]); plt.yticks([]); plt.show()

# %%
inputs = proc.prepare(scenes.messages_for("How many shapes are there?"), images=[image])
ids = inputs["input_ids"]
show(input_ids=ids, image_grid_hws=inputs["image_grid_hws"])
pad = proc.media_placeholder_token_id
gh, gw = inputs["image_grid_hws"][0]
print(f"{int((ids == pad).sum())} placeholders = ({gh}/2)*({gw}/2)")

# %% tags=["thumbnail"]
kind = np.where(ids == pad, 2, np.where(ids >= tok.n_base, 1, 0))          # [S] 0 text, 1 special, 2 image
W = 32
grid = np.full(((len(ids) + W - 1) // W) * W, -1)
grid[:len(ids)] = kind
cmap = plt.matplotlib.colors.ListedColormap(["white", "#8ecae6", "#ffb703", "#e76f51"])
plt.figure(figsize=(8, 2.5))
plt.imshow(grid.reshape(-1, W), cmap=cmap, vmin=-1, vmax=2)
plt.title("the prompt, 32 ids per row: blue text, yellow special, red image placeholders", fontsize=9)
plt.xticks([]); plt.yticks([]); plt.show()

# %%
print(proc.decode(ids[:40]), "...")

# %% [markdown]
# The number of placeholders must match the images: a mismatch is a one-line error, not a crash later.

# %%
try:
    proc(text="<|media_pad|> and <|media_pad|>", images=[image])
except pykimi.InputError as e:
    print("InputError:", e)

# %% [markdown]
# ## 6. Streaming decoding
#
# When tokens are printed as they are generated, a character can be split across tokens (byte-level BPE:
# `中` is 3 UTF-8 bytes). The stream decoder holds incomplete bytes back until the character is whole.

# %%
ids = tok.encode("ok 中文")
dec = tok.stream_decoder()
for i in ids:
    out = dec.add(i)
    print(f"id {i:>4} bytes {tok.token_bytes(i)!r:<16} -> emits {out!r:<6} pending {dec.pending!r}")
print("flush:", repr(dec.flush()))

# %% [markdown]
# Generation stops at either of two special ids: `[EOS]` (the config's `eos_token_id`) and `<|im_end|>`,
# which ends every assistant turn (notebook 08).

# %%
print("stop ids:", proc.stop_ids, [tok.decode([i]) for i in proc.stop_ids])
