"""Golden parity of the language model (issue 5): every LM tensor of every golden case, the top-k ids exactly,
greedy ids token for token, for the bf16 checkpoint and an f32 copy of it.

The image cases run twice: with the golden projector output fed as ``image_features`` (tests the LM alone)
and, when pykimi.vision is importable, end to end from pixel_values.
"""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import CASES, GOLDEN, TINY

import pykimi
from pykimi.model import KimiVL, load
from pykimi.trace import Trace

LM_PREFIXES = ("inputs_embeds", "language_model.", "logits")


def _vision_available() -> bool:
    try:
        from pykimi.vision import VisionTower  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def f32_dir(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("tiny-f32"))
    try:
        from pykimi.testing import convert_checkpoint
        convert_checkpoint(TINY, dst, dtype="F32")
    except ImportError:  # fallback: rebuild the copy with the safetensors package
        import shutil
        from safetensors.numpy import save_file
        from pykimi.weights import Checkpoint
        ck = Checkpoint.open(TINY)
        save_file({n: ck.f32(n) for n in ck.names()}, os.path.join(dst, "model.safetensors"))
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(os.path.join(TINY, f), dst)
    return dst


@pytest.fixture(scope="module", params=["bf16", "f32"])
def model(request, f32_dir) -> KimiVL:
    return load(TINY if request.param == "bf16" else f32_dir)


def case_data(case):
    d = os.path.join(GOLDEN, case)
    with open(os.path.join(d, "manifest.json")) as fh:
        manifest = json.load(fh)
    return (load_file(os.path.join(d, "inputs.safetensors")), load_file(os.path.join(d, "golden.safetensors")),
            manifest)


def rel_err(a, g) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - g)) / max(np.max(np.abs(g)), 1e-30))


def check_tensor(name, got, gold, tol, failures, errors=None):
    """Append a readable failure (name, err, first mismatching index, values) when out of tolerance."""
    if got.shape != gold.shape:
        failures.append(f"{name}: shape {got.shape} != golden {gold.shape}")
        return
    if gold.dtype.kind in "iu":
        if not np.array_equal(got, gold):
            idx = tuple(int(i) for i in np.argwhere(got != gold)[0])
            failures.append(f"{name}: ids differ first at {idx}: got {got[idx[0]]}, golden {gold[idx[0]]}")
        return
    err = rel_err(got, gold)
    if errors is not None:
        errors[name] = err
    if err > tol:
        scale = np.max(np.abs(gold))
        bad = np.argwhere(np.abs(got - gold) > tol * scale)[0]
        idx = tuple(int(i) for i in bad)
        failures.append(f"{name}: err {err:.3g} > {tol:g}; first mismatch at {idx}: got {got[idx]!r}, "
                        f"golden {gold[idx]!r}")


def tol_of(manifest, name):
    return manifest["tensors"][name]["tolerance"].get("rel", 0.0)  # ids: exact


def run_case(model, case, use_pixels):
    inputs, gold, manifest = case_data(case)
    kw = {}
    if "pixel_values" in inputs:
        if use_pixels:
            kw = dict(pixel_values=inputs["pixel_values"], image_grid_hws=inputs["image_grid_hws"])
        else:
            kw = dict(image_features=gold["multi_modal_projector"])
    with Trace(model) as t:
        logits = model.forward(inputs["input_ids"], **kw)
    return inputs, gold, manifest, t, logits, kw


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_pixels", [False, True], ids=["lm", "e2e"])
def test_forward_matches_golden(model, case, use_pixels):
    if use_pixels and case == "text_only":
        pytest.skip("no images: text_only is fully covered by the lm run")
    if use_pixels and not _vision_available():
        pytest.skip("end-to-end run needs pykimi.vision")
    inputs, gold, manifest, t, logits, _ = run_case(model, case, use_pixels)
    failures, errors = [], {}
    checked = 0
    for name, g in gold.items():
        if name in ("greedy_ids", "greedy_step_logits"):
            continue
        if not use_pixels and not name.startswith(LM_PREFIXES):
            continue
        assert name in t, f"{name} was not emitted by the model"
        check_tensor(name, t[name], g, tol_of(manifest, name), failures, errors)
        checked += 1
    check_tensor("forward() return", logits, gold["logits"], tol_of(manifest, "logits"), failures)
    worst = max(errors.items(), key=lambda kv: kv[1])
    print(f"{case}: {checked} tensors, worst {worst[0]} err {worst[1]:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", CASES)
def test_greedy_ids_and_step_logits(model, case):
    inputs, gold, manifest = case_data(case)
    kw = {}
    if "pixel_values" in inputs:
        kw = dict(image_features=gold["multi_modal_projector"])
    with Trace(model, names=["logits"]) as t:
        ids = model.generate(inputs["input_ids"], max_new_tokens=8, stop_ids=[], **kw)
    assert ids == gold["greedy_ids"].tolist()
    steps = np.concatenate(t.all("logits"), axis=0)                   # prefill last row + 7 decode steps
    failures = []
    check_tensor("greedy_step_logits", steps, gold["greedy_step_logits"],
                 tol_of(manifest, "greedy_step_logits"), failures)
    assert not failures, "\n".join(failures)
    # the default stop ids do not cut the golden continuation short (no stop token in it)
    assert model.generate(inputs["input_ids"], max_new_tokens=8, **kw) == ids


