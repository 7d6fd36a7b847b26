"""Per-op microbenchmarks: every backend of an op side by side, each number beside its roofline.

Run (pytest-benchmark; ``benchmarks/`` is outside the default testpaths, so name the file)::

    python -m pytest benchmarks/test_ops_bench.py --benchmark-only                # time the CPU cases
    python -m pytest benchmarks/test_ops_bench.py --benchmark-disable -q          # smoke test: each case once
    python -m pytest benchmarks/test_ops_bench.py --benchmark-only -m gpu         # a GPU machine: fp16, 124M
    python -m pytest benchmarks/test_ops_bench.py --benchmark-only -k "torch or reference" \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-save=cpu           # then --benchmark-compare

Providers are a parameter: ``reference`` (the naive spec, ``ops/reference.py``), ``torch``, ``cpu`` (the native
kernels, ``csrc/cpu``), ``triton``,
``cuda`` (``gpt2fast.ops.get_ops``) and ``hf`` where transformers has the same op (GPT-2's ``Conv1D`` +
``NewGELUActivation``, ``nn.LayerNorm``, the tied ``lm_head`` + argmax of greedy ``generate``). Before any
provider is timed its output is checked against ``reference`` (``assert_close`` at the dtype's tolerance),
so a fast wrong op posts no number. A provider that cannot run here is skipped with its reason.

Shapes are GPT-2 124M's (decode M = 1 and 8, a prefill M = 128; paged decode attention at batch 1 and 8).
On a CPU the cases run in fp32; Triton runs under its interpreter and CUDA as the g++ emulation, correct
but orders of magnitude slower than a GPU, so those two are timed at the real sizes only where a call
takes well under a second, and on the ``small`` shapes (a 128-wide model) that every provider also runs so
the groups still line up. ``-m gpu`` cases run everything at 124M in fp16 on CUDA, timed with a
synchronizing timer (pytest-benchmark's calibration then loops enough calls per round to hide the sync).

Reading the numbers: each op + shape + device is one pytest-benchmark group, so its table lists the
providers side by side. ``extra_info`` of each (and the "roofline" table printed at the end) holds
``bytes``: what one call must move through memory (``gpt2fast.roofline.op_bytes``: inputs read once,
outputs written once), ``achieved_gbs`` = bytes / median, and ``pct_of_floor`` = (bytes / copy bandwidth)
/ median, where the copy bandwidth is a large tensor copy on the same device counting bytes read +
written, measured once per session. 100% is what memory bandwidth allows; small shapes sit far below it
(launch and Python overhead dominate), and on a CPU the emulated CUDA numbers say nothing about a GPU.
Above 100% means the data was partly cache-resident or the copy ran slower than the op (e.g. fewer threads),
not that the floor was beaten. On a shared CPU, torch's OpenMP threads spin against other processes:
``OMP_NUM_THREADS=1`` steadies the numbers (compare ratios within a group, not absolutes across runs).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from gpt2fast.config import PRESETS, GPT2Config
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import get_ops, reference
from gpt2fast.roofline import op_bytes

BLOCK_SIZE = 16
GPT2 = PRESETS["gpt2"]
SMALL = GPT2Config(n_layer=1, n_embd=128, n_head=2, vocab_size=2053, n_positions=256)  # head_dim 64, as CUDA's
# dtype -> tolerance against the reference (which upcasts to fp32). fp32: another summation order over K <= 3072;
# fp16: one output rounding (2**-11 relative) at |y| up to ~8, with margin.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


@dataclass(frozen=True)
class Target:
    device: str
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.device}-{str(self.dtype).removeprefix('torch.')}"


CPU = Target("cpu", torch.float32)
GPU = Target("cuda", torch.float16)


@dataclass(frozen=True)
class Shape:
    """One benchmarked call: the model it comes from, its rows (tokens; sequences for attention), the
    ``op_bytes`` entry whose bytes it moves, and whether the CPU interpreter/emulator time it."""

    label: str
    config: GPT2Config
    rows: int
    kernel: str
    context: int = 1  # attention: every sequence's context length
    interpreted: bool = False  # cheap enough for the Triton interpreter on a CPU
    emulated: bool = True  # cheap enough for the emulated CUDA kernels on a CPU

    @property
    def small(self) -> bool:
        return self.config is SMALL

    def moved_bytes(self, dtype: torch.dtype) -> int:
        """What one call must move through memory, counted by ``gpt2fast.roofline``.

        Example:
            >>> Shape("qkv M1", GPT2, 1, "linear qkv").moved_bytes(torch.float16)  # weight, bias, x, y in fp16
            3549696
        """
        return op_bytes(self.config, self.rows, self.context, dtype.itemsize)[self.kernel].dram_bytes


ADD_LAYER_NORM = [
    Shape("M1 C768", GPT2, 1, "add_layer_norm", interpreted=True),
    Shape("M8 C768", GPT2, 8, "add_layer_norm", interpreted=True),
    Shape("M128 C768", GPT2, 128, "add_layer_norm"),
]
# GPT-2's linears with the epilogue the model fuses into each: qkv (bias), fc (bias + GELU), mlp proj (+ residual).
LINEAR = [
    *(Shape(f"qkv M{m} 768->2304", GPT2, m, "linear qkv") for m in (1, 8)),
    *(Shape(f"fc+gelu M{m} 768->3072", GPT2, m, "linear fc + gelu") for m in (1, 8)),
    *(Shape(f"proj+res M{m} 3072->768", GPT2, m, "linear mlp proj") for m in (1, 8)),
    Shape("qkv prefill M128 768->2304", GPT2, 128, "linear qkv"),
    Shape("small qkv M1 128->384", SMALL, 1, "linear qkv", interpreted=True),
    Shape("small fc+gelu M8 128->512", SMALL, 8, "linear fc + gelu", interpreted=True),
    Shape("small proj+res M8 512->128", SMALL, 8, "linear mlp proj", interpreted=True),
    Shape("small qkv prefill M33 128->384", SMALL, 33, "linear qkv", interpreted=True),
]
ATTENTION = [
    Shape("B1 H12 ctx1000", GPT2, 1, "attention decode", context=1000),
    Shape("B8 H12 ctx300", GPT2, 8, "attention decode", context=300),
    Shape("small B1 H2 ctx200", SMALL, 1, "attention decode", context=200, interpreted=True),
    Shape("small B8 H2 ctx37", SMALL, 8, "attention decode", context=37, interpreted=True),
]
LM_HEAD_ARGMAX = [
    *(Shape(f"M{m} V50257 C768", GPT2, m, "lm_head + choice") for m in (1, 8)),
    Shape("small M8 V2053 C128", SMALL, 8, "lm_head + choice", interpreted=True),
]
PROVIDERS = ["reference", "torch", "cpu", "triton", "cuda", "hf"]


def _cases(shapes: list[Shape]) -> list:
    """(target, shape) params: every shape on the CPU; the 124M shapes on CUDA, marked ``gpu``."""
    gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [pytest.param(t, s, id=f"{t.name}-{s.label.replace(' ', '_')}", marks=gpu if t is GPU else ())
            for t in (CPU, GPU) for s in shapes if t is CPU or not s.small]


# ---- providers ----------------------------------------------------------------------------------------------


def hf_add_layer_norm(x, residual, weight, bias, eps):
    """GPT2Block's ``hidden = attn_output + residual; ln_2(hidden)``, the add written into ``residual`` as our
    op's contract says.

    Example:
        >>> x, res, w, b = torch.randn(2, 6), torch.randn(2, 6), torch.rand(6), torch.randn(6)
        >>> res_ref = res.clone()
        >>> torch.allclose(hf_add_layer_norm(x, res, w, b, 1e-5), reference.add_layer_norm(x, res_ref, w, b, 1e-5))
        True
    """
    torch.add(residual, x, out=residual)
    return _hf_layer_norm(weight, bias, eps)(residual)


@functools.lru_cache(maxsize=4)
def _hf_layer_norm(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.nn.Module:
    """An ``nn.LayerNorm`` holding ``weight`` and ``bias``, built once per weight, outside the timing."""
    ln = torch.nn.LayerNorm(weight.shape[0], eps=eps, device=weight.device, dtype=weight.dtype)
    ln.weight.data, ln.bias.data = weight, bias
    return ln


def hf_linear(x, weight, bias, *, gelu=False, residual=None):
    """GPT-2's ``Conv1D`` (``addmm`` with the weight stored (K, N)), then ``NewGELUActivation``, then the block's
    residual add. The (K, N) copy of the weight is made once per weight, outside the timing.

    Example:
        >>> x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        >>> torch.allclose(hf_linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True), atol=1e-6)
        True
    """
    y = _conv1d(weight, bias)(x)  # (M, N)
    if gelu:
        y = _new_gelu()(y)
    return y if residual is None else residual + y


@functools.lru_cache(maxsize=4)
def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(weight.shape[0], weight.shape[1]).to(weight.device, weight.dtype)  # (nf=N, nx=K)
    conv.weight.data, conv.bias.data = weight.t().contiguous(), bias  # weight (K, N), as HF checkpoints store it
    return conv


@functools.cache
def _new_gelu() -> torch.nn.Module:
    from transformers.activations import NewGELUActivation

    return NewGELUActivation()


def hf_lm_head_argmax(x, wte):
    """GPT2LMHeadModel's tied ``lm_head`` (``nn.Linear`` without bias), then greedy ``generate``'s fp32 argmax.

    Example:
        >>> hf_lm_head_argmax(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])).tolist()
        [1]
    """
    return torch.nn.functional.linear(x, wte).float().argmax(-1)


HF = {"add_layer_norm": hf_add_layer_norm, "linear": hf_linear, "lm_head_argmax": hf_lm_head_argmax}


def _provider_op(provider: str, op: str, target: Target, shape: Shape) -> Callable:
    """The provider's function for ``op``, or a skip saying why it cannot run this case here."""
    if provider == "hf":
        pytest.importorskip("transformers")
        return HF[op]
    on_cpu = target.device == "cpu"
    if provider == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton takes CPU tensors only under its interpreter (TRITON_INTERPRET=1 before import)")
    if provider == "triton" and on_cpu and not shape.interpreted:
        pytest.skip("the Triton interpreter takes seconds per call at this size; the small shapes time it on CPU")
    try:
        return getattr(get_ops(provider, torch.device(target.device)), op)
    except (ValueError, ImportError) as err:
        pytest.skip(f"{provider} cannot run here: {err}")


