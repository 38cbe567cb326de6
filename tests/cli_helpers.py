"""Shared fixtures for tests that need a runnable tiny checkpoint with a tokenizer."""
import os
import shutil

from conftest import TINY


def golden_ranks():
    """A 256-token byte-level vocabulary (one id per byte): enough for the tiny checkpoint's 512 ids."""
    return {bytes([b]): b for b in range(256)}


def make_tiny_model_dir(dst: str) -> str:
    """The golden tiny checkpoint + a synthetic tiktoken.model (256 base + 256 special ids = its vocab)."""
    from pykimi.tokenizer import write_tiktoken_model

    shutil.copytree(TINY, dst)
    write_tiktoken_model(os.path.join(dst, "tiktoken.model"), golden_ranks())
    return dst


def sigint_as_a_terminal_leaves_it():
    """``preexec_fn`` for a child a test will Ctrl-C: SIGINT at its default, as a terminal starts a program.

    A test run started in the background by a non-interactive shell (``cmd &``) hands its children SIGINT
    *ignored*, and Python keeps an ignored SIGINT ignored (as pykimi batch does on purpose, like nohup), so a
    SIGINT sent by the test would prove nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
