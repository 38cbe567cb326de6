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
