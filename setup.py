"""Build of the Cython/OpenMP extension modules in fastnorm/_ext.

Every ``fastnorm/_ext/*.pyx`` becomes an extension module: adding a kernel file needs
no change here.  Flags (measured on the target machines, see the developer notes):
``-O3 -fopenmp`` plus the reassociation flags that let gcc vectorize float64
reductions without ``-ffast-math`` (which would set flush-to-zero for the whole
process and drop NaN checks), and ``-fno-math-errno`` so that loops of sqrt vectorize.  ``*_avx2.pyx`` modules also get ``-mavx2 -mfma`` and
are loaded only on CPUs that have them.  ``FASTNORM_NATIVE=1`` adds ``-march=native``
(not portable).
"""
import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

compile_args = ["-O3", "-fopenmp", "-fassociative-math", "-fno-signed-zeros",
                "-fno-trapping-math", "-fno-math-errno"]
if os.environ.get("FASTNORM_NATIVE", "") not in ("", "0"):
    compile_args.append("-march=native")


def _isa_args(path):
    """``*_avx2.pyx`` is the twin of a portable module, built for AVX2+FMA CPUs."""
    if path.endswith("_avx2.pyx"):
        return ["-mavx2", "-mfma"]
    return []


extensions = [
    Extension(
        "fastnorm._ext." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include(), os.path.join("fastnorm", "_ext")],
        extra_compile_args=compile_args + _isa_args(path),
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for path in sorted(glob.glob(os.path.join("fastnorm", "_ext", "*.pyx")))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
