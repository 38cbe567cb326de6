"""The trace hooks: recording with globs, edits that flow downstream only, zero cost when inactive."""
import numpy as np
import pytest

from pykimi import trace as T


def pipeline(x):
    a = T.emit("stage.a", x * 2)
    b = T.emit("stage.b", a + 1)
    T.emit_record("stage.b.routing", {"ids": [1, 2]})
    return T.emit("stage.c", b * 3)


def test_records_in_order_and_copies():
    x = np.ones(3, np.float32)
    with T.trace(None) as t:
        out = pipeline(x)
    assert list(t.keys()) == ["stage.a", "stage.b", "stage.c"]
    np.testing.assert_array_equal(t["stage.c"], out)
    out[:] = 0  # recorded values are copies
    assert t["stage.c"][0] == 9
    assert t.records["stage.b.routing"] == [{"ids": [1, 2]}]


def test_globs_select():
    with T.trace(None, names=["stage.[ab]"]) as t:
        pipeline(np.ones(2))
    assert list(t.keys()) == ["stage.a", "stage.b"]


def test_edit_flows_downstream_not_upstream():
    x = np.ones(2, np.float32)
    with T.trace(None) as base:
        pipeline(x)
    with T.trace(None, edit={"stage.b": lambda v: v * 0}) as t:
        out = pipeline(x)
    np.testing.assert_array_equal(t["stage.a"], base["stage.a"])      # upstream unchanged
    np.testing.assert_array_equal(t["stage.b"], 0)                     # the edit is what is recorded
    np.testing.assert_array_equal(out, 0)                              # and what flows on
    assert t.edited == ["stage.b"]


def test_inactive_is_identity():
    x = np.ones(2)
    assert not T.active()
    assert T.emit("anything", x) is x


def test_repeated_names_kept():
    with T.trace(None) as t:
        pipeline(np.ones(1))
        pipeline(np.ones(1) * 2)
    assert len(t.all("stage.a")) == 2
    np.testing.assert_array_equal(t.concat("stage.a"), [2.0, 4.0])


def test_save_roundtrip(tmp_path):
    from pykimi.debug import compare

    with T.trace(None) as t:
        pipeline(np.arange(4, dtype=np.float32))
    p = str(tmp_path / "d.safetensors")
    t.save(p)
    rep = compare(p, t)
    assert rep.ok and [r.name for r in rep.rows] == ["stage.a", "stage.b", "stage.c"]


def test_nested_traces_both_record():
    with T.trace(None) as outer:
        with T.trace(None, names="stage.c") as inner:
            pipeline(np.ones(1))
    assert "stage.a" in outer and list(inner.keys()) == ["stage.c"]


def test_save_keeps_repeated_values(tmp_path):
    from pykimi.weights import Checkpoint

    with T.trace(None) as t:
        pipeline(np.ones(1, np.float32))
        pipeline(np.ones(1, np.float32) * 2)
    p = str(tmp_path / "r.safetensors")
    t.save(p)
    ck = Checkpoint.open(p)
    assert "stage.a@1" in ck and float(ck.get("stage.a@1")[0]) == 4.0 and float(ck.get("stage.a")[0]) == 2.0


def test_wants_names_recorded_or_edited():
    assert not T.wants("stage.a")                                      # no trace active
    with T.trace(None, names=["stage.a"], edit={"stage.*c": lambda v: v}):
        assert T.wants("stage.a") and T.wants("x", "stage.bc") and not T.wants("stage.b")
    with T.trace(None, names=["stage.a"], record=False):
        assert not T.wants("stage.a")


