"""Every Triton kernel variant the launchers can launch compiles for sm_80 and sm_90 (the ``_pdl`` ones, with
programmatic dependent launch, for sm_90 only) with no register spills and shared memory within the GPU's
per-block limit.

No GPU needed: ``gpt2fast.ops.triton.aot`` compiles with ``triton.compile(..., GPUTarget("cuda",
arch, 32))`` and reads the cubin. This process runs the interpreter (conftest), so the compiling
happens in a fresh process, once per kernel module (all its variants, both arches: one Python
start-up per module, not per variant) and is shared by that module's tests. Triton caches
compiled kernels, so a second run mostly pays for those start-ups and a ``ptxas -v`` per variant.
"""

from __future__ import annotations

import pytest

from gpt2fast.ops.triton import available, unavailable_reason

pytestmark = pytest.mark.skipif(not available(), reason=unavailable_reason() or "triton available")

if available():
    from gpt2fast.ops.triton.aot import ARCHES, SHARED_LIMIT, all_variants, compile_all, variant_arches

    VARIANTS = {v["name"]: v for v in all_variants()}
    CASES = [(name, arch) for name, v in VARIANTS.items() for arch in variant_arches(v)]
else:
    ARCHES, VARIANTS, CASES = (), {}, []


def _module(variant: dict) -> str:
    kernel = variant["fn"]
    return getattr(kernel, "fn", kernel).__module__  # JITFunction and the interpreter's object both wrap .fn


@pytest.fixture(scope="module")
def resources():
    """``resources(name, arch)`` -> ``compile_variant``'s dict; compiles a module's whole variant list at once."""
    done: dict[tuple[str, int], dict] = {}

    def get(name: str, arch: int) -> dict:
        if (name, arch) not in done:
            module = _module(VARIANTS[name])
            siblings = [v for v in VARIANTS.values() if _module(v) == module]
            for row in compile_all(siblings, ARCHES):
                done[row["name"], row["arch"]] = row
        return done[name, arch]

    return get


@pytest.mark.parametrize("name, arch", CASES, ids=[f"{n}-sm{a}" for n, a in CASES])
def test_variant_compiles_without_spills_within_shared_memory(resources, name, arch):
    r = resources(name, arch)
    assert (r["spill_stores"], r["spill_loads"]) == (0, 0), f"{name} spills on sm_{arch}: {r}"
    assert r["registers"] <= 255
    assert r["shared"] <= SHARED_LIMIT[arch], f"{name} needs {r['shared']} B of shared memory on sm_{arch}"


def test_every_kernel_module_lists_variants():
    from gpt2fast.ops.triton.aot import kernel_modules

    modules = kernel_modules()
    assert {"gpt2fast.ops.triton.layer_norm", "gpt2fast.ops.triton.embed", "gpt2fast.ops.triton.write_kv"} <= set(
        modules
    )
    for variant in VARIANTS.values():
        assert set(variant) >= {"name", "fn", "signature", "constexprs", "num_warps"}, variant["name"]
        assert all(variant["signature"][k] == "constexpr" for k in variant["constexprs"]), variant["name"]


def test_pdl_variants_wait_and_signal_in_their_ptx_and_no_other_does(resources):
    """The decode linear launched with programmatic dependent launch (sm_90): its PTX holds griddepcontrol.wait
    (before it only the weight tile it prefetches is read, evict_first: nothing an earlier kernel writes) and
    griddepcontrol.launch_dependents; without PDL neither."""
    pdl = [name for name in VARIANTS if name.endswith("_pdl")]
    assert pdl and all(VARIANTS[name]["arches"] == (90,) for name in pdl)
    for name in pdl:
        assert resources(name, 90)["griddepcontrol"] == ["launch_dependents", "wait"], name
        # the first weight tile is prefetched before the wait (evict_first); nothing an earlier kernel writes is
        assert resources(name, 90)["loads_before_wait"] > 0, name
        assert resources(name, 90)["unmarked_loads_before_wait"] == 0, name
        assert resources(name.removesuffix("_pdl"), 90)["griddepcontrol"] == [], name
