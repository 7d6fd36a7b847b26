"""The runtime's own cost per decode step: ``Engine.step()`` time minus the model forward.

On a GPU this is what stands between a decode step and the memory-bandwidth floor. Measured on a
model with GPT-2's real vocabulary (the sampler's cost depends on it) and a tiny body, in decode
steps only (every request past its prompt), for each batch size and sampling mode. The parts are
timed separately: scheduler, model forward, sampler, and the rest (metadata, bookkeeping, text).

"forward" is the model body plus the LM head op the engine chose (``lm_head`` for rows that need
logits, else ``lm_head_argmax`` / ``lm_head_gumbel``, which pick the token themselves): the device's
work. Two overhead figures: ``overhead`` is step minus forward in a real run; ``isolated`` is a step
whose forward and LM head are replaced by returning fixed hidden rows, logits or token ids. On this
CPU they differ because torch's OpenMP threads keep spinning on both cores after a forward and slow
whatever runs next; on a GPU the forward runs elsewhere, so ``isolated`` is the figure that carries over.

Run: python benchmarks/bench_runtime.py [--batch-sizes 1 64] [--steps 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict

import torch

import gpt2fast.engine as engine_module
from gpt2fast.engine import Engine
from gpt2fast.sampling import SamplingParams

MODEL = 'random:{"n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": 1024}'
LM_HEADS = ("lm_head", "lm_head_argmax", "lm_head_gumbel")
MODES = {
    "greedy": dict(temperature=0),
    "top-k sampled": dict(temperature=0.8, top_k=40, seed=1),
}


def timed(times: dict[str, list[float]], name: str, fn):
    """Wrap ``fn`` so each call's duration is appended to ``times[name]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - start)

    return wrapper


def measure(batch_size: int, mode: dict, steps: int) -> dict[str, float]:
    """Median microseconds per decode step: total, forward, scheduler, sampler, and the runtime overhead."""
    engine = Engine(MODEL, device="cpu", max_num_seqs=batch_size)
    for i in range(batch_size):
        engine.add_request(str(i), [1 + i, 2, 3], SamplingParams(max_tokens=2 * steps + 10, ignore_eos=True, **mode))
    engine.step()  # the prefills
    times: dict[str, list[float]] = defaultdict(list)
    engine._forward = timed(times, "body", engine._forward)
    ops = engine.model.ops
    engine.model.ops = dataclasses.replace(ops, **{n: timed(times, "lm_head", getattr(ops, n)) for n in LM_HEADS})
    engine.scheduler.schedule = timed(times, "scheduler", engine.scheduler.schedule)
    sample = engine_module.sample_batch
    engine_module.sample_batch = timed(times, "sampler", sample)
    try:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times["step"].append(time.perf_counter() - start)
    finally:
        engine_module.sample_batch = sample
    times["forward"] = [b + h for b, h in zip(times.pop("body"), times.pop("lm_head"))]
    times.setdefault("sampler", [0.0])  # greedy and temperature-only rows never reach the sampler
    overhead = [s - f for s, f in zip(times["step"], times["forward"])]
    result = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    result["overhead"] = statistics.median(overhead) * 1e6
    result["overhead_p90"] = statistics.quantiles(overhead, n=10)[-1] * 1e6
    result["isolated"] = isolated_step(engine, steps)
    return result


def isolated_step(engine: Engine, steps: int) -> float:
    """Median microseconds of a decode step whose model forward and LM head just return fixed tensors."""
    batch, cfg = len(engine.scheduler.running), engine.config
    hidden = torch.randn(batch, cfg.n_embd)  # (B, C)
    logits = torch.randn(batch, cfg.vocab_size)  # (B, V)
    token_ids = torch.randint(0, cfg.vocab_size, (batch,))  # (B,)
    engine._forward = lambda batch: hidden[: len(batch.seqs)]
    engine.model.ops = dataclasses.replace(
        engine.model.ops,
        lm_head=lambda x, wte: logits[: len(x)],
        lm_head_argmax=lambda x, wte: token_ids[: len(x)],
        lm_head_gumbel=lambda x, wte, temperature, seeds: token_ids[: len(x)],
    )
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"{'batch':>5} {'mode':<14}{'step':>9}{'forward':>9}{'overhead':>10}{'p90':>8}{'isolated':>10}"
          f"{'scheduler':>11}{'sampler':>9}   (microseconds per decode step, medians)")
    for batch_size in args.batch_sizes:
        for name, mode in MODES.items():
            r = measure(batch_size, mode, args.steps)
            print(f"{batch_size:>5} {name:<14}{r['step']:>9.0f}{r['forward']:>9.0f}{r['overhead']:>10.0f}"
                  f"{r['overhead_p90']:>8.0f}{r['isolated']:>10.0f}{r['scheduler']:>11.0f}{r['sampler']:>9.0f}")


if __name__ == "__main__":
    main()