def test_traced_decode_runs_the_fused_path_unless_a_hidden_name_is_asked(monkeypatch):
    """An untraced decode runs the whole layer stack as ONE fused call (model.decode_layers' twin), and so does
    a trace that looks at nothing inside the layers; a trace of some layer's names runs the layers one by one:
    that layer stage by stage, with the same fused attention call (attention.mla_absorbed_out's twin), the
    others one fused call each (model.decode_layer's twin); only one of attention.FUSED_DECODE_HIDES runs its
    attention step by step. The fused calls give the stage by stage values bit for bit."""
    from conftest import TINY
    import pykimi
    from pykimi import attention, kernels, model as M
    from pykimi.kernels import fused

    model = pykimi.load(TINY, cache_absorbed=False)                   # stored kv_b_proj: the fused path
    fused_calls, layer_calls, stack_calls = [], [], []
    real = kernels.fast(attention.mla_absorbed_out)                  # the attention and o_proj in one call
    monkeypatch.setitem(fused._FAST, attention.mla_absorbed_out,
                        lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    real_layer = kernels.fast(M.decode_layer)                        # the whole layer in one call
    monkeypatch.setitem(fused._FAST, M.decode_layer, lambda *a, **k: layer_calls.append(1) or real_layer(*a, **k))
    real_stack = kernels.fast(M.decode_layers)                       # all layers in one call
    monkeypatch.setitem(fused._FAST, M.decode_layers, lambda *a, **k: stack_calls.append(1) or real_stack(*a, **k))
    ids = [5, 17, 300, 42, 9]

    def run(**trace_kw):
        cache = model.new_cache(16)
        model.prefill(model.embed(ids), cache, all_logits=False)
        fused_calls.clear()
        layer_calls.clear()
        stack_calls.clear()
        if not trace_kw:
            return model.decode_step(7, cache), None, len(fused_calls)
        with pykimi.trace(model, **trace_kw) as t:
            out = model.decode_step(7, cache)
        return out, t, len(fused_calls)

    plain, _, n_plain = run()
    layers = model.text.num_hidden_layers
    assert (n_plain, len(layer_calls), len(stack_calls)) == (0, 0, 1)
    # a trace of the logits only: the stack still one fused call
    only_logits, t, n = run(names=["logits"])
    assert (n, len(layer_calls), len(stack_calls)) == (0, 0, 1) and "logits" in t
    np.testing.assert_array_equal(only_logits, plain)
    # layer outputs, router decisions, logits: visible, the layers stage by stage with the fused attention
    traced, t, n_traced = run(names=["language_model.model.layers.*.self_attn", "*.mlp.topk_ids", "logits"])
    assert (n_traced, len(layer_calls), len(stack_calls)) == (layers, 0, 0) and "language_model.model.layers.1.self_attn" in t
    np.testing.assert_array_equal(traced, plain)
    # q_rope of layer 1 asked for: that layer's attention step by step, the other layers one fused call each;
    # same values up to rounding
    hidden, t, n_hidden = run(names=["language_model.model.layers.1.self_attn.q_rope"])
    assert (n_hidden, len(layer_calls), len(stack_calls)) == (0, layers - 1, 0) and "language_model.model.layers.1.self_attn.q_rope" in t
    np.testing.assert_allclose(hidden, plain, rtol=0, atol=2e-5 * np.abs(plain).max())


def test_traced_decode_runs_the_fused_moe_unless_the_routing_is_asked(monkeypatch):
    """The decode FFN runs fused (moe.moe_decode's twin: router and experts in one call) unless a trace records
    or edits a routing name; the unfused path routes with the same C router and sums the same experts, so the
    logits are bit for bit the same, and the routing record it emits is the fused call's."""
    from conftest import TINY
    import pykimi
    from pykimi import kernels, moe
    from pykimi.kernels import fused

    model = pykimi.load(TINY, cache_absorbed=False)
    calls, records = [], []
    real = kernels.fast(moe.moe_decode)

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        records.append(out[1])
        return out
    monkeypatch.setitem(fused._FAST, moe.moe_decode, counted)
    ids = [5, 17, 300, 42, 9]
    n_moe = sum(model.text.is_moe_layer(i) for i in range(model.text.num_hidden_layers))
    assert n_moe > 0

    def run(**trace_kw):
        cache = model.new_cache(16)
        model.prefill(model.embed(ids), cache, all_logits=False)
        calls.clear()
        records.clear()
        if not trace_kw:
            return model.decode_step(7, cache), None
        with pykimi.trace(model, **trace_kw) as t:
            out = model.decode_step(7, cache)
        return out, t

    plain, _ = run()
    assert len(calls) == 0, "untraced decode: the MoE runs inside the fused layer call (pk_decode_layer)"
    other, t = run(names=["language_model.model.layers.*.self_attn"])   # the layers stage by stage
    assert len(calls) == n_moe, f"traced layers: {len(calls)} fused MoE calls, expected {n_moe}"
    fused_recs = list(records)
    np.testing.assert_array_equal(other, plain)
    routed, t = run(names=["*.mlp.topk_ids", "*.mlp.topk_weights", "*.mlp.gate.router_logits"])
    assert len(calls) == 0, "a trace of the routing must take the unfused path"
    np.testing.assert_array_equal(routed, plain)
    moe_layers = [i for i in range(model.text.num_hidden_layers) if model.text.is_moe_layer(i)]
    for rec, layer in zip(fused_recs, moe_layers):
        p = f"language_model.model.layers.{layer}.mlp"
        np.testing.assert_array_equal(t[f"{p}.topk_ids"], rec.topk_ids, err_msg=f"{p}.topk_ids")
        np.testing.assert_array_equal(t[f"{p}.topk_weights"], rec.topk_weights, err_msg=f"{p}.topk_weights")
        np.testing.assert_array_equal(t[f"{p}.gate.router_logits"], rec.logits, err_msg=f"{p}.router_logits")
