"""Shared fixtures: Hugging Face GPT-2 folders with random (never zero) weights, written to disk."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel: without a GPU, turn the CPU
# interpreter on here, before any test module imports triton (the gpt2fast.ops.triton kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (`pytest -n 2`): each worker takes its share of the cores, it and the processes its tests start
# (servers, CLI runs), or the workers' OpenMP threads spin against each other (see one_torch_thread below).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# Configs the parity tests run on: tiny odd shapes plus the real 124M shape.
TINY = dict(n_layer=3, n_embd=96, n_head=6, vocab_size=1000, n_positions=64)
ODD = dict(n_layer=2, n_embd=60, n_head=5, vocab_size=777, n_positions=128, n_inner=100,
           scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with random values: biases and LayerNorms too, so none can be ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "ln" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("wpe.weight"):
                param.copy_(0.5 * noise)  # strong positions: greedy output varies instead of looping on one token
            else:
                param.copy_(0.05 * noise)
    return model


def hf_model(config: dict, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    return randomize_(GPT2LMHeadModel(GPT2Config(**config)).eval(), seed)


@functools.cache
def gpt2_vocab_files() -> tuple[str, str]:
    """GPT-2's ``vocab.json`` and ``merges.txt`` (as the Hub's ``gpt2`` repo ships them), rebuilt from the ranks
    gpt2fast ships: each merge is the pair that BPE with the lower ranks leaves of its token."""
    from tiktoken.load import load_tiktoken_bpe

    from gpt2fast.tokenizer import ENDOFTEXT, GPT2_EOT_ID, GPT2_RANKS_SHA256, PACKAGED_RANKS

    ranks = load_tiktoken_bpe(str(PACKAGED_RANKS), expected_hash=GPT2_RANKS_SHA256)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}  # the data-gym bytes
    text = lambda token: "".join(char[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1])[256:]:
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}\n")
    vocab = {text(token): rank for token, rank in ranks.items()} | {ENDOFTEXT: GPT2_EOT_ID}
    return json.dumps(vocab), "#version: 0.2\n" + "".join(merges)


def save_hf(model, folder: Path, fmt: str) -> Path:
    """Write ``model`` as a HF folder: ``safetensors``, ``sharded``, ``bin`` (transformers 4 style: the
    LM model's state dict with the ``transformer.`` prefix and the tied head), or ``bin-hub`` (as the
    real ``gpt2`` repo ships it: no prefix, with the causal-mask buffers). Every folder gets GPT-2's
    vocab files: a folder whose vocabulary is not GPT-2's 50257 tokens must bring its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_vocab_files()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="50KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if fmt == "bin-hub":
            state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
            n = model.config.n_positions
            for i in range(model.config.n_layer):
                state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
                state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Callable[..., tuple[object, Path]]:
    """``hf_folder(config_dict, fmt="safetensors", seed=0)`` -> (HF model, folder); cached per session."""
    cache: dict[str, tuple[object, Path]] = {}

    def make(config: dict, fmt: str = "safetensors", seed: int = 0):
        key = json.dumps([config, fmt, seed], sort_keys=True)
        if key not in cache:
            model = hf_model(config, seed)
            folder = tmp_path_factory.mktemp("hf") / "model"
            cache[key] = (model, save_hf(model, folder, fmt))
        return cache[key]

    return make


# ---- CUDA kernels on the CPU: the emulated module (csrc/ built by g++ against csrc/emu) ----------


def _sanitized_run() -> bool:
    return os.environ.get("GPT2FAST_EMU_SANITIZE", "0") == "1"


@pytest.fixture(scope="session")
def emu():
    """The emulated CUDA module (built on first use, cached); the ASan+UBSan build under GPT2FAST_EMU_SANITIZE=1."""
    from gpt2fast.ops import cuda

    module = cuda.emulated_module()
    yield module
    module.set_order(-1)


# Thread orders each emulated kernel test runs in: forward and reverse (a missing __syncthreads shows in
# at least one). The sanitized run (slow, -O0) runs forward only: it looks for memory errors, not races.
EMU_ORDERS = [0] if _sanitized_run() else [0, 1]


@pytest.fixture(params=EMU_ORDERS, ids=lambda o: f"order{o}")
def order(request, emu) -> int:
    emu.set_order(request.param)
    yield request.param
    emu.set_order(-1)


# The tensor-core kernels' tests add order 3, warp by warp (a warp runs ahead to the next block barrier, so a
# cp.async that refills a stage another warp still reads shows up); the sanitized run again forward only.
EMU_WARP_ORDERS = [0] if _sanitized_run() else [0, 1, 3]


@pytest.fixture(params=EMU_WARP_ORDERS, ids=lambda o: f"order{o}")
def warp_order(request, emu) -> int:
    emu.set_order(request.param)
    yield request.param
    emu.set_order(-1)


@pytest.fixture
def poisoned_cuda_outputs(monkeypatch):
    """Every tensor ``gpt2fast.ops.cuda`` allocates for a kernel starts as NaN (floats) or -1 (integers),
    so an element the kernel fails to write cannot pass. Use with ``pytest.mark.usefixtures``."""
    from gpt2fast.ops import cuda

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(cuda, "_empty", poisoned)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts one element past a 16-byte boundary (forces a kernel's scalar path)."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    shift = (16 - buf.data_ptr() % 16) // t.element_size() + 1
    view = buf[shift : shift + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module whose tests share the two cores with a server process: spinning
    OpenMP threads of two processes stall both (a 20-token generate: 7.8 s at two threads, 0.07 s at one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
