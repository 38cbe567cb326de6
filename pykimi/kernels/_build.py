"""cffi (API mode) builder for ``pykimi._ckernels``, the C kernels in ``csrc/``.

Used three ways:
  * by setup.py through ``cffi_modules=["pykimi/kernels/_build.py:ffibuilder"]`` (pip install);
  * ``python -m pykimi.kernels._build`` builds the extension in place for development
    (the .so lands next to pykimi/__init__.py); ``--no-openmp`` skips the OpenMP probe;
  * ``build_inplace()`` from tests.

Flags: -O3 always; -fopenmp only when a probe compile+link with it succeeds (set PYKIMI_NO_OPENMP=1 to
skip); -DPK_NO_AMX when a probe compile of the AMX intrinsics fails (or PYKIMI_NO_AMX=1); -DPK_NO_AVX512BF16
likewise for the AVX512_BF16 intrinsics (or PYKIMI_NO_AVX512BF16=1). No -march=native: the AVX2 and AVX-512
functions carry their own target attributes and the level (and AMX / AVX512_BF16) is picked at run time
(csrc/pykimi_kernels.c), so the binary stays portable.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
HEADER = os.path.join(CSRC, "pykimi_kernels.h")
MODULE = "pykimi._ckernels"


def _cdef_from_header(path: str = HEADER) -> str:
    """The declarations between the CDEF markers of the one header: cffi and C share one source."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{path}: no /* CDEF BEGIN */ ... /* CDEF END */ block")
    return m.group(1)


def _compiler() -> list:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def probe_openmp() -> bool:
    """True when the C compiler compiles and links a tiny OpenMP program with -fopenmp."""
    if os.environ.get("PYKIMI_NO_OPENMP"):
        return False
    src = "#include <omp.h>\nint main(void){int s=0;\n#pragma omp parallel reduction(+:s)\ns+=1;\nreturn s>0?0:1;}\n"
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run(_compiler() + ["-fopenmp", c, "-o", os.path.join(d, "t")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


_AMX_PROBE = r"""
#include <immintrin.h>
__attribute__((target("amx-tile,amx-bf16,avx512f")))
void f(const void *cfg, const void *a, const void *b, float *c) {
    _tile_loadconfig(cfg); _tile_zero(0); _tile_loadd(4, a, 64); _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5); _tile_stored(0, c, 64); _tile_release();
}
"""


def probe_amx() -> bool:
    """True when the compiler and assembler take the AMX intrinsics (gcc >= 11 and binutils >= 2.36, or clang
    >= 12). Without them the kernels are built with -DPK_NO_AMX: the same C, no tile path."""
    return not os.environ.get("PYKIMI_NO_AMX") and _compiles(_AMX_PROBE)


_AVX512BF16_PROBE = r"""
#include <immintrin.h>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
__m512 f(__m512 acc, __m512 a, __m512 b, __m512i w) {
    __m512i x = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}
"""


def _compiles(src: str) -> bool:
    """True when the C compiler compiles src (-O2 -c)."""
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run(_compiler() + ["-O2", "-c", c, "-o", os.path.join(d, "t.o")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def probe_avx512bf16() -> bool:
    """True when the compiler and assembler take the AVX512_BF16 intrinsics (vcvtne2ps2bf16, vdpbf16ps: gcc >= 10
    and binutils >= 2.34, or clang >= 9). Without them the kernels are built with -DPK_NO_AVX512BF16: the same C,
    no bf16-activation kernel (PYKIMI_ACT_QUANT=all then leaves bf16 products exact)."""
    if os.environ.get("PYKIMI_NO_AVX512BF16"):
        return False
    return _compiles(_AVX512BF16_PROBE)


def make_builder(openmp: bool | None = None, relative: bool | None = None) -> FFI:
    """relative=True names sources relative to the repo root (what setup.py needs); absolute otherwise
    (cffi's own compile() chdirs into its temp dir)."""
    if relative is None:
        relative = os.path.abspath(os.getcwd()) == ROOT
    if openmp is None:
        openmp = probe_openmp()
    ffi = FFI()
    ffi.cdef(_cdef_from_header())
    sources = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".c"))
    inc = CSRC
    if relative:  # setuptools wants paths relative to setup.py
        sources = [os.path.relpath(s, ROOT) for s in sources]
        inc = os.path.relpath(CSRC, ROOT)
    flags = (["-O3"] + (["-fopenmp"] if openmp else []) + ([] if probe_amx() else ["-DPK_NO_AMX"])
             + ([] if probe_avx512bf16() else ["-DPK_NO_AVX512BF16"]))
    ffi.set_source(MODULE, '#include "pykimi_kernels.h"', sources=sources,
                   include_dirs=[inc],
                   libraries=["m"], extra_compile_args=flags, extra_link_args=(["-fopenmp"] if openmp else []))
    return ffi


ffibuilder = make_builder()


def build_inplace(openmp: bool | None = None, verbose: bool = False) -> str:
    """Compile into a temp dir and copy the extension next to pykimi/__init__.py; returns its path."""
    ffi = make_builder(openmp, relative=False)
    tmp = os.path.join(ROOT, "build", "cffi")
    os.makedirs(tmp, exist_ok=True)
    built = ffi.compile(tmpdir=tmp, verbose=verbose)
    built = os.path.join(tmp, built) if not os.path.isabs(built) else built
    dst = os.path.join(ROOT, "pykimi", os.path.basename(built))
    for old in os.listdir(os.path.join(ROOT, "pykimi")):
        # a stale build under another suffix (e.g. .abi3.so from setup.py) could shadow this one
        if old.startswith("_ckernels") and old.endswith(".so") and old != os.path.basename(dst):
            os.remove(os.path.join(ROOT, "pykimi", old))
    shutil.copy2(built, dst + ".tmp")
    os.replace(dst + ".tmp", dst)  # atomic: a running import never sees half a file
    return dst


if __name__ == "__main__":
    omp = False if "--no-openmp" in sys.argv else None
    path = build_inplace(omp, verbose="-v" in sys.argv)
    print(f"built {path} (openmp={'off' if omp is False else probe_openmp()})")
