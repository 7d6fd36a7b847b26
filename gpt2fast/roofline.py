"""Napkin math for a decode step: bytes each kernel must move, launches, and the time that costs.

A decode step of GPT-2 is memory-bound: every weight is read once per step whatever the batch, plus
each sequence's K/V cache. This module counts, per kernel call of the Triton backend, the bytes
that must cross DRAM (inputs read once, outputs written once) and, separately, the L2 traffic on
top: the fp32 workspace our split-K designs write and read back, and the rows each ``ln_linear``
program re-reads for its LayerNorm statistics (small enough to stay in an H100's 50 MB L2). Dividing
by the memory bandwidth gives the roofline time each kernel is held against in ``benchmarks/``.
A layer is 5 launches (``ln_linear`` x 2, the residual-adding projections x 2, and the decode attention that
stores the step's k/v itself, ``write_kv_attention``); a step adds embed, the final LayerNorm and the LM head.
``predict_step`` adds a latency model on top (dependent round trips and launch gaps, eager / graph / graph with
programmatic dependent launch, per backend): a prediction with assumed constants, labelled so wherever printed.

Example:
    >>> from gpt2fast.config import PRESETS
    >>> step = decode_step(PRESETS["gpt2"], batch=1, context=128)
    >>> round(sum(k.calls * k.dram_bytes for k in step) / 1e6)  # MB per decode step
    252
    >>> sum(k.calls * k.launches for k in step)  # 5 per layer + 3
    63
    >>> round(step_time(step) * 1e6)  # us at the H100's 3.35 TB/s
    75
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from gpt2fast.config import PRESETS, GPT2Config

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
H100_FP16_FLOPS = 989e12  # dense fp16/bf16 tensor-core FLOP/s, H100 SXM (mma.sync reaches part of it; wgmma more)
H100_SMS = 132
INT32, INT64, FP32 = 4, 8, 4


@dataclass(frozen=True)
class KernelBytes:
    """One kernel of a decode step: how often it runs per step and what one call moves."""

    name: str
    calls: int  # per step
    dram_bytes: int  # per call: inputs read once + outputs written once
    # per call, L2-resident traffic on top of dram_bytes: fp32 split-K partials written and read back, and
    # (ln_linear) the x rows each split program re-reads for its LayerNorm statistics
    workspace_bytes: int = 0
    launches: int = 1  # kernel launches per call
    # per call, the dependent memory round trips on its critical path that streaming does not hide: global
    # memory (e.g. block table -> pages, ticket -> bias/residual loads) and L2 (the ticket atomic, the partials)
    dram_trips: int = 1
    l2_trips: int = 0

    def seconds(self, bandwidth: float = H100_BANDWIDTH) -> float:
        """Roofline time of one call."""
        return self.dram_bytes / bandwidth


def matrix_bytes(n: int, k: int, size: int, quantization: str | None = None) -> int:
    """Bytes of an ``(n, k)`` weight matrix: ``size`` per element, or (``"int8"``) one byte per element plus a
    4-byte fp32 scale per output row (``gpt2fast.quant``).

    Example:
        >>> matrix_bytes(768, 3072, 2), matrix_bytes(768, 3072, 2, "int8")
        (4718592, 2362368)
    """
    return n * k + n * FP32 if quantization == "int8" else size * n * k


def _linear(name: str, calls: int, rows: int, k: int, n: int, size: int, ln: bool = False,
            residual: bool = False, quantization: str | None = None) -> KernelBytes:
    """A decode linear (rows <= 64): one split-K GEMV launch that merges its partials and applies the epilogue,
    as ``ops/triton/linear.py`` launches it. ``ln``: ``ln_linear``, the LayerNorm in the prologue (its weight
    and bias read; every one of the ``cdiv(n, 32) x splits`` programs reads the rows twice more, from L2, for
    the statistics). ``residual``: the epilogue adds a ``(rows, n)`` residual. ``quantization="int8"``: the
    weight is int8 with per-row scales (``matrix_bytes``); activations, bias and sums stay as they were."""
    from gpt2fast.ops.triton.linear import BLOCK_K_DECODE, BLOCK_N_DECODE, decode_split

    splits, _ = decode_split(n, k, BLOCK_K_DECODE["fp16"])
    dram = matrix_bytes(n, k, size, quantization) + size * (n + rows * k + rows * n)  # weight, bias, x, y
    dram += size * (2 * k if ln else 0) + size * (rows * n if residual else 0)  # LayerNorm weight + bias; residual
    workspace = 2 * splits * rows * n * FP32 if splits > 1 else 0  # one split keeps its tile in registers
    if ln:
        workspace += -(-n // BLOCK_N_DECODE) * splits * 2 * rows * k * size  # the stats' two passes over x
    # weights and x, with bias and residual loaded beside them (before the ticket): one trip to DRAM; a split adds
    # the ticket atomic and the reload of the partials from L2
    return KernelBytes(name, calls, dram, workspace_bytes=workspace, l2_trips=2 if splits > 1 else 0)


def decode_step(
    config: GPT2Config, batch: int, context: int, dtype_bytes: int = 2, fused_choice: bool = True,
    quantization: str | None = None,
) -> list[KernelBytes]:
    """Every kernel of one decode step of ``batch`` sequences at ``context`` tokens each (fp16: 2 bytes).

    ``fused_choice``: the LM head picks the token (argmax / Gumbel-max) instead of writing fp32 logits.
    ``quantization="int8"``: W8A16, every weight matrix (the four linears of each layer, the tied embedding / LM
    head) read as int8 plus an fp32 scale per output row; activations, KV cache, biases and LayerNorms stay fp16.

    Example:
        >>> [k.name for k in decode_step(PRESETS["gpt2"], 1, 16)][:3]
        ['embed', 'ln_1 + linear qkv', 'write_kv + attention decode']
    """
    from gpt2fast.ops.triton.attention import decode_splits
    from gpt2fast.ops.triton.lm_head import _tiles

    b, c, s, n_layer = batch, config.n_embd, dtype_bytes, config.n_layer
    h, d, f, v = config.n_head, config.head_dim, config.mlp_width, config.vocab_size
    max_blocks = -(-config.n_positions // 16)
    splits, _ = decode_splits(b, h, max_blocks)
    attn_workspace = 2 * b * h * splits * (d + 2) * FP32 if splits > 1 else 0
    tables = INT32 * b * (max_blocks + 2)  # block tables, seq_lens, cu_seqlens
    v_tiles = -(-v // _tiles("fp16", b)[1])
    head_out = b * v_tiles * (FP32 + INT32) + b * INT64 if fused_choice else b * v * FP32
    q = quantization
    wte_rows = matrix_bytes(b, c, s, q)  # the batch's rows of wte (int8: each with its scale)
    return [
        KernelBytes("embed", 1, wte_rows + s * 2 * b * c + 2 * b * INT64, dram_trips=2),  # wte, wpe rows, out; ids
        _linear("ln_1 + linear qkv", n_layer, b, c, 3 * c, s, ln=True, quantization=q),
        # one launch: the newest position's split stores k, v and attends to them from registers (the other
        # context - 1 positions' K, V from the pages); the last split merges
        KernelBytes("write_kv + attention decode", n_layer,
                    s * (2 * b * (context - 1) * c + 2 * b * c + 2 * b * c + 2 * b * c) + b * INT64 + tables,
                    workspace_bytes=attn_workspace,  # cached K, V; k, v in; k, v into pages; q, out; slots
                    dram_trips=2, l2_trips=2 if splits > 1 else 0),  # block table, then pages; ticket, partials
        _linear("linear attn proj + residual", n_layer, b, c, c, s, residual=True, quantization=q),
        _linear("ln_2 + linear fc + gelu", n_layer, b, c, f, s, ln=True, quantization=q),
        _linear("linear mlp proj + residual", n_layer, b, f, c, s, residual=True, quantization=q),
        KernelBytes("layer_norm ln_f", 1, s * (2 * b * c + 2 * c)),  # x, y, weight + bias
        KernelBytes("lm_head" + (" + choice" if fused_choice else ""), 1,
                    matrix_bytes(v, c, s, q) + s * b * c + head_out,
                    l2_trips=2 if fused_choice else 0),  # each row tile's ticket, then the tiles' bests merged
    ]


def op_bytes(config: GPT2Config, batch: int, context: int, dtype_bytes: int = 2) -> dict[str, KernelBytes]:
    """Every kernel of ``decode_step`` by name, plus the ops the benchmarks time one by one that the step no
    longer runs as such: ``add_layer_norm`` (``residual += x; LN``), the plain ``linear qkv`` and
    ``linear fc + gelu`` (without the LayerNorm prologue), ``linear mlp proj`` (without the residual), and
    ``write_kv`` and ``attention decode`` (K, V of every context position from the pages) on their own.

    Example:
        >>> ops = op_bytes(PRESETS["gpt2"], 1, 1)
        >>> ops["linear qkv"].dram_bytes, ops["ln_1 + linear qkv"].dram_bytes - ops["linear qkv"].dram_bytes
        (3549696, 3072)
    """
    b, c, s, n_layer, f = batch, config.n_embd, dtype_bytes, config.n_layer, config.mlp_width
    max_blocks = -(-config.n_positions // 16)
    fused = next(k for k in decode_step(config, batch, context, dtype_bytes) if k.name.startswith("write_kv"))
    standalone = [
        KernelBytes("write_kv", n_layer, s * 4 * b * c + b * INT64),  # k, v in; k, v into pages; slots
        KernelBytes("attention decode", n_layer,
                    s * (2 * b * context * c + 2 * b * c) + INT32 * b * (max_blocks + 2),  # K, V, q, out, tables
                    workspace_bytes=fused.workspace_bytes),
        KernelBytes("add_layer_norm", 2 * n_layer, s * (4 * b * c + 2 * c)),  # x, residual in and out, y, w + b
        _linear("linear qkv", n_layer, b, c, 3 * c, s),
        _linear("linear fc + gelu", n_layer, b, c, f, s),
        _linear("linear mlp proj", n_layer, b, f, c, s),
    ]
    return {k.name: k for k in decode_step(config, batch, context, dtype_bytes) + standalone}


def step_time(kernels: list[KernelBytes], bandwidth: float = H100_BANDWIDTH) -> float:
    """Roofline seconds of a whole step: the sum of its kernels' DRAM bytes over the bandwidth."""
    return sum(k.calls * k.seconds(bandwidth) for k in kernels)


