"""Compile every Triton kernel variant ahead of time for a GPU we do not have, and read its resource use.

``compile_variant`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``,
which needs no GPU: Triton lowers to PTX and runs its bundled ``ptxas`` to a cubin. Where the numbers
come from:

- registers and stack frame: ``cuobjdump --dump-resource-usage`` on the cubin (``REG``, ``STACK``;
  ``$CUDA_HOME/bin/cuobjdump`` if present, else the one bundled with Triton). Triton's own
  metadata has ``n_regs``/``n_spills`` only after loading the cubin on a device.
- spill stores/loads: ``ptxas -v`` (Triton's bundled ptxas, same flags as Triton's) run again on
  the PTX: Triton discards its own ptxas log, and a cache hit runs no ptxas at all.
- shared memory: ``metadata.shared`` is what Triton allocates dynamically (reduction scratch,
  pipelining buffers); the cubin's ``SHARED`` is static shared memory (on sm_90 ptxas reserves 1 KB
  per block once a kernel uses shared memory at all). A block needs the sum: ``shared``.

A variant is a dict ``name, fn, signature, constexprs, num_warps`` and optionally
``divisible_by_16`` (names of integer arguments the JIT would see as multiples of 16: GPT-2's
widths and strides are). Pointers are always marked 16-byte aligned, as torch allocations are, so
the compiled code vectorises like the code the JIT builds on the GPU. The JIT also turns an
integer argument equal to 1 into a constant: a variant for that case lists it in ``constexprs``
(``embed``'s unit-stride ids).

A process that imported triton with ``TRITON_INTERPRET=1`` cannot compile (every ``@triton.jit``
function in it, ``tl.sum``'s included, is an interpreter object), so there the compiling runs in
one fresh Python process without that variable (``compile_all`` batches all variants into one).

Run ``python -m gpt2fast.ops.triton.aot`` to print the table for sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time

ARCHES = (80, 90)
# shared memory one block may use (opt-in maximum): A100 163 KB, H100 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# modules of this package that hold no kernels (counters: the split-K ticket buffer)
NOT_KERNELS = {"aot", "counters"}


def _compiles_here(fn) -> bool:
    """Whether this process can compile ``fn``: not when triton was imported with the interpreter on.

    Then every ``@triton.jit`` function, ``tl.sum``'s implementation included, is an interpreter
    object that the compiler cannot lower, so compiling happens in a fresh process without
    ``TRITON_INTERPRET``.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(fn, InterpretedFunction):
        return False
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn!r} is not a @triton.jit kernel")
    return True


def _compile_in_subprocess(names: list[str], arches: tuple[int, ...]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "gpt2fast.ops.triton.aot", "--json", "--arch", *map(str, arches), "--names", *names]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {names} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _cuobjdump() -> str:
    cuda = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if os.path.exists(cuda):
        return cuda
    import triton.backends.nvidia as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else (shutil.which("cuobjdump") or "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, spills and static shared memory of the one kernel in ``cubin``, from cuobjdump.

    Example (skipped: needs a compiled kernel, see ``compile_variant``):
        >>> resource_usage(compiled.asm["cubin"])["registers"] < 255  # doctest: +SKIP
        True
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), None)
    if line is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    fields = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return dict(
        registers=fields["REG"],
        stack=fields.get("STACK", 0),
        static_shared=fields.get("SHARED", 0),
        local=fields.get("LOCAL", 0),
    )


def _spills(ptxas_log: str) -> tuple[int, int]:
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if found is None:  # never report "no spills" because the log format changed
        raise RuntimeError(f"no spill counts in the ptxas log:\n{ptxas_log}")
    return int(found.group(1)), int(found.group(2))


