"""Builds what ``csrc/`` compiles into, besides ``gpt2fast._C`` itself (that one is setup.py's):

* the **emulated module**: the same ``csrc/bindings.cpp`` and kernel headers compiled by g++ with
  ``csrc/emu/cuda_emu.h`` force-included, a Python module whose kernels run on CPU tensors. It is
  built on first use and cached by a hash of the sources and flags in ``cache_dir()``; a second
  variant is built with ``-fsanitize=address,undefined`` (loadable only with libasan preloaded:
  ``sanitizer_env()``).
* the **nvcc resource report**: every kernel compiled by nvcc for sm_80 and sm_90 with
  ``-Xptxas -v``, parsed into registers / stack frame / spills / shared memory per kernel.

This module imports neither torch nor the compiled code, so setup.py can load it from its path and
share ``nvcc_command``'s flags. Run ``python -m gpt2fast.ops.cuda_build report`` for the table.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
BINDINGS = CSRC / "bindings.cpp"
EMU_HEADER = CSRC / "emu" / "cuda_emu.h"
DEFAULT_ARCHS = (80, 90)

# Flags of every emulated build. -fno-strict-aliasing is not optional: kernels read uint4 vectors
# through half/bfloat16 pointers, which g++ otherwise miscompiles (seen: f16 attention off by 0.5).
EMU_FLAGS = ["-std=c++20", "-fno-strict-aliasing", "-fPIC", "-shared", "-fvisibility=hidden", "-Wno-unknown-pragmas",
             "-DCUDA_EMU=1"]  # fmt: skip
# -O1 / -O0: measured on 2 cores, bindings.cpp takes 11 s at -O0, 14 s at -O1, 19 s at -O2; with ASan+UBSan
# 26 s at -O0 and 36 s at -O1. The kernels run about as fast at -O1; the sanitized build runs a few shapes.
OPTIMIZE = ["-O1"]
SANITIZE = ["-O0", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


class BuildError(RuntimeError):
    """A compiler or toolkit needed for a build is missing, or the compiler failed (the message says which)."""


def cache_dir() -> Path:
    """Where built modules live: ``$GPT2FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpt2fast``, else ``~/.cache/gpt2fast``.

    Example:
        >>> cache_dir().name in ("gpt2fast",) or "GPT2FAST_CACHE_DIR" in os.environ
        True
    """
    if os.environ.get("GPT2FAST_CACHE_DIR"):
        return Path(os.environ["GPT2FAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt2fast"


def cuda_home() -> Path | None:
    """The CUDA toolkit: ``$CUDA_HOME`` / ``$CUDA_PATH``, else the toolkit of the nvcc on ``PATH``, else
    ``/usr/local/cuda``: the first of these that holds ``include/cuda_fp16.h``; None if none does.

    Example:
        >>> cuda_home() is None or (cuda_home() / "include" / "cuda_fp16.h").is_file()
        True
    """
    candidates = [Path(os.environ[var]) for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)  # (a wrapper script resolves to itself)
    candidates.append(Path("/usr/local/cuda"))
    return next((c for c in candidates if (c / "include" / "cuda_fp16.h").is_file()), None)


def nvcc_path() -> str | None:
    """nvcc's path (on ``PATH`` or in ``cuda_home()/bin``), or None.

    Example:
        >>> nvcc_path() is None or nvcc_path().endswith("nvcc")
        True
    """
    home = cuda_home()
    candidate = home / "bin" / "nvcc" if home else None
    if candidate and candidate.is_file():
        return str(candidate)
    return shutil.which("nvcc")


def cuda_include() -> Path:
    """The toolkit's include dir, which must hold ``cuda_fp16.h`` (the emulated build uses its half/bf16 types).

    Example:
        >>> try:
        ...     found = (cuda_include() / "cuda_fp16.h").is_file()
        ... except BuildError:
        ...     found = True
        >>> found
        True
    """
    home = cuda_home()
    if home is None or not (home / "include" / "cuda_fp16.h").is_file():
        raise BuildError(
            "cuda_fp16.h not found (looked in $CUDA_HOME, $CUDA_PATH, nvcc's toolkit and /usr/local/cuda): the "
            "emulated CUDA build needs the CUDA toolkit's headers (no GPU needed); install the toolkit or set CUDA_HOME"
        )
    return home / "include"


def compiler() -> str:
    """The host C++ compiler for emulated builds: ``$CXX``, else ``g++`` (BuildError if absent).

    Example:
        >>> try:
        ...     name = compiler()
        ... except BuildError:
        ...     name = "none"
        >>> isinstance(name, str)
        True
    """
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(f"C++ compiler {cxx!r} not found: the emulated CUDA build needs g++ >= 12 (or set CXX)")
    return path


def pybind11_include() -> str:
    """pybind11's header dir (BuildError if pybind11 is not installed).

    Example:
        >>> try:
        ...     found = Path(pybind11_include(), "pybind11", "pybind11.h").is_file()
        ... except BuildError:
        ...     found = True
        >>> found
        True
    """
    try:
        import pybind11
    except ImportError as err:
        raise BuildError("pybind11 is not installed: pip install pybind11 (the CUDA bindings use it)") from err
    return pybind11.get_include()


def emulator_unavailable_reason() -> str:
    """Why the emulated module cannot be built here (empty when it can).

    Example:
        >>> isinstance(emulator_unavailable_reason(), str)
        True
    """
    if not BINDINGS.is_file():
        return f"{BINDINGS} not found: the emulated CUDA module builds from a source checkout"
    try:
        compiler(), cuda_include(), pybind11_include()
    except BuildError as err:
        return str(err)
    return ""


def _sources_digest(paths: list[Path]) -> hashlib._Hash:
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest


def _headers(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.suffix in (".h", ".cuh", ".hpp")]


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def emulated_command(source: Path, output: Path, module_name: str, *, sanitize: bool = False,
                     include_dirs: tuple[Path, ...] = ()) -> list[str]:  # fmt: skip
    """The g++ command that builds ``source`` as the emulated Python module ``module_name``.

    Example:
        >>> cmd = emulated_command(BINDINGS, Path("m.so"), "_C_emu")  # doctest: +SKIP
        >>> "-fno-strict-aliasing" in cmd and "-include" in cmd  # doctest: +SKIP
        True
    """
    includes = [CSRC, *include_dirs, cuda_include(), Path(pybind11_include()), Path(sysconfig.get_paths()["include"])]
    return [
        compiler(), *EMU_FLAGS, *(SANITIZE if sanitize else OPTIMIZE), f"-DGPT2FAST_MODULE_NAME={module_name}",
        "-include", str(EMU_HEADER), *(f"-I{d}" for d in includes), str(source), "-o", str(output),
    ]  # fmt: skip


def build_emulated(source: Path = BINDINGS, module_name: str = "_C_emu", *, sanitize: bool = False,
                   include_dirs: tuple[Path, ...] = ()) -> Path:  # fmt: skip
    """Build (or find cached) the emulated module from ``source``; returns the ``.so`` path.

    The cache key hashes the command, the compiler's version, ``source`` and every header under
    ``csrc/`` and ``include_dirs``. Concurrent builds (pytest-xdist workers, parallel CI jobs) are safe and
    compile once: the first takes a lock file beside the output, the others wait for it and find the module
    built; the compiler writes a temporary file that is renamed into place, so no one loads a half-written one.

    Example:
        >>> build_emulated().suffix  # doctest: +SKIP
        '.so'
    """
    source = Path(source).resolve()
    probe = emulated_command(source, Path("OUT"), module_name, sanitize=sanitize, include_dirs=include_dirs)
    digest = _sources_digest([source, *_headers(CSRC, source.parent, *include_dirs)])
    digest.update("\0".join(probe).encode() + _compiler_version(probe[0]).encode())
    output = cache_dir() / f"{module_name}-{digest.hexdigest()[:20]}.so"
    if output.is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(output.with_name(output.name + ".lock")):
        if output.is_file():  # built by another process while this one waited
            return output
        fd, tmp = tempfile.mkstemp(prefix=f".{module_name}-", suffix=".so", dir=output.parent)
        os.close(fd)
        try:
            command = emulated_command(source, Path(tmp), module_name, sanitize=sanitize, include_dirs=include_dirs)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise BuildError(f"building {module_name} failed:\n{' '.join(command)}\n{done.stderr[-6000:]}")
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return output


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released when the holder exits, even killed).

    Without ``fcntl`` (not POSIX) builds may overlap: still correct (the rename), only slower.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_LOADED: dict[str, ModuleType] = {}


def nvcc_extension_command(output: Path, archs: tuple[int, ...]) -> list[str]:
    """The whole nvcc command that builds ``gpt2fast._C`` (setup.py runs it; a test runs it for one arch).

    Example:
        >>> nvcc_extension_command(Path("_C.so"), (90,))[-2:]  # doctest: +SKIP
        ['-o', '_C.so']
    """
    import pybind11  # a build requirement, needed only here

    extra = [
        "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", "-DGPT2FAST_MODULE_NAME=_C",
    ]  # fmt: skip
    return nvcc_command(BINDINGS, output, archs, extra)


def load_module(path: Path, module_name: str) -> ModuleType:
    """Import a built extension from its path (once per path).

    Example:
        >>> load_module(build_emulated(), "_C_emu").EMULATED  # doctest: +SKIP
        True
    """
    key = str(path)
    if key not in _LOADED:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[key] = module
    return _LOADED[key]


def asan_preloaded() -> bool:
    """Whether libasan is loaded in this process (an ASan-built module can only be imported then).

    Example:
        >>> isinstance(asan_preloaded(), bool)
        True
    """
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def emulated_module(sanitize: bool = False) -> ModuleType:
    """The CPU-emulated build of ``csrc/bindings.cpp`` (built and cached on first use); ``sanitize``: ASan+UBSan.

    Its functions take the same integers as ``gpt2fast._C``'s and run the kernels on host memory;
    ``set_order(k)`` picks the thread order of later launches. Raises BuildError when g++, the CUDA
    headers or pybind11 are missing, RuntimeError for ``sanitize`` without libasan preloaded.

    Example:
        >>> emulated_module().EMULATED  # doctest: +SKIP
        True
    """
    if sanitize and not asan_preloaded():
        raise RuntimeError(
            "the ASan+UBSan build can only be imported when libasan is loaded first: run Python with "
            "sanitizer_env() (LD_PRELOAD of g++'s libasan.so)"
        )
    name = "_C_emu_asan" if sanitize else "_C_emu"
    return load_module(build_emulated(BINDINGS, name, sanitize=sanitize), name)


def asan_runtime() -> str:
    """Path of g++'s ``libasan.so`` (to ``LD_PRELOAD`` before Python loads an ASan-built module).

    Example:
        >>> asan_runtime().endswith(".so")  # doctest: +SKIP
        True
    """
    done = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    path = done.stdout.strip()
    if not os.path.isabs(path):
        raise BuildError(f"{compiler()} has no libasan.so (it printed {path!r})")
    return path


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess that imports the ASan+UBSan module: libasan preloaded, leaks off (Python's
    own allocations would drown the report), UBSan fatal with a stack trace.

    Example:
        >>> sanitizer_env({"PATH": "/bin"})["ASAN_OPTIONS"]  # doctest: +SKIP
        'detect_leaks=0:abort_on_error=1'
    """
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = asan_runtime()
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


