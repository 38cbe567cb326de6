"""Build the optional C kernels (csrc/ -> pykimi._ckernels, cffi API mode) around the metadata in pyproject.toml.

The extension is optional: when there is no C compiler, no cffi, or the compile fails, installation still
succeeds with a warning and pykimi falls back to Numba, then NumPy (pykimi.kernels prints one warning).
Development build in place: ``python setup.py build_ext --inplace`` or ``python -m pykimi.kernels._build``.
Set PYKIMI_NO_CEXT=1 to skip the extension entirely, PYKIMI_NO_OPENMP=1 to build it without OpenMP.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

BANNER = ("\n*** pykimi: the C kernels could not be built ({why}).\n"
          "*** Installing without them; pykimi will use Numba (or NumPy) instead.\n")


def _warn(why: str) -> None:
    sys.stderr.write(BANNER.format(why=why))


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: any compiler error becomes a warning."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # DistutilsPlatformError (no compiler), CCompilerError, CompileError, ...
            _warn(f"{type(e).__name__}: {e}")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            _warn(f"{ext.name}: {type(e).__name__}: {e}")

    def get_outputs(self):
        # only report what was actually built, so a failed extension does not break wheel packaging
        return [p for p in super().get_outputs() if os.path.exists(p)]


kwargs = {"cmdclass": {"build_ext": OptionalBuildExt}}
if os.environ.get("PYKIMI_NO_CEXT"):
    _warn("PYKIMI_NO_CEXT is set")
else:
    try:
        import cffi  # noqa: F401  (a build requirement; guard anyway for odd environments)
        kwargs["cffi_modules"] = ["pykimi/kernels/_build.py:ffibuilder"]
    except Exception as e:
        _warn(f"cffi unavailable: {e}")

setup(**kwargs)
