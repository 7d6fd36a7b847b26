"""The engine's int8 decode step with its weights in panels against the (N, K) rows, in one process, alternated.

Two ``LLM("random:gpt2", backend="cpu", quantization="int8")``: the first as built (panels where the kernels use
VNNI), the second with ``Ops.int8_panels`` switched off. Per batch: ms/step = (t(1 + 32 tokens) - t(1 token)) / 32,
medians of ``rounds``, the two engines alternated in each round; also checks that both pick the same tokens.

    python benchmarks/bench_int8_layouts.py --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import gpt2fast.ops
from gpt2fast import LLM, SamplingParams
from gpt2fast.bench import mixed_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    panels = LLM("random:gpt2", backend="cpu", quantization="int8")
    gpt2fast.ops.CPU = dataclasses.replace(gpt2fast.ops.CPU, int8_panels=None)
    rows = LLM("random:gpt2", backend="cpu", quantization="int8")
    print(f"weights: {tuple(panels.model.wte.weight.shape)} against {tuple(rows.model.wte.weight.shape)}")
    for batch in (1, 8):
        prompts = mixed_batch(batch, 50257, 100) if batch > 1 else [list(range(100, 132))]

        def run(llm: LLM, n: int) -> tuple[float, list]:
            start = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]

        same = run(panels, 33)[1] == run(rows, 33)[1]
        seconds = {(name, n): [] for name in ("panels", "rows") for n in (1, 33)}
        for _ in range(args.rounds):
            for n in (1, 33):
                for name, llm in (("panels", panels), ("rows", rows)):
                    seconds[name, n].append(run(llm, n)[0])
        step = {name: (statistics.median(seconds[name, 33]) - statistics.median(seconds[name, 1])) / 32 * 1e3
                for name in ("panels", "rows")}
        print(f"batch {batch}: panels {step['panels']:.2f} ms/step, (N, K) rows {step['rows']:.2f} ms/step, "
              f"same tokens: {same}")


if __name__ == "__main__":
    main()