# ---- nvcc: the real compile and its resource report -------------------------------------------


def archs_from_env(default: tuple[int, ...] = DEFAULT_ARCHS) -> tuple[int, ...]:
    """GPU architectures to compile for: ``$GPT2FAST_CUDA_ARCHS`` ("80;90", "90" ...), else ``default``.

    Example:
        >>> archs_from_env() if "GPT2FAST_CUDA_ARCHS" not in os.environ else DEFAULT_ARCHS
        (80, 90)
    """
    text = os.environ.get("GPT2FAST_CUDA_ARCHS", "").strip()
    if not text:
        return default
    try:
        return tuple(int(a.strip().removeprefix("sm_")) for a in re.split(r"[;, ]+", text) if a.strip())
    except ValueError as err:
        raise ValueError(f"GPT2FAST_CUDA_ARCHS={text!r}: give compute capabilities like '80;90'") from err


def gencode_flags(archs: tuple[int, ...]) -> list[str]:
    """``-gencode`` flags: SASS for each arch, plus PTX of the newest so later GPUs can JIT it.

    Example:
        >>> gencode_flags((80, 90))
        ['-gencode', 'arch=compute_80,code=sm_80', '-gencode', 'arch=compute_90,code=[sm_90,compute_90]']
    """
    flags = []
    for i, arch in enumerate(archs):
        code = f"[sm_{arch},compute_{arch}]" if i == len(archs) - 1 else f"sm_{arch}"
        flags += ["-gencode", f"arch=compute_{arch},code={code}"]
    return flags


