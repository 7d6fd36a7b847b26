"""The emulated module's build cache under concurrency: pytest-xdist workers build it at the same time."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from gpt2fast.ops import cuda_build

# A stand-in compiler: slow enough that every builder is inside build_emulated before the first one finishes.
FAKE_COMPILER = """
import pathlib, sys, time
log, output = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with log.open("a") as f:
    f.write("compiled\\n")
time.sleep(1.0)
output.write_bytes(b"module")
"""


def test_concurrent_builders_of_one_module_compile_it_once(tmp_path, monkeypatch):
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("GPT2FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_build, "emulated_command",
                        lambda source, output, module_name, **kw: [sys.executable, "-c", FAKE_COMPILER, str(log),
                                                                   str(output)])
    source = tmp_path / "src" / "module.cpp"
    source.parent.mkdir()
    source.write_text("// a module\n")
    start = threading.Barrier(3)
    built: list[Path] = []

    def builder() -> None:
        start.wait()
        built.append(cuda_build.build_emulated(source, "_fake"))

    threads = [threading.Thread(target=builder) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 3 and len(set(built)) == 1
    assert log.read_text() == "compiled\n"  # once, not once per builder
    assert built[0].read_bytes() == b"module"
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == [built[0].name, built[0].name + ".lock"]  # no half-written temporary files
    assert cuda_build.build_emulated(source, "_fake") == built[0] and log.read_text() == "compiled\n"  # cached
