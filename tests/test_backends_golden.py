"""Golden parity under every available kernel backend (numpy, numba, c): the fast kernels must reproduce the
reference end to end, not just in isolation (tests/test_kernels.py checks them kernel by kernel)."""
import numpy as np
import pytest

import pykimi
from pykimi import kernels
from conftest import CASES, TINY
from test_model_golden import case_data, check_tensor, run_case, tol_of


def _available():
    return [n for n in kernels.BACKENDS if kernels.backends()[n]["available"]]


@pytest.fixture(params=list(kernels.BACKENDS))
def backend(request):
    name = request.param
    if name not in _available():
        pytest.skip(f"backend {name} unavailable: {kernels.backends()[name]['reason']}")
    before = kernels.backend()
    kernels.set_backend(name)
    yield name
    kernels.set_backend(before)


@pytest.mark.parametrize("case", CASES)
def test_golden_end_to_end_under_backend(backend, case):
    model = pykimi.load(TINY)
    inputs, gold, manifest, t, logits, kw = run_case(model, case, use_pixels=True)
    failures = []
    for name, g in gold.items():
        if name in ("greedy_ids", "greedy_step_logits"):
            continue
        check_tensor(name, t[name], g, tol_of(manifest, name), failures)
    assert not failures, f"backend {backend}:\n" + "\n".join(failures)
    ids = model.generate(inputs["input_ids"], max_new_tokens=8, stop_ids=[], **kw)
    assert ids == gold["greedy_ids"].tolist(), (backend, ids)