def _ptxas_log(ptx: str, arch: int) -> str:
    """``ptxas -v`` on Triton's PTX: the spill stores/loads line (cuobjdump reports only stack/local)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", src,
             "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return done.stdout + done.stderr


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one kernel variant for ``sm_<arch>`` and return its resource use.

    Returns ``name, arch, num_warps, registers, spill_stores, spill_loads, stack, shared_dynamic,
    shared_static, shared, compile_s, griddepcontrol`` (bytes for spills, stack and shared memory; ``shared`` is
    the per-block total; ``griddepcontrol``: the PTX's programmatic-dependent-launch instructions, sorted;
    ``loads_before_wait``: global loads in the PTX before its ``griddepcontrol.wait``; ``unmarked_loads_before_wait``:
    those of them not ``evict_first``, the mark of a PDL decode linear's weight prefetch).

    Example (skipped in doctests: about a second of compiling; tests/test_triton_compile.py runs it):
        >>> from gpt2fast.ops.triton.layer_norm import COMPILE_VARIANTS
        >>> r = compile_variant(COMPILE_VARIANTS[0], 90)  # doctest: +SKIP
        >>> r["spill_stores"], r["registers"] < 255  # doctest: +SKIP
        (0, True)
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if arch not in variant_arches(variant, (arch,)):
        raise ValueError(f"{variant['name']} compiles only for sm_{variant['arches']}, not sm_{arch}")
    fn = variant["fn"]
    if not _compiles_here(fn):
        return _compile_in_subprocess([variant["name"]], (arch,))[0]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # explicit: 3.9 warns that its default flips in 3.10
    signature = dict(variant["signature"])
    divisible = set(variant.get("divisible_by_16", ()))
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, ty in signature.items()
        if ty.startswith("*") or name in divisible
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(variant["constexprs"]), attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant["num_warps"]})
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"])
    spill_stores, spill_loads = _spills(_ptxas_log(compiled.asm["ptx"], arch))
    # programmatic dependent launch's instructions in the PTX: "wait", "launch_dependents"
    ptx = compiled.asm["ptx"]
    griddepcontrol = sorted(set(re.findall(r"griddepcontrol\.(\w+)", ptx)))
    wait = ptx.find("griddepcontrol.wait")
    before_wait = re.findall(r"ld\.global[\w.:]*", ptx[:wait]) if wait >= 0 else []  # reads before it
    loads_before_wait = len(before_wait)
    # the weight tile a PDL decode linear prefetches is loaded evict_first (ops/triton/linear.py); anything else
    # read before the wait may be an earlier kernel's output, not yet written
    unmarked_loads_before_wait = sum("evict_first" not in load for load in before_wait)
    return dict(
        name=variant["name"],
        arch=arch,
        num_warps=variant["num_warps"],
        registers=usage["registers"],
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        stack=usage["stack"],
        shared_dynamic=int(compiled.metadata.shared),
        shared_static=usage["static_shared"],
        shared=int(compiled.metadata.shared) + usage["static_shared"],
        compile_s=seconds,
        griddepcontrol=griddepcontrol,
        loads_before_wait=loads_before_wait,
        unmarked_loads_before_wait=unmarked_loads_before_wait,
    )


def kernel_modules() -> list[str]:
    """Names of the kernel modules of ``gpt2fast.ops.triton`` (every module but those in ``NOT_KERNELS``).

    Example:
        >>> "gpt2fast.ops.triton.layer_norm" in kernel_modules()
        True
    """
    import gpt2fast.ops.triton as package

    return sorted(
        f"{package.__name__}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if info.name not in NOT_KERNELS and not info.ispkg
    )


def all_variants() -> list[dict]:
    """Every ``COMPILE_VARIANTS`` entry of every kernel module; a module that fails to import raises.

    Example:
        >>> names = [v["name"] for v in all_variants()]
        >>> len(names) == len(set(names)) and "layer_norm_fp16_b256" in names
        True
    """
    variants = []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)  # errors propagate: no kernel is skipped silently
        if not hasattr(module, "COMPILE_VARIANTS"):
            raise AttributeError(f"{module_name} defines no COMPILE_VARIANTS")
        variants.extend(module.COMPILE_VARIANTS)
    names = [v["name"] for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate compile variant names: {duplicates}")
    return variants


def compile_all(variants: list[dict] | None = None, arches: tuple[int, ...] = ARCHES) -> list[dict]:
    """``compile_variant`` for every variant (default ``all_variants()``) and arch, in one process.

    Under ``TRITON_INTERPRET=1`` (the test suite on CPU) the compiling runs in one fresh process.

    Example (skipped in doctests: minutes of compiling):
        >>> rows = compile_all(arches=(90,))  # doctest: +SKIP
        >>> {r["arch"] for r in rows}  # doctest: +SKIP
        {90}
    """
    variants = all_variants() if variants is None else variants
    if variants and not _compiles_here(variants[0]["fn"]):
        return _compile_in_subprocess([v["name"] for v in variants], arches)
    return [compile_variant(v, arch) for v in variants for arch in variant_arches(v, arches)]


def variant_arches(variant: dict, arches: tuple[int, ...] = ARCHES) -> tuple[int, ...]:
    """The arches of ``arches`` a variant compiles for: all, or those its ``"arches"`` names (a variant using an
    instruction of newer GPUs only, such as programmatic dependent launch's ``griddepcontrol`` on sm_90).

    Example:
        >>> variant_arches({"name": "k"}, (80, 90)), variant_arches({"name": "k", "arches": (90,)}, (80, 90))
        ((80, 90), (90,))
    """
    return tuple(a for a in arches if a in variant.get("arches", arches))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES))
    parser.add_argument("--names", nargs="*", help="only these variants")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    variants = all_variants()
    if args.names:
        by_name = {v["name"]: v for v in variants}
        missing = [n for n in args.names if n not in by_name]
        if missing:
            parser.error(f"unknown variants: {missing}")
        variants = [by_name[n] for n in args.names]
    rows = compile_all(variants, tuple(args.arch))
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['name']:40s} sm_{r['arch']} regs={r['registers']:3d} spills={r['spill_stores']}/{r['spill_loads']} "
              f"shared={r['shared']} {r['compile_s']:.2f}s")


if __name__ == "__main__":
    main()
