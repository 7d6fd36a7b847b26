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

``--simulated-device-us T`` measures the overlap instead (``Engine(async_scheduling=...)``): the decode
runner's replay is replaced by ``SimulatedDevice``, which completes each step T microseconds after the
previous one (a read of its tokens spins until then), so the host's work is real and the device is a
clock. Per batch size, for greedy and top-k/top-p sampled rows, overlapped and not, it prints (and with
``--json PATH`` writes) rows ``{"batch", "mode", "device_us", "period_us", "host_us", "overlapped"}``:
``period_us`` is wall time per decode step, ``host_us`` that minus the time spent waiting for the device.
Overlapped, the period is ``max(T, host)``; not, ``T + host``.

Run: python benchmarks/bench_runtime.py [--batch-sizes 1 64] [--steps 200]
     python benchmarks/bench_runtime.py --simulated-device-us 75 --batch-sizes 1 --json overlap.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


SIMULATED_MODES = {
    "greedy": dict(temperature=0),
    "top-k/top-p sampled": dict(temperature=0.8, top_k=40, top_p=0.9, seed=1),
}


def simulated(batch_size: int, mode: str, device_us: float, overlapped: bool, steps: int, repeats: int = 3) -> dict:
    """One row: decode steps of ``batch_size`` sequences on a ``SimulatedDevice`` of ``device_us`` per step.

    The median over ``repeats`` runs of ``steps`` steps each (after 20 warm-up steps) of the mean period and host
    time; nothing finishes meanwhile, so every step is the same decode."""
    periods, hosts = [], []
    for _ in range(repeats):
        engine = Engine(MODEL, device="cpu", max_num_seqs=batch_size, cuda_graphs=True, async_scheduling=overlapped,
                        kv_cache_tokens=max(batch_size * (steps + 64), 1024))  # >= one context
        device = engine.decode_runner.simulate(device_us)
        params = SamplingParams(max_tokens=steps + 40, ignore_eos=True, **SIMULATED_MODES[mode])
        engine.add_requests([(str(i), [1 + i, 2, 3], params) for i in range(batch_size)])
        for _ in range(21):  # the prefills (no device step), then warm-up decode steps
            engine.step()
        waited, start = device.waited_s, time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        periods.append(elapsed / steps * 1e6)
        hosts.append((elapsed - (device.waited_s - waited)) / steps * 1e6)
    return dict(batch=batch_size, mode=mode, device_us=device_us, period_us=statistics.median(periods),
                host_us=statistics.median(hosts), overlapped=overlapped)


def main_simulated(args: argparse.Namespace) -> None:
    rows = []
    print(f"{'batch':>5} {'mode':<21}{'device':>8}{'overlapped':>12}{'not':>8}{'ratio':>7}{'host':>7}{'host (not)':>12}"
          "   (microseconds per decode step; ratio: overlapped period / device time)")
    for batch_size in args.batch_sizes:
        for mode in SIMULATED_MODES:
            on, off = (simulated(batch_size, mode, args.simulated_device_us, o, args.steps) for o in (True, False))
            rows += [on, off]
            print(f"{batch_size:>5} {mode:<21}{args.simulated_device_us:>8.0f}{on['period_us']:>12.1f}"
                  f"{off['period_us']:>8.1f}{on['period_us'] / args.simulated_device_us:>7.2f}{on['host_us']:>7.1f}"
                  f"{off['host_us']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--simulated-device-us", type=float, default=None,
                        help="measure the overlap against a simulated device taking this long per decode step")
    parser.add_argument("--json", default=None, help="with --simulated-device-us: write the rows here")
    args = parser.parse_args()
    if args.simulated_device_us is not None:
        if not args.simulated_device_us > 0:
            parser.error(f"--simulated-device-us must be positive, got {args.simulated_device_us}")
        return main_simulated(args)
    if args.json:
        parser.error("--json goes with --simulated-device-us")
    print(f"{'batch':>5} {'mode':<14}{'step':>9}{'forward':>9}{'overhead':>10}{'p90':>8}{'isolated':>10}"
          f"{'scheduler':>11}{'sampler':>9}   (microseconds per decode step, medians)")
    for batch_size in args.batch_sizes:
        for name, mode in MODES.items():
            r = measure(batch_size, mode, args.steps)
            print(f"{batch_size:>5} {name:<14}{r['step']:>9.0f}{r['forward']:>9.0f}{r['overhead']:>10.0f}"
                  f"{r['overhead_p90']:>8.0f}{r['isolated']:>10.0f}{r['scheduler']:>11.0f}{r['sampler']:>9.0f}")


if __name__ == "__main__":
    main()
