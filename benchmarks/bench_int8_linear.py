"""Int8 weight-only linears on the CPU: the candidates ``ops/torch_native.py`` chose among, at GPT-2 124M shapes.

Per (N, K) weight and row count: median microseconds of one call, one thread, with 12 copies of each
projection weight called in turn (one per layer, so the weights come from memory as in a decode step) and
one LM head. ``GB/s`` is the int8 weight's bytes over ``int8_matmul``'s time: at 1 row a GEMV streams the
weight once, so that is the number to hold against the machine's memory bandwidth.

Candidates: ``fp32`` (``torch_native.linear`` on the fp32 weight, the baseline), ``int8_matmul`` (what the
torch backend runs), ``dequant`` (``x @ (q * scale).T``: a full fp32 copy per call), ``int8pack``
(``torch._weight_int8pack_mm``, fp32 activations).

Run: python benchmarks/bench_int8_linear.py [--rows 1 8 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2fast.ops import torch_native
from gpt2fast.quant import quantize_int8

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768))  # c_attn, c_proj, c_fc, mlp.c_proj, wte

CANDIDATES = {
    "fp32": lambda x, w, q: torch_native.linear(x, w, None),
    "int8_matmul": lambda x, w, q: torch_native.int8_matmul(q, x),
    "dequant": lambda x, w, q: x @ q.dequantize().t(),
    "int8pack": lambda x, w, q: torch._weight_int8pack_mm(x, q.q, q.scale),
}


def median_us(fn, x: torch.Tensor, weights: list, quantized: list, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one call, each pass calling every weight copy once."""
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        for w, q in zip(weights, quantized):
            fn(x, w, q)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n, k in SHAPES:
        weights = [torch.randn(n, k) * 0.02 for _ in range(1 if n > 10_000 else 12)]
        quantized = [quantize_int8(w) for w in weights]
        for rows in args.rows:
            x = torch.randn(rows, k)
            us = {name: median_us(fn, x, weights, quantized, args.repeats) for name, fn in CANDIDATES.items()
                  if name != "int8pack" or rows <= 8}  # 64 rows of int8pack take seconds: a per-row GEMV
            cells = "  ".join(f"{name}={t:.0f}" for name, t in us.items())
            print(f"{n}x{k} rows={rows}: {cells} us; int8_matmul {n * k / us['int8_matmul'] / 1e3:.1f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
