"""The native CPU module built again with ASan+UBSan, for tests (CI runs the CPU kernel tests on it once).

``pip install`` builds ``gpt2fast._cpu`` (setup.py). This builds the same sources as ``_cpu_asan`` with
``-fsanitize=address,undefined`` into the build cache (``cuda_build.cache_dir()``), keyed by the sources, the
flags and the compiler. ``GPT2FAST_CPU_SANITIZE=1`` makes ``gpt2fast.ops.cpu`` import it instead (libasan must
be preloaded: ``sanitized-pytest`` does both).

Example (CI): ``python -m gpt2fast.ops.cpu_build sanitized-pytest tests/test_cpu_ops.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from gpt2fast.ops import cuda_build

ROOT = Path(__file__).resolve().parents[2]
CPU_DIR = ROOT / "csrc" / "cpu"
SOURCES = ["bindings.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_portable.cpp"]
MODULE = "_cpu_asan"
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-O1", "-g", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", f"-DGPT2FAST_CPU_MODULE={MODULE}"]


def build_sanitized() -> Path:
    """Build (or find cached) the ASan+UBSan module; returns its ``.so`` path.

    Example:
        >>> build_sanitized().suffix  # doctest: +SKIP
        '.so'
    """
    sources = [CPU_DIR / name for name in SOURCES]
    if not all(p.is_file() for p in sources):
        raise cuda_build.BuildError(f"{CPU_DIR} not found: the sanitized CPU module builds from a source checkout")
    includes = [cuda_build.pybind11_include(), sysconfig.get_paths()["include"]]
    digest = cuda_build._sources_digest([*sources, *cuda_build._headers(CPU_DIR)])
    cxx = cuda_build.compiler()
    digest.update("\0".join(FLAGS).encode() + cuda_build._compiler_version(cxx).encode())
    output = cuda_build.cache_dir() / f"{MODULE}-{digest.hexdigest()[:20]}.so"
    if output.is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}")
    command = [cxx, *FLAGS, *(f"-I{d}" for d in includes), *map(str, sources), "-o", str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise cuda_build.BuildError(f"building {MODULE} failed:\n{' '.join(command)}\n{done.stderr[-6000:]}")
    os.replace(tmp, output)  # whole or not at all, even with concurrent builders
    return output


def sanitized_module() -> ModuleType:
    """The ASan+UBSan module, imported (libasan must already be loaded: see ``cuda_build.sanitizer_env``)."""
    if not cuda_build.asan_preloaded():
        raise RuntimeError("GPT2FAST_CPU_SANITIZE=1 needs libasan preloaded: run under "
                           "`python -m gpt2fast.ops.cpu_build sanitized-pytest ...`")
    return cuda_build.load_module(build_sanitized(), MODULE)


def _libstdcxx() -> str:
    done = subprocess.run([cuda_build.compiler(), "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["sanitized-pytest"]:
        print("usage: python -m gpt2fast.ops.cpu_build sanitized-pytest [pytest args]", file=sys.stderr)
        return 2
    build_sanitized()  # before the sanitizer slows the compiler's parent
    env = cuda_build.sanitizer_env() | {"GPT2FAST_CPU_SANITIZE": "1"}
    # libstdc++ preloaded too: ASan intercepts __cxa_throw only if libstdc++ is loaded when ASan starts (python
    # itself does not link it), else the first C++ exception (a ValueError for bad input) aborts.
    env["LD_PRELOAD"] = f"{env['LD_PRELOAD']} {_libstdcxx()}"
    return subprocess.run([sys.executable, "-m", "pytest", *args[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
