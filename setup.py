"""Build script: Python, the native CPU kernels ``gpt2fast._cpu``, and the CUDA extension ``gpt2fast._C`` where
nvcc builds it.

``gpt2fast._cpu`` is ``csrc/cpu/`` compiled by the C++ compiler (g++/clang, C++17, OpenMP), bound with
pybind11: one build per instruction set (AVX-512, AVX2, portable) chosen at run time, so the module runs on
any x86-64 (and other CPUs through the portable build). ``GPT2FAST_BUILD_CPU=0`` skips it (``backend="cpu"``
then says it is missing).

``gpt2fast._C`` is ``csrc/bindings.cpp`` (and the kernel headers it includes) compiled by nvcc
for sm_80 and sm_90 (``GPT2FAST_CUDA_ARCHS="80;90"`` overrides), linked with the static CUDA
runtime, bound with pybind11 (no torch C++ API: our torch may be a CPU build).

``GPT2FAST_BUILD_CUDA`` decides whether it is built:
  ``1``      always (fails when nvcc is missing),
  ``0``      never,
  unset      when nvcc is found *and* this machine has an NVIDIA GPU driver (``/dev/nvidia0`` or
             ``nvidia-smi``). A machine with the toolkit but no GPU, like our CI, installs pure
             Python: the nvcc + pybind11 compile costs about a minute on 2 cores there, for a
             module nothing on that machine can load. Its tests still compile every kernel with
             nvcc (the resource report) and run them emulated on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# what bindings.cpp includes: a change rebuilds gpt2fast._C, and an sdist carries them
HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cuh", ".h"))


def _cuda_build():
    """gpt2fast/ops/cuda_build.py loaded from its path (importing the package would import torch)."""
    spec = importlib.util.spec_from_file_location("_gpt2fast_cuda_build", ROOT / "gpt2fast" / "ops" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _has_gpu_driver() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _build_cuda_reason() -> tuple[bool, str]:
    """(build gpt2fast._C?, why)."""
    mode = os.environ.get("GPT2FAST_BUILD_CUDA", "").strip()
    nvcc = _cuda_build().nvcc_path()
    if mode == "0":
        return False, "GPT2FAST_BUILD_CUDA=0"
    if mode == "1":
        if nvcc is None:
            raise SystemExit("GPT2FAST_BUILD_CUDA=1 but nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return True, "GPT2FAST_BUILD_CUDA=1"
    if mode:
        raise SystemExit(f"GPT2FAST_BUILD_CUDA={mode!r}: use 1 (build gpt2fast._C), 0 (never) or leave it unset")
    if nvcc is None:
        return False, "nvcc not found"
    if not _has_gpu_driver():
        return False, "nvcc found but no NVIDIA GPU driver here; GPT2FAST_BUILD_CUDA=1 builds it anyway"
    return True, f"nvcc ({nvcc}) and a GPU driver found"


CPU_SOURCES = ["csrc/cpu/bindings.cpp", "csrc/cpu/isa_avx512.cpp", "csrc/cpu/isa_avx2.cpp", "csrc/cpu/isa_portable.cpp"]
CPU_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-fvisibility=hidden"]


def _cpu_extension() -> Extension:
    import pybind11

    return Extension("gpt2fast._cpu", sources=CPU_SOURCES, depends=[h for h in HEADERS if h.startswith("csrc/cpu/")],
                     include_dirs=[pybind11.get_include()], language="c++", extra_compile_args=CPU_FLAGS,
                     extra_link_args=["-fopenmp"])


class NvccBuildExt(build_ext):
    """``gpt2fast._C``: compiled and linked with one nvcc command (sources are CUDA C++, ``-x cu``); the CPU
    module the usual setuptools way."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "gpt2fast._C":
            return super().build_extension(ext)
        cuda_build = _cuda_build()
        archs = cuda_build.archs_from_env()
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        command = cuda_build.nvcc_extension_command(output, archs)
        print(f"gpt2fast: building gpt2fast._C for sm_{', sm_'.join(map(str, archs))}:\n  {' '.join(command)}")
        self.spawn(command)


build, reason = _build_cuda_reason()
if not build:
    print(f"gpt2fast: installing pure Python, without the CUDA extension gpt2fast._C ({reason}). "
          "backend='cuda' then runs its kernels only on CPU tensors, emulated (tests).")  # fmt: skip

extensions = [Extension("gpt2fast._C", sources=["csrc/bindings.cpp"], depends=HEADERS)] if build else []
if os.environ.get("GPT2FAST_BUILD_CPU", "1").strip() != "0":
    extensions.append(_cpu_extension())

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": NvccBuildExt},
)
