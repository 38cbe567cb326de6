"""Progress bars: off in the library, on for long steps when enabled (the CLI enables them)."""
import numpy as np

import pykimi
from conftest import TINY
from pykimi import progress


def test_off_by_default_and_on_when_enabled(capsys, monkeypatch):
    model = pykimi.load(TINY, prefill_chunk=8)
    ids = np.arange(30) % 250
    model.forward(ids)
    assert "prefill" not in capsys.readouterr().err
    real_bar = progress.bar
    monkeypatch.setattr(progress, "bar", lambda total, desc, unit="it", delay=1.0: real_bar(total, desc, unit, 0.0))
    progress.enable(True)
    try:
        model.forward(ids)
        from cli_helpers import golden_ranks  # noqa: F401  (same test helpers as the CLI tests)
        from pykimi.weights import Checkpoint
        inp = Checkpoint.open(f"{TINY}/../one_image/inputs.safetensors")
        model.encode_images(np.array(inp.get("pixel_values")), np.array(inp.get("image_grid_hws")))
    finally:
        progress.enable(False)
    err = capsys.readouterr().err
    assert "prefill 30 tokens" in err and "vision tower (80 patches)" in err, err
