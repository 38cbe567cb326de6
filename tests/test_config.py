"""config.json parsing: the real config's parameter counts (spec §1) and loud refusal of what is not Kimi-VL
or not implemented."""
import copy
import json
import os

import pytest

from conftest import TINY
from pykimi.config import load_config
from pykimi.errors import ConfigError
from pykimi.testing import reference_config

REAL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pykimi", "data", "reference_config.json")


def test_real_config_values_and_counts():
    c = load_config(REAL)
    t, v = c.text, c.vision
    assert (t.num_hidden_layers, t.n_routed_experts, t.num_experts_per_tok, t.n_shared_experts) == (27, 64, 6, 2)
    assert (t.kv_lora_rank, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.qk_head_dim) == (512, 128, 64,
                                                                                                     128, 192)
    assert t.q_lora_rank is None and t.kv_a_layernorm_eps == 1e-6 and t.rms_norm_eps == 1e-5
    assert [t.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert (v.head_dim, v.num_hidden_layers, v.merge_kernel_size) == (72, 27, (2, 2))
    assert c.media_placeholder_token_id == 163605
    p = c.param_counts()
    print({k: f"{x / 1e9:.3f}B" for k, x in p.items()})
    assert abs(p["total"] / 1e9 - 16.41) < 0.01       # spec §1: 16.41 B
    assert abs(p["language"] / 1e9 - 15.96) < 0.01
    assert abs(p["vision"] / 1e9 - 0.417) < 0.001
    assert abs(p["projector"] / 1e9 - 0.031) < 0.001
    assert abs(p["active"] / 1e9 - 2.91) < 0.01       # 2.91 B with embedding and lm_head
    assert abs(p["active_no_embed"] / 1e9 - 2.24) < 0.01
    assert abs(p["routed_experts"] / 1e9 - 14.39) < 0.01


def test_param_counts_equal_tensor_sizes():
    """The formula and the tensor table agree (on the tiny checkpoint, whose files we can count)."""
    from pykimi.layout import expected_tensors, is_ignored
    import numpy as np

    c = load_config(TINY)
    n = sum(int(np.prod(s)) for name, s in expected_tensors(c) if not is_ignored(name))
    assert c.param_counts()["total"] == n


def _write(tmp_path, cfg):
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("mutate,msg", [
    (lambda c: c.update(model_type="llava"), "model_type = 'llava', expected 'kimi_vl'"),
    (lambda c: c["vision_config"].update(model_type="siglip"), "vision_config.model_type"),
    (lambda c: c["text_config"].update(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (lambda c: c["vision_config"].update(num_attention_heads=7), "not divisible by num_attention_heads 7"),
    (lambda c: c["vision_config"].update(hidden_size=1160, num_attention_heads=20), "multiple of 4"),
    (lambda c: c["text_config"].update(num_experts_per_tok=65), "num_experts_per_tok = 65"),
    (lambda c: c["text_config"].update(n_group=5), "not divisible by n_group 5"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c["text_config"].pop("kv_lora_rank"), "text_config.kv_lora_rank is missing"),
    (lambda c: c["text_config"].update(hidden_size="2048"), "hidden_size = '2048', expected int"),
    (lambda c: c.update(media_placeholder_token_id=10 ** 9), "media_placeholder_token_id"),
    (lambda c: c.pop("vision_config"), "vision_config is missing"),
])
def test_refusals(tmp_path, mutate, msg):
    cfg = copy.deepcopy(reference_config())
    mutate(cfg)
    d = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=msg) as ei:
        load_config(d)
    assert "config.json" in str(ei.value) and "\n" not in str(ei.value)


def test_missing_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        load_config(str(tmp_path / "nope"))
