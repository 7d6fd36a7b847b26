"""Cost of one sampler call, gpt2fast's ``sample_batch`` vs Hugging Face's logits processors, with the floor.

Each case runs one step's sampling for a batch of rows that share a setting, on (B, V) fp32
logits drawn as ``3 * randn`` (a flatter distribution than a real model's, so filters keep more
tokens than usual). The floor is reading the logits once at the machine's copy bandwidth of a
large buffer (small logits sit in cache, so greedy can pass 100%). A draw is bound instead by
computing V Philox uniforms per row (10 rounds of 64-bit integer ops), which a fused GPU kernel
hides behind the LM-head matmul. ``hf`` is transformers' processors in the same order plus
``softmax`` + ``torch.multinomial`` (a different RNG), or ``argmax`` when greedy, plus
``log_softmax`` + ``topk`` for logprobs: the same work done the common way (transformers has no
presence/frequency penalties).

Run: python benchmarks/bench_sampler.py --batch 1 64 [--vocab 50257] [--threads 1] [--json out.json]
(on a machine shared with other jobs, --threads 1 gives steadier numbers)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gpt2fast.sampling import SampleRow, SamplingParams, sample_batch

CASES = {
    "greedy": SamplingParams(temperature=0),
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top_k 40": SamplingParams(temperature=0.8, top_k=40),
    "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "min_p 0.05": SamplingParams(min_p=0.05),
    "penalties + logprobs 5": SamplingParams(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5,
                                             frequency_penalty=0.2, logprobs=5),
}
PROMPT_LEN, OUTPUT_LEN = 100, 30


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def quantiles_us(fn: Callable[[], object], min_seconds: float) -> tuple[float, float, float]:
    """(p10, median, p90) microseconds per call, over at least 5 calls and ``min_seconds``."""
    fn()  # warm-up
    times: list[float] = []
    while len(times) < 5 or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return deciles[0] * 1e6, statistics.median(times) * 1e6, deciles[-1] * 1e6


def hf_sampler(params: SamplingParams, history: torch.Tensor) -> Callable[[torch.Tensor], list[int]]:
    """transformers' processors for ``params`` (HF's own order), then a draw; history: (B, L) token ids."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        processors.append(MinPLogitsWarper(params.min_p))

    def draw(logits: torch.Tensor) -> list[int]:
        if params.logprobs is not None:
            torch.log_softmax(logits, dim=-1).topk(params.logprobs, dim=-1).values.tolist()
        scores = processors(history, logits)
        if params.greedy:
            return scores.argmax(dim=-1).tolist()
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0].tolist()

    return draw


def run_case(name: str, params: SamplingParams, batch: int, vocab: int, min_seconds: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen) * 3  # (B, V)
    history = torch.randint(0, vocab, (batch, PROMPT_LEN + OUTPUT_LEN), generator=gen)  # (B, L)
    rows = [SampleRow(params, seed=b, sample_index=0, step=OUTPUT_LEN, prompt_ids=h[:PROMPT_LEN].tolist(),
                      output_ids=h[PROMPT_LEN:].tolist()) for b, h in enumerate(history)]
    hf_draw = hf_sampler(params, history)
    providers = {"gpt2fast": lambda: sample_batch(logits, rows), "hf": lambda: hf_draw(logits)}
    return [dict(case=name, batch=batch, provider=provider, **dict(zip(("p10_us", "median_us", "p90_us"),
                                                                       quantiles_us(fn, min_seconds))))
            for provider, fn in providers.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each case at least this long")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bandwidth = copy_bandwidth()
    results = [r for batch in args.batch for name, params in CASES.items()
               for r in run_case(name, params, batch, args.vocab, args.min_seconds)]
    print(f"V={args.vocab}, {args.threads} thread(s), fp32 CPU; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          "floor = reading the logits once")
    print(f"{'case':<24}{'B':>4}{'provider':>10}{'median us':>12}{'p10-p90 us':>20}{'% of floor':>12}")
    for r in results:
        floor_us = r["batch"] * args.vocab * 4 / bandwidth * 1e6
        r["pct_of_floor"] = 100 * floor_us / r["median_us"]
        print(f"{r['case']:<24}{r['batch']:>4}{r['provider']:>10}{r['median_us']:>12.0f}"
              f"{r['p10_us']:>10.0f}-{r['p90_us']:<9.0f}{r['pct_of_floor']:>11.1f}%")
    if args.json:
        meta = dict(vocab=args.vocab, threads=args.threads, torch=torch.__version__, machine=platform.machine(),
                    bandwidth_gbs=bandwidth / 1e9)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