# The latency model's constants: assumptions about an H100 SXM, not measurements (no GPU has run our kernels yet).
# Published H100 microbenchmarks put one dependent global load under load at ~0.5-0.8 us and an L2 hit or atomic
# at ~0.2-0.3 us; a kernel boundary inside a CUDA graph costs ~1-2 us (the last wave drains, the next ramps up),
# ~0.3-0.5 us with programmatic dependent launch; an eager launch from Python ~5-10 us of host time.
DRAM_TRIP_S = 0.7e-6
L2_TRIP_S = 0.3e-6
LAUNCH_GAP_S = {"eager": 8e-6, "graph": 1.5e-6, "graph+pdl": 0.4e-6}
# A decode step's launches per backend on a GPU, (per layer, fixed); tests/test_launches.py measures that they hold.
# cuda: 5 per layer (two LayerNorm-prologue GEMVs, write_kv_attention, two GEMVs) + embed, the final LayerNorm and
# the LM head with its token choice.
BACKEND_LAUNCHES = {"triton": (5, 3), "cuda": (5, 3)}
# Of those, the ones launched with programmatic dependent launch on sm_90 (per layer, fixed): triton's four decode
# linears (ops/triton/linear.py pdl_launch); none in the cuda backend yet. Each loads its first weight tile before
# its wait, so the model takes its one DRAM round trip as hidden behind the previous kernel's tail.
PDL_LAUNCHES = {"triton": (4, 0), "cuda": (0, 0)}