# ---- inputs ---------------------------------------------------------------------------------------------------


def _randn(*shape: int, target: Target, seed: int, std: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (std * torch.randn(shape, generator=gen)).to(target.device, target.dtype)


@functools.lru_cache(maxsize=2)
def _tied_wte(config: GPT2Config, target: Target) -> torch.Tensor:
    """(V, C) token embedding, made once per model: 50257 x 768 random numbers take a while on a CPU."""
    return _randn(config.vocab_size, config.n_embd, target=target, seed=5, std=config.n_embd**-0.5)


def _linear_inputs(shape: Shape, target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """x (M, K), weight (N, K), bias (N,) and the epilogue kwargs of ``shape.kernel``; outputs of order 1."""
    c, f = shape.config.n_embd, shape.config.mlp_width
    k, n = {"linear qkv": (c, 3 * c), "linear fc + gelu": (c, f), "linear mlp proj": (f, c)}[shape.kernel]
    x = _randn(shape.rows, k, target=target, seed=1)  # (M, K)
    weight = _randn(n, k, target=target, seed=2, std=k**-0.5)  # (N, K)
    bias = _randn(n, target=target, seed=3, std=0.1)  # (N,)
    epilogue = {"linear fc + gelu": dict(gelu=True),
                "linear mlp proj": dict(residual=_randn(shape.rows, n, target=target, seed=4))}  # (M, N)
    return x, weight, bias, epilogue.get(shape.kernel, {})


def _attention_inputs(shape: Shape, target: Target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            AttentionMetadata]:
    """One decode query per sequence over a paged cache: pages handed out in random order, unused pages NaN
    (a read of a wrong page fails the check). Tables padded to n_positions / block_size like the engine's."""
    h, d, batch = shape.config.n_head, shape.config.head_dim, shape.rows
    pages = -(-shape.context // BLOCK_SIZE)
    num_blocks = batch * pages + 3
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(6)).tolist()
    tables = [order[b * pages: (b + 1) * pages] for b in range(batch)]
    k_cache = _randn(num_blocks, h, BLOCK_SIZE, d, target=target, seed=7)  # (NB, H, BS, D)
    v_cache = _randn(num_blocks, h, BLOCK_SIZE, d, target=target, seed=8)
    unused = order[batch * pages:]
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    meta = AttentionMetadata.build(tables, [shape.context] * batch, [1] * batch, block_size=BLOCK_SIZE,
                                   max_blocks=-(-shape.config.n_positions // BLOCK_SIZE), device=target.device)
    q = _randn(batch, h, d, target=target, seed=9)  # (B, H, D)
    return q, k_cache, v_cache, meta


# ---- timing ---------------------------------------------------------------------------------------------------


def _synchronized_perf_counter() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _time_and_roofline(benchmark, fn: Callable[[], object], *, provider: str, target: Target, shape: Shape,
                      bandwidth: float | None, rows: list[dict]) -> None:
    """Time ``fn`` with pytest-benchmark and store the roofline beside it (``extra_info``, the summary table)."""
    op = benchmark.name.split("[")[0].removeprefix("test_")
    benchmark.group = f"{op} {shape.label} [{target.name}]"
    if target.device == "cuda":
        benchmark._timer = _synchronized_perf_counter  # kernels are async: a round ends when the GPU is done
    benchmark(fn)
    moved = shape.moved_bytes(target.dtype)
    benchmark.extra_info.update(provider=provider, bytes=moved)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
        return
    stats = benchmark.stats.stats
    row = dict(group=benchmark.group, provider=provider, bytes=moved, median_s=stats.median, q1_s=stats.q1,
               q3_s=stats.q3, achieved_gbs=moved / stats.median / 1e9)
    if bandwidth:
        row.update(floor_s=moved / bandwidth, pct_of_floor=100 * moved / bandwidth / stats.median)
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("group", "provider")})
    rows.append(row)


@pytest.fixture
def timed(benchmark, copy_bandwidth, roofline_rows) -> Callable:
    """``timed(fn, provider, target, shape)``: the benchmark with its roofline, for one already checked op."""

    def run(fn: Callable[[], object], provider: str, target: Target, shape: Shape) -> None:
        _time_and_roofline(benchmark, fn, provider=provider, target=target, shape=shape,
                          bandwidth=copy_bandwidth(torch.device(target.device)), rows=roofline_rows)

    return run


# ---- benchmarks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("target, shape", _cases(ADD_LAYER_NORM))
def test_add_layer_norm(timed, provider: str, target: Target, shape: Shape) -> None:
    op = _provider_op(provider, "add_layer_norm", target, shape)
    c, eps = shape.config.n_embd, shape.config.layer_norm_epsilon
    x, residual = _randn(shape.rows, c, target=target, seed=1), _randn(shape.rows, c, target=target, seed=2)  # (M, C)
    weight, bias = 1 + _randn(c, target=target, seed=3, std=0.1), _randn(c, target=target, seed=4, std=0.1)  # (C,)
    want_residual = residual.clone()
    want = reference.add_layer_norm(x, want_residual, weight, bias, eps)
    got_residual = residual.clone()
    torch.testing.assert_close(op(x, got_residual, weight, bias, eps), want, **TOLERANCE[target.dtype])
    torch.testing.assert_close(got_residual, want_residual, **TOLERANCE[target.dtype])
    timed(lambda: op(x, residual, weight, bias, eps), provider, target, shape)  # residual drifts: speed only


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("target, shape", _cases(LINEAR))
def test_linear(timed, provider: str, target: Target, shape: Shape) -> None:
    op = _provider_op(provider, "linear", target, shape)
    x, weight, bias, epilogue = _linear_inputs(shape, target)
    want = reference.linear(x, weight, bias, **epilogue)  # (M, N)
    torch.testing.assert_close(op(x, weight, bias, **epilogue), want, **TOLERANCE[target.dtype])
    timed(lambda: op(x, weight, bias, **epilogue), provider, target, shape)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "hf"])  # transformers has no paged attention
