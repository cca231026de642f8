"""bf16 x bf16 -> f32 products through a vendor GEMM, inside jitted code, by jax's foreign
function interface (`jax.ffi`): the CPU fast path's products where the library is there.

The handler (`tinylm_jax/ext/cpu_gemm.cc`, built by `pip install` into `tinylm_jax._cpu_gemm`)
links no library: `load` opens Intel MKL's single dynamic library (`libmkl_rt`, from the `mkl`
wheel: `pip install -e ".[cpu]"`) at run time and hands the handler its
`cblas_gemm_bf16bf16f32`. Where the extension or the library is missing, `load` says why and the
products stay XLA's.

MKL's threads are set up, where the user has not set them, so that they do not spin against
XLA's own pool: OpenMP threads that wait passively, one per core.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "tinylm_bf16_gemm"
EXTENSION = "tinylm_jax._cpu_gemm"
LIBRARY_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")
# Set only where the user has not: passive waits (spinning OpenMP threads stall XLA's own
# threads on the same cores), and OpenMP's thread count, else one thread per core.
THREAD_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE",
                   "MKL_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)}


def _library() -> Path | None:
    """MKL's runtime library: $TINYLM_MKL, the environment's lib/ (where the mkl wheel puts it),
    or the loader's search path."""
    if os.environ.get("TINYLM_MKL"):
        return Path(os.environ["TINYLM_MKL"])
    for name in LIBRARY_NAMES:
        path = Path(sysconfig.get_paths()["data"]) / "lib" / name
        if path.is_file():
            return path
    found = ctypes.util.find_library("mkl_rt")
    return Path(found) if found else None


@functools.cache
def load() -> str | None:
    """Register the handler with MKL's GEMM behind it: None if it is ready, else why not (one
    line). Once per process."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return "the extension is not built (pip install -e \".[cpu]\" builds it)"
    library = _library()
    if library is None:
        return "MKL is not installed (pip install -e \".[cpu]\" installs it)"
    for key, value in THREAD_SETTINGS.items():
        os.environ.setdefault(key, value)
    try:
        mkl = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        handler = ctypes.CDLL(spec.origin)
        handler.tinylm_set_gemm.argtypes = [ctypes.c_void_p]
        handler.tinylm_set_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler.TinylmBf16Gemm),
                                    platform="cpu")
    except (OSError, AttributeError) as err:
        return f"MKL or the extension cannot be loaded ({err})"
    return None


def gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) in float32 from bfloat16 operands, op the transpose of the last two dims
    where asked, any leading dims a batch: (..., M, K) @ (..., K, N) -> (..., M, N)."""
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    rows = a.shape[-1] if trans_a else a.shape[-2]
    cols = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct((*a.shape[:-2], rows, cols), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(a, b, trans_a=trans_a, trans_b=trans_b)
