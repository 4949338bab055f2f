"""The compiled row-softmax kernels (attention/csrc/row_softmax.cpp): built with the system C++ compiler on first use,
cached, loaded with ctypes.

The source includes no torch header, so it builds in about a second (a torch C++ extension with
``torch/extension.h`` takes tens of seconds on two cores) and needs no ninja. The library is cached under
``$OUTLIERFREE_CACHE/native`` (default ``~/.cache/outlierfree/native``), keyed by the source, the flags, the compiler
and the CPU's instruction-set flags (it is built with ``-march=native``), written to a temporary name and renamed.
Without a compiler, or with ``OUTLIERFREE_NATIVE=0``, :func:`library` returns None and callers use their pure-torch
form. ``setup.sh`` builds it once at install time (``two_pass.compiled_available()``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from ..records import cpu

SOURCE = Path(__file__).with_name("csrc") / "row_softmax.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")


def isa() -> str:
    """The vector instruction sets of this CPU that the kernels can use, e.g. ``"avx2 fma avx512f"`` (from
    /proc/cpuinfo; ``platform.machine()`` elsewhere)."""
    flags = cpu()[1]
    if not flags:
        return platform.machine()
    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return " ".join(f for f in keep if f in flags) or platform.machine()


def _cpu_key() -> str:
    flags = cpu()[1]
    return " ".join(flags) if flags else platform.processor() + platform.machine()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx)


def build(cxx: str, out_dir: Path) -> Path:
    """Compile the source into ``out_dir`` (if not already there) and return the library's path."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, version, _cpu_key())).encode()).hexdigest()[:16]
    path = out_dir / f"row_softmax-{key}.so"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.so", dir=out_dir)
    os.close(fd)
    try:
        p = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {p.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # another process building the same key at once writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (no compiler, ``OUTLIERFREE_NATIVE=0``, or the build failed: warns once)."""
    if os.environ.get("OUTLIERFREE_NATIVE", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        return None
    try:
        from ..data.cache import cache_dir  # lazy: only the first call builds

        lib = ctypes.CDLL(str(build(cxx, cache_dir("native"))))
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the torch form
        warnings.warn(f"outlierfree: could not build the compiled softmax kernels ({e}); using the pure-torch "
                      f"forms (slower)", stacklevel=2)
        return None
    i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for name in ("of_softmax_f32", "of_softmax_f64"):
        getattr(lib, name).argtypes = [ptr, ptr, i64, i64, c_int, c_int]
        getattr(lib, name).restype = None
    for name in ("of_mexp_accumulate_f32", "of_mexp_accumulate_f64"):
        getattr(lib, name).argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, c_int]
        getattr(lib, name).restype = None
    for name in ("of_clip_probs_f32", "of_clip_probs_f64"):
        getattr(lib, name).argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, c_int]
        getattr(lib, name).restype = None
    for name in ("of_range", "of_zlim"):
        getattr(lib, name).restype = ctypes.c_double
    return lib