@pytest.mark.parametrize("target, shape", _cases(ATTENTION))
def test_attention_decode(timed, provider: str, target: Target, shape: Shape) -> None:
    op = _provider_op(provider, "attention", target, shape)
    q, k_cache, v_cache, meta = _attention_inputs(shape, target)
    scale = shape.config.head_dim**-0.5
    want = reference.attention(q, k_cache, v_cache, meta, scale)  # (B, H, D)
    torch.testing.assert_close(op(q, k_cache, v_cache, meta, scale), want, **TOLERANCE[target.dtype])
    timed(lambda: op(q, k_cache, v_cache, meta, scale), provider, target, shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("target, shape", _cases(LM_HEAD_ARGMAX))
def test_lm_head_argmax(timed, provider: str, target: Target, shape: Shape) -> None:
    op = _provider_op(provider, "lm_head_argmax", target, shape)
    wte = _tied_wte(shape.config, target)  # (V, C)
    x = _randn(shape.rows, shape.config.n_embd, target=target, seed=1)  # (M, C)
    logits = reference.lm_head(x, wte)  # (M, V) fp32
    ids = op(x, wte)  # (M,)
    assert ids.dtype == torch.int64 and ids.shape == (shape.rows,)
    # A near-tie may break either way at 16 bits: the chosen token must score within tolerance of the best.
    chosen = logits.gather(1, ids[:, None]).squeeze(1)
    slack = TOLERANCE[target.dtype]["atol"] + TOLERANCE[target.dtype]["rtol"] * logits.abs().amax(1)
    assert bool((chosen >= logits.amax(1) - slack).all()), f"{provider} picked {ids.tolist()}"
    timed(lambda: op(x, wte), provider, target, shape)
