"""pykimi: a CPU-first, dependency-light inference runtime for Kimi-VL-A3B-Instruct.

    import pykimi
    model = pykimi.load(pykimi.demo_checkpoint())
    proc = pykimi.Processor.from_pretrained(pykimi.demo_checkpoint())

See README.md and the tutorials/ notebooks.
"""
from __future__ import annotations

import os

# OpenBLAS's idle worker threads busy-wait 2^28 cycles (~0.1 s) after every multi-threaded call (a prefill's
# attention products); on a 2-core machine they then hold the cores the decode kernels' OpenMP threads need, and
# the first decode steps after each prefill ran 2-4x slower (bench/RESULTS.md, "Stalls"). 2^20 cycles (~0.3 ms)
# keeps them awake between the calls of one prefill and asleep by the first decode step. OpenBLAS reads the
# variable when NumPy loads it: this takes effect when pykimi is imported before NumPy (the `pykimi` command
# always is), and a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from .config import KimiVLConfig, load_config
from .errors import CheckpointError, ConfigError, InputError, PykimiError, ResourceError, TokenizerError
from . import trace
from .trace import Trace
from .weights import Checkpoint

__version__ = "0.1.0"

__all__ = ["load", "Processor", "trace", "Trace", "demo_checkpoint", "Checkpoint", "load_config",
           "KimiVLConfig", "PykimiError", "CheckpointError", "ConfigError", "InputError", "ResourceError",
           "TokenizerError"]


def load(path: str, **options):
    """Open a Kimi-VL checkpoint directory (HF layout) with memory-mapped weights; see pykimi.model.load."""
    from .model import load as _load

    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        raise CheckpointError(f"{os.fspath(path)}: this is a file; pass the checkpoint directory "
                              f"({os.path.dirname(os.path.abspath(path))})")
    return _load(path, **options)


def demo_checkpoint() -> str:
    """The directory of the bundled demo checkpoint (a tiny Kimi-VL trained on a synthetic shapes task)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


def __getattr__(name):
    if name == "Processor":
        from .processor import Processor

        return Processor
    raise AttributeError(f"module 'pykimi' has no attribute {name!r}")
