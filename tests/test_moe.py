"""MoE router and sparse dispatch (spec §8.4): crafted-logit router checks, dispatch vs a per-token loop, and
proof through Checkpoint.read_counter that experts nobody chose are never read."""
import os
from dataclasses import dataclass

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import GOLDEN, TINY

from pykimi.errors import ConfigError
from pykimi.model import LM, load
from pykimi.moe import RoutingRecord, dispatch_plan, moe_forward, route, route_logits, silu
from pykimi.trace import Trace


@dataclass(frozen=True)
class RCfg:
    num_experts_per_tok: int = 2
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.446
    n_routed_experts: int = 4


def sig(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_bias_selects_but_does_not_weight():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    bias = np.array([0.0, 0.0, 0.0, 2.0], np.float32)              # makes expert 3 win the selection
    rec = route_logits(logits, bias, RCfg())
    assert rec.topk_ids.tolist() == [[0, 3]] and rec.topk_ids.dtype == np.int32
    s = sig([2.0, -1.0])                                            # weights from the *unbiased* sigmoid
    np.testing.assert_allclose(rec.topk_weights[0], s / s.sum() * 2.446, rtol=1e-6)
    np.testing.assert_allclose(rec.topk_weights.sum(), 2.446, rtol=1e-6)
    # margin: 2nd best minus 3rd best biased score
    biased = sig([2.0, 1.0, 0.0, -1.0]) + bias
    np.testing.assert_allclose(rec.topk_margin[0], np.sort(biased)[-2] - np.sort(biased)[-3], rtol=1e-5)
    np.testing.assert_allclose(rec.scores, sig(logits), rtol=1e-6)


def test_ids_sorted_ascending_and_weights_follow():
    logits = np.array([[0.1, 3.0, 2.0, 0.0], [5.0, -1.0, 0.0, 6.0]], np.float32)
    rec = route_logits(logits, np.zeros(4, np.float32), RCfg())
    assert rec.topk_ids.tolist() == [[1, 2], [0, 3]]
    np.testing.assert_allclose(rec.topk_weights[1], sig([5.0, 6.0]) / sig([5.0, 6.0]).sum() * 2.446, rtol=1e-6)


def test_route_matches_logits_path_and_fp32():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((5, 16)).astype(np.float32)
    gw = rng.standard_normal((4, 16)).astype(np.float32)
    rec = route(h, gw, np.zeros(4, np.float32), RCfg())
    assert rec.logits.dtype == np.float32
    np.testing.assert_allclose(rec.logits, h @ gw.T, rtol=1e-5)


def test_no_normalisation_and_softmax_and_greedy():
    logits = np.array([[1.0, 2.0, 3.0, 0.5]], np.float32)
    rec = route_logits(logits, np.zeros(4, np.float32), RCfg(norm_topk_prob=False, routed_scaling_factor=1.0))
    np.testing.assert_allclose(rec.topk_weights[0], sig([2.0, 3.0]), rtol=1e-6)
    rec = route_logits(logits, None, RCfg(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                                          routed_scaling_factor=1.0))
    p = np.exp(logits[0] - 3) / np.exp(logits[0] - 3).sum()
    assert rec.topk_ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(rec.topk_weights[0], p[[1, 2]], rtol=1e-6)


def test_group_limited_topk_deepseek_v3_rule():
    # 8 experts in 4 groups of 2; group score = sum of its top-2 biased scores; keep 2 groups.
    s = np.array([0.9, 0.0, 0.5, 0.45, 0.6, 0.1, 0.2, 0.2], np.float64)   # group sums .9 .95 .7 .4
    logits = np.log(s.clip(1e-6) / (1 - s.clip(1e-6))).astype(np.float32)
    cfg = RCfg(num_experts_per_tok=2, n_group=4, topk_group=2, n_routed_experts=8)
    rec = route_logits(logits[None], np.zeros(8, np.float32), cfg)
    # best single experts would be 0 (0.9) and 4 (0.6), but group 2 (experts 4,5) is dropped
    assert rec.topk_ids.tolist() == [[0, 2]]


def test_unknown_scoring_is_config_error():
    with pytest.raises(ConfigError):
        route_logits(np.zeros((1, 4), np.float32), None, RCfg(scoring_func="relu"))
    with pytest.raises(ConfigError):
        route_logits(np.zeros((1, 4), np.float32), None, RCfg(topk_method="weird"))


def test_dispatch_plan_groups_by_expert():
    ids = np.array([[0, 2], [1, 2], [0, 3]], np.int32)
    order, offsets = dispatch_plan(ids, 5)
    assert offsets.tolist() == [0, 2, 3, 5, 6, 6]
    flat = ids.ravel()
    assert flat[order].tolist() == [0, 0, 1, 2, 2, 3]
    assert (order[0:2] // 2).tolist() == [0, 2]                      # stable: tokens in order inside a group


def test_moe_forward_equals_per_token_loop():
    rng = np.random.default_rng(1)
    S, D, I, E, k = 7, 12, 8, 6, 3
    h = rng.standard_normal((S, D)).astype(np.float32)
    experts = [tuple(rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((I, D), (I, D), (D, I)))
               for _ in range(E)]
    shared = tuple(rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((2 * I, D), (2 * I, D), (D, 2 * I)))
    gw = rng.standard_normal((E, D)).astype(np.float32)
    rec = route(h, gw, rng.standard_normal(E).astype(np.float32) * 0.1, RCfg(num_experts_per_tok=k))
    calls = []

    def get(e):
        calls.append(e)
        return experts[e]

    out = moe_forward(h, rec, get, shared, n_experts=E)
    ref = np.zeros((S, D), np.float64)
    for s in range(S):
        for j in range(k):
            g, u, d = (w.astype(np.float64) for w in experts[rec.topk_ids[s, j]])
            a = h[s] @ g.T
            ref[s] += rec.topk_weights[s, j] * (((a / (1 + np.exp(-a))) * (h[s] @ u.T)) @ d.T)
        g, u, d = (w.astype(np.float64) for w in shared)
        a = h[s] @ g.T
        ref[s] += ((a / (1 + np.exp(-a))) * (h[s] @ u.T)) @ d.T
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    assert sorted(calls) == sorted(set(rec.topk_ids.ravel().tolist()))   # each chosen expert fetched once


def test_silu_extremes():
    x = np.array([-1000.0, -10.0, 0.0, 10.0, 1000.0], np.float32)
    y = silu(x)
    assert np.all(np.isfinite(y)) and y[0] == 0 and y[-1] == 1000.0


def test_unselected_experts_are_never_read():
    """One forward: each expert some token chose is read exactly once (gate/up/down), the others never."""
    model = load(TINY)
    ids = load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"]
    short = ids[:3]                                                # 3 tokens × top-3: some experts unchosen
    with Trace(model, names=["*.mlp.topk_ids"]) as t:
        model.ckpt.read_counter.clear()
        model.forward(short)
    counts = dict(model.ckpt.read_counter)
    t_cfg = model.config.text
    some_unread = False
    for layer in range(t_cfg.num_hidden_layers):
        if not t_cfg.is_moe_layer(layer):
            continue
        chosen = set(t[f"{LM}.layers.{layer}.mlp.topk_ids"].ravel().tolist())
        for e in range(t_cfg.n_routed_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                n = counts.get(f"{LM}.layers.{layer}.mlp.experts.{e}.{proj}.weight", 0)
                assert n == (1 if e in chosen else 0), (layer, e, proj, n)
        some_unread |= len(chosen) < t_cfg.n_routed_experts
    assert some_unread, "the test prompt should leave some experts unchosen"
    # the stored inv_freq is never read either (spec §8.3)
    assert not any(k.endswith("rotary_emb.inv_freq") for k in counts)


def test_routing_record_is_emitted():
    model = load(TINY)
    ids = load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"]
    with Trace(model) as t:
        model.forward(ids[:5])
    recs = t.records[f"{LM}.layers.1.mlp.routing"]
    assert len(recs) == 1 and isinstance(recs[0], RoutingRecord)
    assert recs[0].topk_ids.shape == (5, 3)
    np.testing.assert_array_equal(recs[0].topk_ids, t[f"{LM}.layers.1.mlp.topk_ids"])


def test_editing_router_logits_reroutes():
    model = load(TINY)
    ids = load_file(os.path.join(GOLDEN, "text_only", "inputs.safetensors"))["input_ids"][:4]
    E = model.config.text.n_routed_experts

    def force(lg):
        out = np.full_like(lg, -20.0)
        out[:, :3] = 20.0                                          # experts 0,1,2 win unless the bias says no
        return out

    with Trace(model, names=[f"{LM}.layers.1.mlp.topk_ids"], edit={f"{LM}.layers.1.mlp.gate.router_logits": force}) as t:
        model.forward(ids)
    assert t[f"{LM}.layers.1.mlp.topk_ids"].tolist() == [[0, 1, 2]] * 4
    assert E == 8
