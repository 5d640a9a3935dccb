"""Builds the Cython scoring kernel (kernel/score.pyx).

    python setup.py build_ext --inplace          # what `make build` runs

Compiler directives are set once here. QJ_KERNEL_DEBUG=1 turns bounds and wrap-around
checks back on (and drops -O3) for debugging a crash in the kernel.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

DEBUG = os.environ.get("QJ_KERNEL_DEBUG") == "1"
# The kernel is built on the machine that runs it (`make build`), so by default it may use
# every vector instruction that CPU has (AVX-512 here: about 25 % faster than SSE2).
# QJ_KERNEL_MARCH= (empty) builds a portable binary, e.g. for a wheel shipped elsewhere.
# Results do not depend on it: no FMA contraction, no reassociation (see below).
MARCH = os.environ.get("QJ_KERNEL_MARCH", "native")

extensions = [
    Extension(
        "kernel.score",
        ["kernel/score.pyx"],
        include_dirs=[np.get_include()],
        # -ffp-contract=off: no fused multiply-add, so the kernel rounds exactly like the
        # numpy reference (kernel/reference.py) and both give the same integer scores.
        # -ffinite-math-only -fno-signed-zeros -fno-trapping-math: let the clamps and the
        # argmax become vector min/max/blend (inputs are checked finite on their bits, and
        # no result depends on the sign of a zero). No reassociation: sums keep their order.
        extra_compile_args=[
            "-O0" if DEBUG else "-O3", "-ffp-contract=off", "-fno-math-errno",
            "-ffinite-math-only", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp",
        ] + ([f"-march={MARCH}"] if MARCH else []),
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    # Card token -> citizen row hash table for the eligibility batch path.
    Extension(
        "server.token_index",
        ["server/token_index.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O0" if DEBUG else "-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    # Bulk reads of the start-up load (SQLite and PostgreSQL COPY into numpy arrays). Linked
    # with the system libsqlite3, the one Python's sqlite3 module uses: never a second copy
    # of SQLite in the process (server/bulk_read.pyx says why). Its header: libsqlite3-dev
    # (the Makefile installs it on Debian when it is missing).
    Extension(
        "server.bulk_read",
        ["server/bulk_read.pyx"],
        include_dirs=[np.get_include()],
        libraries=["sqlite3"],
        extra_compile_args=["-O0" if DEBUG else "-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    # Binary fuse filters and the filter cascade of the offline gates' snapshots (issue 19:
    # server/gate_snapshot.py builds them, clients/gate.py queries them at the gate).
    Extension(
        "clients.fuse",
        ["clients/fuse.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O0" if DEBUG else "-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    name="qianjiang-score",
    version="0.1.0",
    description="Qianjiang city personal credit score service",
    packages=find_packages(include=["kernel", "kernel.*", "server", "server.*", "clients", "clients.*", "loadtest", "loadtest.*", "qianjiang", "qianjiang.*"]),
    package_data={"kernel": ["models/*.toml", "*.pyi", "*.pxd"]},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
        },
    ),
    python_requires=">=3.11",
    entry_points={"console_scripts": ["qjscore = clients.cli:main"]},
)
