import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GOLDEN = os.path.join(ROOT, "tests", "golden")
TINY = os.path.join(GOLDEN, "tiny-kimi-vl")
CASES = ("text_only", "one_image", "two_images")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def act_mode():
    """kernels.set_act_quant, the previous setting restored afterwards."""
    import pykimi.kernels as K

    prev = K.act_quant()
    yield K.set_act_quant
    K.set_act_quant(prev)


def on_and_off(switch, fn) -> tuple:
    """(fn() with a kernel switch on, fn() with it off), e.g. switch = c.set_vnni_batch; the switch is left on."""
    switch(True)
    on = fn()
    switch(False)
    try:
        return on, fn()
    finally:
        switch(True)


def bound_err(y, r, x, w) -> float:
    """max |y - r| relative to the largest possible |sum| (max row sum of |x| times max |w|), as test_kernels."""
    return float(np.max(np.abs(y - r)) / max(np.abs(x).sum(1).max() * np.abs(w).max(), 1e-30))
