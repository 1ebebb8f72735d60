"""Builds moekit's one compiled extension, moekit.moe._qdot (integer-dot quantized kernels, run-time CPU dispatch).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found the build
goes on without it and moekit runs its numba kernels instead (moekit.moe.native.AVAILABLE is then False).
"""

from setuptools import Extension, setup

SOURCES = ["moekit/moe/_qdot.c"] + [f"moekit/moe/_qdot_isa_{isa}.c" for isa in ("generic", "avx2", "avxvnni", "vnni")]

setup(ext_modules=[Extension("moekit.moe._qdot", SOURCES, depends=["moekit/moe/_qdot.h", "moekit/moe/_qdot_ops.h", "moekit/moe/_qdot_body.h"],
                             extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"], extra_link_args=["-lpthread"],
                             optional=True)])
