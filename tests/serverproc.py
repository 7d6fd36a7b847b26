"""Run a gpt2fast HTTP command (``serve``, ``explore``) as a real process on 127.0.0.1, for tests.

Example:
    with running("serve", "--model", TINY_MODEL) as server:
        httpx.get(server.url + "/health")
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

# A model that loads in well under a second and still has GPT-2's tokenizer and vocabulary.
TINY_MODEL = 'random:{"n_layer": 2, "n_embd": 32, "n_head": 2}'


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: tempfile._TemporaryFileWrapper  # stdout + stderr (a file, so a chatty server never blocks on a pipe)

    def output(self) -> str:
        """Everything the process has printed so far (stdout and stderr)."""
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status (killing it after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@contextlib.contextmanager
def running(command: str, *args: str, ready_path: str = "/health", timeout: float = 90.0,
            module: str = "gpt2fast") -> Iterator[Server]:
    """Start ``python -m gpt2fast COMMAND ARGS --host 127.0.0.1 --port <free>``; yield once ``ready_path`` answers 200.

    ``module`` runs another entry point with the same command line (a test hook such as ``tests.poisoned_serve``).

    The process is stopped (SIGTERM, then SIGKILL) when the block ends, whatever happened inside it.
    """
    port = free_port()
    cmd = [sys.executable, "-m", module, command, *args, "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(server.url + ready_path, timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd)} did not answer {ready_path} within {timeout} s")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
