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
# # 10 · Thinking models: the markers, the split, the budget
#
# **What it teaches.** How Kimi-VL-A3B-Thinking and -Thinking-2506 write their reasoning between `◁think▷` and
# `◁/think▷` before the answer; how pykimi splits it off (whole text and token by token, with markers split
# across tokens); how `--reasoning-budget` closes the thinking; what the chat template does with earlier turns'
# reasoning; and how pykimi tells the variants apart from their own files.
#
# **What it needs.** pykimi (this repository) with NumPy and matplotlib. By default the bundled demo checkpoint
# (`pykimi.demo_checkpoint()`, a tiny Kimi-VL trained on pictures of coloured shapes), which does *not* think:
# where a thinking model is needed, its first tokens are forced to the start marker, as the tests do. Set
# `PYKIMI_MODEL` to a downloaded Kimi-VL-A3B-Thinking(-2506) directory to see the real thing.
#
# **How long.** About 10 s on 2 cores with the demo checkpoint; minutes with a real thinking checkpoint.

# %%
import os, sys
import numpy as np
import matplotlib.pyplot as plt
# %matplotlib inline
try:
    import pykimi
except ImportError:                      # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.abspath(".."))
    import pykimi

# a downloaded Kimi-VL checkpoint directory named by $PYKIMI_MODEL, else the bundled demo checkpoint
MODEL_DIR = os.environ.get("PYKIMI_MODEL") or os.path.relpath(pykimi.demo_checkpoint())
IS_DEMO = not os.environ.get("PYKIMI_MODEL")
print("checkpoint:", MODEL_DIR)


def show(**arrays):
    """Print the name, shape and dtype of each array (display only)."""
    for k, v in arrays.items():
        v = np.asarray(v)
        print(f"{k:<28} {str(list(v.shape)):<20} {v.dtype}")


# %%
from pykimi.reasoning import THINK_END, THINK_START, ReasoningBudget, split_reasoning
from pykimi.variants import detect_variant

proc = pykimi.Processor.from_pretrained(MODEL_DIR)
model = pykimi.load(MODEL_DIR)
print(detect_variant(MODEL_DIR).summary().replace(MODEL_DIR, "MODEL_DIR"))

# %% [markdown]
# ## The markers are plain text
#
# `◁think▷` and `◁/think▷` are not special ids: the tokenizer spells them with ordinary BPE tokens, and `◁` /
# `▷` are three UTF-8 bytes each. A small vocabulary cuts a marker -- even one character -- over several tokens,
# so nothing can look for "the think token": the split has to work on decoded text.

# %%
tok = proc.tokenizer
for marker in (THINK_START, THINK_END):
    ids = tok.encode(marker)
    print(f"{marker!r}: {len(ids)} tokens {ids}")
    print("   bytes per token:", [tok.token_bytes(i) for i in ids])

# %% [markdown]
# ## Splitting a whole answer
#
# `Processor.split_reasoning(text)` returns `(reasoning, answer)`. No markers: `reasoning` is `None` and the
# answer is the text unchanged. No end marker (the model ran out of tokens while thinking): all reasoning, empty
# answer. A marker in the middle of an answer is just text.

# %%
for text in [f"{THINK_START} Two circles, both red. {THINK_END} There are two red circles.",
             "There are two red circles.",
             f"{THINK_START} Let me count: one, two, thr",
             f"Sure: {THINK_START} is a marker."]:
    print(repr(text), "\n   ->", proc.split_reasoning(text))

# %% [markdown]
# ## Token by token
#
# While streaming, the text arrives a token at a time, and a token may end in the middle of `◁` or of a marker.
# `proc.reasoning_stream()` puts the tokenizer's stream decoder (never half a character) in front of a splitter
# that holds back text that may still turn into a marker. Each token gives zero or more `(kind, text)` pieces.