NVCC_FLAGS = ["-std=c++20", "-O3", "-x", "cu"]


def nvcc_command(source: Path, output: Path, archs: tuple[int, ...], extra: list[str]) -> list[str]:
    """The nvcc command setup.py builds ``gpt2fast._C`` with (host objects + device code for ``archs``).

    Example:
        >>> nvcc_command(BINDINGS, Path("_C.so"), (90,), ["-shared"])[-3:]
        ['-shared', '-o', '_C.so']
    """
    return [nvcc_path() or "nvcc", *NVCC_FLAGS, *gencode_flags(archs), f"-I{CSRC}", str(source), *extra,
            "-o", str(output)]  # fmt: skip


@dataclass(frozen=True)
class KernelResources:
    """ptxas's account of one compiled function for one arch (``entry``: a ``__global__`` kernel)."""

    arch: int
    name: str
    entry: bool
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


_COMPILING = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_FUNCTION = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(report: str, arch: int) -> list[KernelResources]:
    """Parse ``-Xptxas -v`` output (one arch) into records; register/smem lines belong to the entry before them.

    Example:
        >>> text = '''ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
        ... ptxas info    : Function properties for _Z1kPf
        ...     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
        ... ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 368 bytes cmem[0]'''
        >>> parse_ptxas(text, 90)[0]
        KernelResources(arch=90, name='_Z1kPf', entry=True, registers=40, stack_frame=8, spill_stores=4, \
spill_loads=4, shared_bytes=128)
    """
    records: dict[str, dict] = {}
    entries: set[str] = set()
    current = None
    for line in report.splitlines():
        if m := _COMPILING.search(line):
            current = m.group(1)
            entries.add(current)
            records.setdefault(current, {})
        elif m := _FUNCTION.search(line):
            current = m.group(1)
            records.setdefault(current, {})
        elif (m := _FRAME.search(line)) and current:
            records[current].update(stack_frame=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif (m := _USED.search(line)) and current:
            records[current].update(registers=int(m[1]), shared_bytes=int(m[2] or 0))
    return [
        KernelResources(arch=arch, name=name, entry=name in entries, registers=r.get("registers", 0),
                        stack_frame=r.get("stack_frame", 0), spill_stores=r.get("spill_stores", 0),
                        spill_loads=r.get("spill_loads", 0), shared_bytes=r.get("shared_bytes", 0))
        for name, r in records.items()
    ]  # fmt: skip


def kernel_headers() -> list[Path]:
    """Every kernel header the report compiles (``csrc/kernels/*.cuh``).

    Example:
        >>> all(p.suffix == ".cuh" for p in kernel_headers())
        True
    """
    return sorted((CSRC / "kernels").glob("*.cuh"))


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or (str(cuda_home() / "bin" / "cu++filt") if cuda_home() else None)
    tool = tool if tool and os.path.exists(tool) else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def resource_report(archs: tuple[int, ...] = DEFAULT_ARCHS, *, cached: bool = True) -> list[KernelResources]:
    """Compile every kernel header with nvcc for ``archs`` (``-Xptxas -v``, device code only) and parse the report.

    The launchers are inline functions, and instantiating them instantiates every kernel variant
    they can launch, so one translation unit including each header reports exactly what runs. The
    arches compile in parallel; the parsed records are cached (JSON in ``cache_dir()``) by a hash of
    the headers, flags and nvcc's version. Names are demangled. BuildError if nvcc is missing or fails.

    Example:
        >>> [r for r in resource_report((90,)) if r.spill_stores]  # doctest: +SKIP
        []
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the resource report needs it")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = _sources_digest(_headers(CSRC))
    digest.update(f"{archs}{NVCC_FLAGS}{version}".encode())
    cache = cache_dir() / f"ptxas-{digest.hexdigest()[:20]}.json"
    if cached and cache.is_file():
        return [KernelResources(**r) for r in json.loads(cache.read_text())]
    records = _compile_report(nvcc, archs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([r.__dict__ for r in records]))
    os.replace(tmp, cache)
    return records


def _compile_report(nvcc: str, archs: tuple[int, ...]) -> list[KernelResources]:
    with tempfile.TemporaryDirectory(prefix="gpt2fast-ptxas-") as tmp:
        unit = Path(tmp, "all_kernels.cu")
        unit.write_text("".join(f'#include "{p.relative_to(CSRC)}"\n' for p in kernel_headers()))
        procs = {
            arch: subprocess.Popen(
                [nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", f"-I{CSRC}", str(unit),
                 "-o", str(Path(tmp, f"sm_{arch}.cubin"))],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            for arch in archs
        }
        records = []
        for arch, proc in procs.items():
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise BuildError(f"nvcc failed for sm_{arch}:\n{output[-6000:]}")
            records += parse_ptxas(output, arch)
    names = _demangle([r.name for r in records])
    return [KernelResources(**{**r.__dict__, "name": names[r.name]}) for r in records]


def format_report(records: list[KernelResources]) -> str:
    """A markdown table of ``records``, worst first (spills, then stack, then registers).

    Example:
        >>> print(format_report([KernelResources(90, "k", True, 32, 0, 0, 0, 128)]))
        | arch | registers | stack | spill st/ld | smem | kernel |
        |---|---|---|---|---|---|
        | sm_90 | 32 | 0 | 0/0 | 128 | k |
    """
    rows = sorted(records, key=lambda r: (-(r.spill_stores + r.spill_loads), -r.stack_frame, -r.registers, r.name))
    lines = ["| arch | registers | stack | spill st/ld | smem | kernel |", "|---|---|---|---|---|---|"]
    lines += [f"| sm_{r.arch} | {r.registers} | {r.stack_frame} | {r.spill_stores}/{r.spill_loads} | "
              f"{r.shared_bytes} | {r.name}{'' if r.entry else ' (device function)'} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``report``: print the nvcc resource table (exit 1 on any spill or stack frame); ``emu``: build and print the
    emulated module's path."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["report"]:
        records = resource_report(archs_from_env())
        print(format_report(records))
        bad = [r for r in records if r.spill_stores or r.spill_loads or r.stack_frame]
        print(f"\n{len(records)} functions, {len(bad)} with spills or a stack frame")
        return 1 if bad else 0
    if args[:1] == ["emu"]:
        sanitize = "--sanitize" in args
        print(build_emulated(BINDINGS, "_C_emu_asan" if sanitize else "_C_emu", sanitize=sanitize))
        return 0
    if args[:1] == ["sanitized-pytest"]:
        return sanitized_pytest(args[1:])
    print("usage: python -m gpt2fast.ops.cuda_build report | emu [--sanitize] | sanitized-pytest [pytest args]",
          file=sys.stderr)
    return 2


def sanitized_pytest(pytest_args: list[str]) -> int:
    """Run pytest in a process with libasan preloaded and ``GPT2FAST_EMU_SANITIZE=1``: every emulated CUDA
    kernel test then runs on the ASan+UBSan build (a memory error aborts the run with ASan's report).

    Example (CI): ``python -m gpt2fast.ops.cuda_build sanitized-pytest tests/test_cuda_layer_norm.py -q``
    """
    build_emulated(BINDINGS, "_C_emu_asan", sanitize=True)  # build before the sanitizer slows the compiler's parent
    env = sanitizer_env() | {"GPT2FAST_EMU_SANITIZE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