@dataclass(frozen=True)
class Prediction:
    """A decode step's predicted time on one backend and launch mode, split into its three terms (seconds)."""

    backend: str
    mode: str
    launches: int
    bandwidth_s: float  # every kernel's DRAM bytes over the bandwidth: the floor
    latency_s: float  # dependent round trips on the kernels' critical paths, DRAM and L2
    launch_s: float  # the gaps between kernels

    @property
    def total_s(self) -> float:
        return self.bandwidth_s + self.latency_s + self.launch_s

    @property
    def dominant(self) -> str:
        """The largest term: ``"bandwidth"``, ``"latency"`` or ``"launches"``."""
        terms = {"bandwidth": self.bandwidth_s, "latency": self.latency_s, "launches": self.launch_s}
        return max(terms, key=terms.get)


def predict_step(config: GPT2Config, backend: str, mode: str, batch: int, context: int,
                 bandwidth: float = H100_BANDWIDTH) -> Prediction:
    """Predicted time of one fp16 decode step: bytes / bandwidth, plus the dependent memory round trips of each
    kernel times their latency, plus one launch gap per kernel (``mode``: ``LAUNCH_GAP_S``'s keys). A model, not
    a measurement: every constant above is an assumption to hold against the first GPU run.

    The kernels are ``decode_step``'s (the Triton design, 5 launches per layer + 3); a backend with more launches
    (``BACKEND_LAUNCHES``) pays each extra one a gap and a DRAM round trip of its own. ``"graph+pdl"``: the
    backend's kernels launched with programmatic dependent launch today (``PDL_LAUNCHES``) get the PDL gap, the
    others the graph gap, and each PDL kernel's weight fetch (before its wait) hides one DRAM round trip.

    Example:
        >>> p = predict_step(PRESETS["gpt2"], "triton", "graph+pdl", batch=1, context=128)
        >>> p.launches, round(p.bandwidth_s * 1e6), round(p.total_s * 1e6), p.dominant
        (63, 75, 173, 'bandwidth')
    """
    if mode not in LAUNCH_GAP_S:
        raise ValueError(f"unknown launch mode {mode!r}; use one of {', '.join(LAUNCH_GAP_S)}")
    if backend not in BACKEND_LAUNCHES:
        raise ValueError(f"no launch count for backend {backend!r}; known: {', '.join(BACKEND_LAUNCHES)}")
    kernels = decode_step(config, batch, context)
    per_layer, fixed = BACKEND_LAUNCHES[backend]
    launches = per_layer * config.n_layer + fixed
    extra = max(0, launches - sum(k.calls * k.launches for k in kernels))
    dram_trips = sum(k.calls * k.dram_trips for k in kernels) + extra
    l2_trips = sum(k.calls * k.l2_trips for k in kernels)
    pdl = 0
    if mode == "graph+pdl":
        pdl_per_layer, pdl_fixed = PDL_LAUNCHES[backend]
        pdl = pdl_per_layer * config.n_layer + pdl_fixed
        dram_trips -= pdl  # their weights' first round trip overlaps the previous kernel
    gaps = pdl * LAUNCH_GAP_S["graph+pdl"] + (launches - pdl) * LAUNCH_GAP_S["graph" if mode == "graph+pdl" else mode]
    return Prediction(backend, mode, launches, step_time(kernels, bandwidth),
                      dram_trips * DRAM_TRIP_S + l2_trips * L2_TRIP_S, gaps)


