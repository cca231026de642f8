"""The one thing pyproject.toml cannot say: the optional C++ extension, `tinylm_jax._cpu_gemm`,
an XLA FFI handler for a vendor bf16 GEMM (`tinylm_jax/core/cpu_gemm.py`). It needs jaxlib's
headers and a C++17 compiler; where either is missing, or the build fails, the package installs
without it and runs its products on XLA."""

import os

from setuptools import Extension, setup


def _jaxlib_include() -> str | None:
    try:
        import jaxlib
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return include if os.path.isdir(os.path.join(include, "xla", "ffi", "api")) else None


include = _jaxlib_include()
extensions = [Extension("tinylm_jax._cpu_gemm", ["tinylm_jax/ext/cpu_gemm.cc"],
                        include_dirs=[include], language="c++", optional=True,
                        extra_compile_args=["-std=c++17", "-O2", "-w"])] if include else []
setup(ext_modules=extensions)