def test_cached_decode_equals_recompute():
    """Every cached (absorbed-MLA) decode step gives the logits of a full recompute of the sequence."""
    model = load(TINY)
    inputs, gold, manifest = case_data("text_only")
    prompt = inputs["input_ids"]
    with Trace(model, names=["logits"]) as t:
        ids = model.generate(prompt, max_new_tokens=8, stop_ids=[])
    steps = t.all("logits")
    tol = tol_of(manifest, "logits")
    for j in range(len(ids)):
        full = model.forward(np.concatenate([prompt, np.array(ids[:j], dtype=np.int64)]))[-1]
        err = rel_err(steps[j][0], full)
        assert err <= tol, f"step {j}: cached vs recompute err {err:.3g}"


def test_public_load_entry_point():
    m = pykimi.load(TINY, max_context=100)
    assert isinstance(m, KimiVL) and m.context_limit == 100
    assert m.config.text.hidden_size == 64 and m.ckpt.path


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_greedy_from_pixels(case):
    if not _vision_available():
        pytest.skip("needs pykimi.vision")
    inputs, gold, _ = case_data(case)
    ids = load(TINY).generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                              max_new_tokens=8, stop_ids=[])
    assert ids == gold["greedy_ids"].tolist()


# -- the bf16 latent cache (--cache-dtype bf16): a stated error bound against the same goldens ----------------
# Rounding a cached value to bf16 (8 significant bits, round to nearest even) moves it by at most half a step:
# relative 2^-8 (= 3.9e-3; 1.4e-3 on average). Those errors enter the residual stream only through the attention
# outputs, as softmax-weighted sums of many independently rounded values, so they partly cancel: measured on
# the three golden cases, the logits of every position whose routing is unchanged move by at most 2.6e-3 of
# max|logit| (0.68 × 2^-8; f32 cache: 6e-7), the decode steps' logits by at most 1.5e-3. The bound asserted
# is 2^-8 for both. A routing flip moves its position by O(1) and is allowed only at a router near-tie (golden
# topk_margin < 1e-4: text_only layer 2 position 25, margin 2.6e-5, the README's smallest); every other
# routing and every greedy id must stay the golden one.
BF16_CACHE_BOUND = 2.0 ** -8
NEAR_TIE = 1e-4


def rerouted(t, gold, S: int, near_tie: float, where: str) -> np.ndarray:
    """bool[S]: positions whose routed experts (the trace t's .mlp.topk_ids) differ from the golden ones (or another
    trace's) in any layer; fails, naming layer and position, where one moved at a reference router margin >=
    near_tie (not a near-tie: a real routing difference, not rounding)."""
    flipped = np.zeros(S, bool)
    for name in gold:
        if name.endswith(".mlp.topk_ids"):
            moved = (t[name] != gold[name]).any(axis=1)
            margin = gold[name.replace("topk_ids", "topk_margin")]
            bad = np.flatnonzero(moved & (margin >= near_tie))
            assert bad.size == 0, (f"{where} {name}: routing moved at position {int(bad[0])} (golden margin "
                                   f"{float(margin[bad[0]]):.2g} >= {near_tie:g}: not a near-tie)")
            flipped |= moved
    return flipped


@pytest.mark.parametrize("case", CASES)
def test_bf16_cache_within_stated_bound(case):
    inputs, gold, manifest = case_data(case)
    kw = {}
    if "pixel_values" in inputs:
        kw = dict(image_features=gold["multi_modal_projector"])
    model = load(TINY, cache_dtype="bf16")
    with Trace(model) as t:
        logits = model.forward(inputs["input_ids"], **kw)
    S = logits.shape[0]
    flipped = rerouted(t, gold, S, NEAR_TIE, case)
    keep = ~flipped
    assert keep.sum() >= S - 1, f"{case}: {int(flipped.sum())} positions re-routed"
    scale = np.max(np.abs(gold["logits"]))
    err_pos = np.max(np.abs(logits - gold["logits"]), axis=1) / scale           # per position
    worst = int(np.argmax(np.where(keep, err_pos, -1)))
    assert err_pos[worst] <= BF16_CACHE_BOUND, (
        f"{case}: bf16 cache logits err {err_pos[worst]:.3g} > 2^-8 = {BF16_CACHE_BOUND:.3g} at position {worst} "
        f"(vocab index {int(np.argmax(np.abs(logits[worst] - gold['logits'][worst])))})")
    assert err_pos[keep].max() > 1e-5, f"{case}: no bf16 rounding visible -- is the cache really bf16?"
    with Trace(model, names=["logits"]) as t2:
        ids = model.generate(inputs["input_ids"], max_new_tokens=8, stop_ids=[], **kw)
    assert ids == gold["greedy_ids"].tolist(), f"{case}: greedy ids {ids} != golden {gold['greedy_ids'].tolist()}"
    steps = np.concatenate(t2.all("logits"), axis=0)
    err = rel_err(steps, gold["greedy_step_logits"])
    assert err <= BF16_CACHE_BOUND, f"{case}: bf16 cache decode-step logits err {err:.3g} > 2^-8"
    print(f"{case}: bf16 cache logits err {err_pos[keep].max():.3g} ({int(flipped.sum())} re-routed at a "
          f"near-tie), decode steps {err:.3g}")
