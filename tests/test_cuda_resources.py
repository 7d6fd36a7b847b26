"""Every CUDA C++ kernel compiled by nvcc for sm_80 and sm_90 (``-Xptxas -v``): no spill, no stack frame.

The report comes from one translation unit including every ``csrc/kernels/*.cuh``: the launchers
instantiate exactly the kernel variants they can launch, so this checks what can run.
"""

from __future__ import annotations

import pytest

from gpt2fast.ops import cuda_build

pytestmark = pytest.mark.skipif(cuda_build.nvcc_path() is None, reason="nvcc not found: the report needs the toolkit")

# A kernel of each header, as ptxas names it once demangled.
KERNELS = ("layer_norm_kernel", "linear_gemv_kernel", "embed_kernel", "write_kv_kernel",
           "attention_decode_kernel", "sample_top_k_top_p_kernel", "lm_head_choice_kernel", "gemm_mma_kernel",
           "gemm_simt_kernel")


@pytest.fixture(scope="module")
def records():
    return cuda_build.resource_report((80, 90))


def test_every_kernel_compiles_for_both_archs(records):
    entries = {(r.arch, r.name) for r in records if r.entry}
    for kernel in KERNELS:
        for arch in (80, 90):
            assert any(kernel in name for a, name in entries if a == arch), (kernel, arch)


def test_no_spills_and_no_stack_frame(records):
    bad = [r for r in records if r.spill_stores or r.spill_loads or r.stack_frame]
    assert not bad, cuda_build.format_report(bad)


def test_layer_norm_fits_1024_threads(records):
    """__launch_bounds__(1024): at most 64 registers per thread, or a 1024-thread row would not launch."""
    layer_norm = [r for r in records if r.entry and "layer_norm_kernel" in r.name]
    assert layer_norm and all(r.registers <= 64 for r in layer_norm), cuda_build.format_report(layer_norm)


def test_the_nvcc_build_of_gpt2fast_C_imports(tmp_path):
    """setup.py's own nvcc command (bindings + every kernel, pybind11, static cudart) builds a module that
    imports without a GPU and turns a launch on a machine without a driver into a clear RuntimeError.
    One arch (sm_90) keeps it to about a minute on 2 cores; the resource report covers sm_80's device code."""
    import subprocess

    import torch

    output = tmp_path / "_C.so"
    done = subprocess.run(cuda_build.nvcc_extension_command(output, (90,)), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    module = cuda_build.load_module(output, "_C")
    assert module.EMULATED is False and module.DTYPE_FLOAT16 == 1
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="layer_norm failed: cuda"):
            module.layer_norm(0, 0, 0, 0, 1, 8, 8, 1e-5, module.DTYPE_FLOAT32, 0)