def prediction_table(config: GPT2Config, batches: list[int], context: int) -> str:
    """A markdown table of ``predict_step`` for every backend, batch and launch mode.

    Example:
        >>> print(prediction_table(PRESETS["gpt2"], [1], 128).splitlines()[0])
        | backend | batch | launches | mode | bytes us | latency us | gaps us | total us | x floor | dominant |
    """
    lines = ["| backend | batch | launches | mode | bytes us | latency us | gaps us | total us | x floor | dominant |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for backend in BACKEND_LAUNCHES:
        for batch in batches:
            for mode in LAUNCH_GAP_S:
                p = predict_step(config, backend, mode, batch, context)
                lines.append(f"| {backend} | {batch} | {p.launches} | {mode} | {p.bandwidth_s * 1e6:.1f} | "
                             f"{p.latency_s * 1e6:.1f} | {p.launch_s * 1e6:.1f} | {p.total_s * 1e6:.1f} | "
                             f"{p.total_s / p.bandwidth_s:.2f} | {p.dominant} |")
    return "\n".join(lines)


def table(config: GPT2Config, batch: int, context: int, bandwidth: float = H100_BANDWIDTH,
          quantization: str | None = None) -> str:
    """A markdown table of one decode step, per kernel: calls, MB per call, extra L2 KB, launches, roofline us.

    Example:
        >>> print(table(PRESETS["gpt2"], 1, 128).splitlines()[0])
        | kernel | calls | MB / call | L2 extra KB / call | launches | us / call | us / step |
    """
    kernels = decode_step(config, batch, context, quantization=quantization)
    lines = ["| kernel | calls | MB / call | L2 extra KB / call | launches | us / call | us / step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in kernels:
        us = k.seconds(bandwidth) * 1e6
        lines.append(f"| {k.name} | {k.calls} | {k.dram_bytes / 1e6:.3f} | {k.workspace_bytes / 1e3:.1f} | "
                     f"{k.calls * k.launches} | {us:.2f} | {k.calls * us:.2f} |")
    total = sum(k.calls * k.dram_bytes for k in kernels)
    launches = sum(k.calls * k.launches for k in kernels)
    lines.append(f"| **step** | | {total / 1e6:.1f} | | {launches} | | **{step_time(kernels, bandwidth) * 1e6:.1f}** |")
    return "\n".join(lines)


@dataclass(frozen=True)
class KernelWork:
    """One kernel of a prefill step: calls per step, and the FLOPs and DRAM bytes of one call."""

    name: str
    calls: int
    flops: float
    dram_bytes: int

    @property
    def intensity(self) -> float:
        """FLOPs per DRAM byte (the H100's ridge point is ``H100_FP16_FLOPS / H100_BANDWIDTH``, ~295)."""
        return self.flops / self.dram_bytes

    def seconds(self, flops: float = H100_FP16_FLOPS, bandwidth: float = H100_BANDWIDTH) -> float:
        """Roofline time of one call: the larger of its FLOPs at the peak and its bytes at the bandwidth."""
        return max(self.flops / flops, self.dram_bytes / bandwidth)

    def bound(self, flops: float = H100_FP16_FLOPS, bandwidth: float = H100_BANDWIDTH) -> str:
        return "compute" if self.flops / flops > self.dram_bytes / bandwidth else "memory"


def prefill_step(config: GPT2Config, batch: int, prompt_len: int, dtype_bytes: int = 2) -> list[KernelWork]:
    """Every kernel of the cuda backend's prefill of ``batch`` fresh prompts of ``prompt_len`` tokens (fp16: 2
    bytes): the LayerNorm kernel, then the tensor-core GEMM (csrc/kernels/gemm.cuh) for each linear, the flash
    attention that stores the chunk's K/V (attention_prefill.cuh), and the LM head's fused token choice over the
    ``batch`` last rows. DRAM bytes count every input once and every output once (the GEMM's re-reads of x per
    column tile and the flash kernel's K/V re-reads per query tile hit L2); FLOPs are the multiply-adds x 2 (the
    causal attention counts the lower triangle).

    Example:
        >>> step = prefill_step(PRESETS["gpt2"], batch=1, prompt_len=512)
        >>> qkv = next(k for k in step if k.name == "linear qkv")
        >>> round(qkv.flops / 1e9, 2), round(qkv.intensity), qkv.bound()
        (1.81, 271, 'memory')
    """
    t, b, s = batch * prompt_len, batch, dtype_bytes
    c, h, d, f, v, n_layer = (config.n_embd, config.n_head, config.head_dim, config.mlp_width, config.vocab_size,
                              config.n_layer)  # fmt: skip

    def gemm(name: str, k: int, n: int, residual: bool = False) -> KernelWork:
        # weight, bias, x, out (+ the residual read)
        return KernelWork(name, n_layer, 2.0 * t * k * n, s * (n * k + n + t * k + t * n + (t * n if residual else 0)))

    layer_norm = KernelWork("layer_norm", 2 * n_layer, 8.0 * t * c, s * (2 * t * c + 2 * c))
    max_blocks = -(-config.n_positions // 16)
    return [
        KernelWork("embed", 1, 1.0 * t * c, s * 3 * t * c + 2 * t * INT64),
        layer_norm,
        gemm("linear qkv", c, 3 * c),
        # q, k, v in; k, v into the pages; out; slots and tables. Q K^T and P V over the causal triangle
        KernelWork("write_kv + attention prefill", n_layer, 2.0 * b * h * prompt_len * (prompt_len + 1) * d,
                   s * 6 * t * c + t * INT64 + INT32 * b * (max_blocks + 2)),
        gemm("linear attn proj + residual", c, c, residual=True),
        gemm("linear fc + gelu", c, f),
        gemm("linear mlp proj + residual", f, c, residual=True),
        KernelWork("layer_norm ln_f", 1, 8.0 * b * c, s * (2 * b * c + 2 * c)),
        KernelWork("lm_head + choice", 1, 2.0 * b * c * v, s * (v * c + b * c) + b * INT64),
    ]


def prefill_table(config: GPT2Config, batch: int, prompt_len: int) -> str:
    """A markdown table of ``prefill_step``, per kernel: GFLOP and MB per call, arithmetic intensity, what bounds
    it, and its roofline time on an H100 (a prediction: no GPU has run these kernels).

    Example:
        >>> print(prefill_table(PRESETS["gpt2"], 1, 128).splitlines()[0])
        | kernel | calls | GFLOP / call | MB / call | FLOP / byte | bound | us / call | us / step |
    """
    kernels = prefill_step(config, batch, prompt_len)
    lines = ["| kernel | calls | GFLOP / call | MB / call | FLOP / byte | bound | us / call | us / step |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for k in kernels:
        us = k.seconds() * 1e6
        lines.append(f"| {k.name} | {k.calls} | {k.flops / 1e9:.3f} | {k.dram_bytes / 1e6:.3f} | {k.intensity:.0f} | "
                     f"{k.bound()} | {us:.2f} | {k.calls * us:.2f} |")
    total = sum(k.calls * k.seconds() for k in kernels)
    flops = sum(k.calls * k.flops for k in kernels)
    launches = sum(k.calls for k in kernels)
    lines.append(f"| **step** ({launches} launches) | | {flops / 1e9:.1f} | | | | | **{total * 1e6:.1f}** |")
    return "\n".join(lines)


def floor_table(batch: int, context: int, bandwidth: float = H100_BANDWIDTH) -> str:
    """A markdown table of every preset's decode-step floor, fp16 weights against int8 (W8A16): MB a step moves,
    roofline us at ``bandwidth``, and their ratio.

    Example:
        >>> print(floor_table(1, 128).splitlines()[2])
        | gpt2 | 252.4 | 75.4 | 129.4 | 38.6 | 0.513 |
    """
    lines = ["| model | fp16 MB / step | fp16 us | int8 MB / step | int8 us | int8 / fp16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, config in PRESETS.items():
        fp16, int8 = (decode_step(config, batch, context, quantization=q) for q in (None, "int8"))
        fp16_bytes, int8_bytes = (sum(k.calls * k.dram_bytes for k in step) for step in (fp16, int8))
        lines.append(f"| {name} | {fp16_bytes / 1e6:.1f} | {step_time(fp16, bandwidth) * 1e6:.1f} | "
                     f"{int8_bytes / 1e6:.1f} | {step_time(int8, bandwidth) * 1e6:.1f} | "
                     f"{int8_bytes / fp16_bytes:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bytes and roofline time of one decode step, per kernel.")
    parser.add_argument("--model", default="gpt2", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args(argv)
    config = PRESETS[args.model]
    for batch in args.batch:
        for context in args.context:
            print(f"\n### {args.model}, fp16, batch {batch}, context {context} (H100: 3.35 TB/s)\n")
            print(table(config, batch, context))
    print(f"\n### Predicted decode step, {args.model}, fp16, context {args.context[0]}: a latency model, not a "
          "measurement (its constants are assumptions in gpt2fast/roofline.py; hold it against the first GPU run)\n")
    print(prediction_table(config, args.batch, args.context[0]))
    batch, context = args.batch[0], args.context[0]
    print(f"\n### Int8 weights (W8A16), every preset, batch {batch}, context {context} (H100: 3.35 TB/s): the "
          "decode floor against fp16\n")
    print(floor_table(batch, context))
    print(f"\n### {args.model}, int8 weights (W8A16), fp16 activations, batch {batch}, context {context}\n")
    print(table(config, batch, context, quantization="int8"))
    for batch, prompt_len in ((1, 128), (1, 1024), (8, 512)):
        print(f"\n### Prefill, {args.model}, fp16, batch {batch}, prompts of {prompt_len} tokens (H100: "
              f"{H100_FP16_FLOPS / 1e12:.0f} TFLOP/s fp16, 3.35 TB/s): roofline predictions, not measurements\n")
        print(prefill_table(config, batch, prompt_len))


if __name__ == "__main__":
    main()