# %%
text = f"{THINK_START} Two circles, both red. {THINK_END} There are two red circles."
ids = tok.encode(text)
rs = proc.reasoning_stream()
rows = []
for i in ids:
    pieces = rs.add(i)
    rows.append((i, tok.token_bytes(i), pieces, rs.state))
rs.flush()
for i, b, pieces, state in rows[:16]:
    print(f"{i:5d} {str(b):14s} {state:10s} {pieces}")
print("...")
print("reasoning:", repr(rs.reasoning), "\nanswer:   ", repr(rs.answer))
print("equal to the whole-text split:", (rs.reasoning, rs.answer) == proc.split_reasoning(text))
show(ids=ids)

# %% [markdown]
# Each token of that answer, coloured by where the splitter stood after it: still deciding (grey: whitespace
# or a piece of `◁think▷`), inside the reasoning (orange), in the answer (blue). The end marker's tokens sit at
# the border: its text is held back until the last `▷` byte arrives.

# %% tags=["thumbnail"]
colour = {"start": "0.75", "reasoning": "tab:orange", "answer": "tab:blue"}
fig, ax = plt.subplots(figsize=(10, 1.6))
for j, (i, b, pieces, state) in enumerate(rows):
    ax.bar(j, 1, width=1.0, color=colour[state], edgecolor="white")
ax.set_xlim(-0.5, len(rows) - 0.5)
ax.set_yticks([])
ax.set_xlabel("token position in the answer")
ax.set_title("state of the reasoning splitter after each token (grey: undecided, orange: reasoning, blue: answer)",
             fontsize=9)
plt.show()

# %% [markdown]
# ## A reasoning budget
#
# `ReasoningBudget(tokenizer, N).force` is asked before every token; once N tokens were generated inside the
# thinking it returns the end marker's ids, one per step, and the model then answers on its own -- the forced
# ids go through the cache like any other. `pykimi run --reasoning-budget N` does this.
#
# The demo model does not think, so here its first tokens are forced to `◁think▷` (a real thinking checkpoint
# writes it itself).

# %%
from pykimi.generate import generate

prompt = proc.prepare([{"role": "user", "content": "How many shapes are there?"}])["input_ids"]
start_ids, end_ids = tok.encode(THINK_START), tok.encode(THINK_END)
budget = ReasoningBudget(tok, 12)


def force(new):
    b = budget.force(new)                      # the budget sees every id
    return start_ids[len(new)] if len(new) < len(start_ids) else b


new = generate(model, prompt, max_new_tokens=40, force=force)
print("budget:", budget.record.budget, "| forced:", budget.record.forced, "| at token", budget.record.forced_at)
print("ids", budget.record.forced_at, "..", budget.record.forced_at + len(end_ids), "are the end marker:",
      new[budget.record.forced_at:budget.record.forced_at + len(end_ids)] == end_ids)
print(proc.split_reasoning(proc.decode(new, skip_special=True)))

# %% [markdown]
# ## Earlier turns
#
# The Kimi-VL chat template writes `message['content']` and nothing else. A `reasoning_content` field (what the
# server returns, and what `pykimi chat` keeps) never reaches the prompt; reasoning left inside `content` would
# go back verbatim. So `pykimi chat` puts only the answer back as content.

# %%
msgs = [{"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "Two.", "reasoning_content": "I count two circles."},
        {"role": "user", "content": "What colour?"}]
print(proc.apply_chat_template(msgs))

# %% [markdown]
# ## Which checkpoint is this?
#
# `pykimi.variants.detect_variant` reads the directory: the name from config.json (`_name_or_path`), a
# Hugging Face cache path or the model card; the image budget from preprocessor_config.json (Thinking-2506 allows
# four times the patches of the others); sampling defaults from generation_config.json. `pykimi info DIR` prints
# the same.

# %%
v = detect_variant(MODEL_DIR)
print(v.name, "| thinking:", v.thinking, "| image budget:", v.image_token_limit, "patches")
for e in v.evidence:
    print(" -", e.replace(MODEL_DIR, "MODEL_DIR"))
