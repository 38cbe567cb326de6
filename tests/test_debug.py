"""The debugging API on the real model: compare/diff name the first divergence of a planted bug, and
interventions change what is downstream of the edit and nothing upstream."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykimi
from conftest import GOLDEN, ROOT, TINY
from pykimi.debug import compare, golden_tolerances
from pykimi.weights import Checkpoint

CASE = os.path.join(GOLDEN, "two_images")


def inputs(case=CASE):
    ck = Checkpoint.open(os.path.join(case, "inputs.safetensors"))
    return {n: np.array(ck.get(n)) for n in ck.names()}


@pytest.fixture(scope="module")
def model():
    return pykimi.load(TINY)


def traced(model, **kw):
    inp = inputs()
    with pykimi.trace(model, **kw) as t:
        model.forward(inp["input_ids"], pixel_values=inp["pixel_values"], image_grid_hws=inp["image_grid_hws"])
    return t


def swapped_rope(gh, gw, head_dim, theta=10000.0):
    """The planted bug: x and y exchanged (pair 2i by row, 2i+1 by column)."""
    from pykimi.rope import vision_rope_angles

    right = vision_rope_angles(gh, gw, head_dim, theta)        # pair 2i: column, 2i+1: row
    return right[:, [j ^ 1 for j in range(head_dim // 2)]]    # pair 2i: row, 2i+1: column


def test_clean_run_agrees_with_golden(model):
    rep = compare(traced(model), CASE, tolerances=golden_tolerances(CASE))
    print(rep.format())
    assert rep.ok and len(rep.rows) >= 25


def test_planted_rope_bug_first_divergence(model, monkeypatch, tmp_path):
    import pykimi.vision as V

    monkeypatch.setattr(V, "vision_rope_angles", swapped_rope)
    t = traced(model)
    rep = compare(t, CASE, tolerances=golden_tolerances(CASE))
    print(rep.format())
    first = rep.first_divergence
    assert first is not None and first.name == "vision_tower.encoder.blocks.0", first
    assert first.first_bad is not None
    # everything before it still agrees
    names = [r.name for r in rep.rows]
    assert all(r.ok for r in rep.rows[: names.index(first.name)])
    assert "vision_tower.patch_embed" in names[: names.index(first.name)]
    # and the command line says the same from a saved dump
    dump = str(tmp_path / "bug.safetensors")
    t.save(dump)
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pykimi.cli", "diff", dump, CASE], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "first divergence: vision_tower.encoder.blocks.0 " in r.stdout
    assert "FIRST DIVERGENCE" in r.stdout and "first mismatch at index" in r.stdout


def test_edit_zero_attention_changes_downstream_only(model):
    base = traced(model)
    name = "language_model.model.layers.1.self_attn"
    t = traced(model, edit={name: lambda v: np.zeros_like(v)})
    for n in ["vision_tower.encoder.blocks.1", "multi_modal_projector", "inputs_embeds",
              "language_model.model.layers.0"]:
        np.testing.assert_array_equal(t[n], base[n], err_msg=n)          # upstream: bit-identical
    assert not np.any(t[name])
    for n in ["language_model.model.layers.1", "language_model.model.layers.2", "logits"]:
        assert np.abs(t[n] - base[n]).max() > 1e-3, n                    # downstream: changed


def test_edit_swap_image_features(model):
    base = traced(model)
    T1 = 6  # the first image (grid 6x4) gives 6 tokens

    def swap(v):
        return np.concatenate([v[T1:T1 + T1], v[:T1], v[2 * T1:]])

    t = traced(model, edit={"multi_modal_projector": swap})
    np.testing.assert_array_equal(t["vision_tower.merger"], base["vision_tower.merger"])
    np.testing.assert_array_equal(t["multi_modal_projector"][:T1], base["multi_modal_projector"][T1:2 * T1])
    assert np.abs(t["logits"] - base["logits"]).max() > 1e-3


def test_force_expert_choice(model):
    """Re-route every token of layer 2 to experts (0, 1, 2) by editing the router logits."""
    base = traced(model)

    def force(logits):
        out = np.full_like(logits, -30.0)
        out[:, :3] = 30.0
        return out

    t = traced(model, edit={"language_model.model.layers.2.mlp.gate.router_logits": force})
    ids = t["language_model.model.layers.2.mlp.topk_ids"]
    assert (ids == np.array([0, 1, 2])).all()
    np.testing.assert_array_equal(t["language_model.model.layers.1"], base["language_model.model.layers.1"])
    assert np.abs(t["logits"] - base["logits"]).max() > 1e-4


def test_attention_probabilities_on_request(model):
    t = traced(model, attn_probs=["language_model.model.layers.0.self_attn", "vision_tower.encoder.blocks.1"])
    p = t["language_model.model.layers.0.self_attn.attn_probs"]
    S = inputs()["input_ids"].shape[0]
    assert p.shape[-2:] == (S, S)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(p[0], 1), 0)                            # causal
    v = t["vision_tower.encoder.blocks.1.attn_probs"]
    L1 = 24
    assert np.all(v[:, :L1, L1:] == 0) and np.all(v[:, L1:, :L1] == 0)   # block-diagonal over images
    assert "language_model.model.layers.1.self_attn.attn_probs" not in t
    t2 = traced(model)
    assert not any(k.endswith("attn_probs") for k in t2.keys())


def test_stage_functions_reproduce_a_layer(model):
    """Run decoder layer 2 by hand from its input and compare with the traced output."""
    from pykimi.model import decoder_layer

    t = traced(model)
    x = t["language_model.model.layers.1"]
    lw = model.layer_weights(2)
    cache = model.new_cache(capacity=x.shape[0])
    out = decoder_layer(x, lw, cache, np.arange(x.shape[0]), model.config.text, layer=2)
    g = Checkpoint.open(os.path.join(CASE, "golden.safetensors")).f32("language_model.model.layers.2")
    err = np.abs(out - g).max() / np.abs(g).max()
    assert err < 2e-5, err
