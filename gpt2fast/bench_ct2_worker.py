"""The CTranslate2 side of ``gpt2fast bench``'s ``ct2`` provider, in a process of its own.

CTranslate2 ships its own OpenMP runtime. Run in the bench's process, its first 2-thread generate left every
other in-process provider's 2-thread step slow for the rest of the run (our int8 decode step: 3.7 ms before,
10.8 ms after, on the 2-core machine of 2026-12-06), so with the providers interleaved round by round the
numbers of everything measured after it were CTranslate2's doing. Here it runs alone, as ONNX Runtime's worker
does (``bench_ort_worker.py``, the same protocol). Run with the bench's own Python; imports only the standard
library, numpy, ctranslate2 and the ort worker's protocol helpers.

``serve CT2_DIR COMPUTE_TYPE --threads N``: loads ``ctranslate2.Generator(CT2_DIR, device="cpu",
compute_type=COMPUTE_TYPE, intra_threads=N, inter_threads=1)``, answers ``{"ready": true, "versions": str,
"compute_type": str, "intra_threads": int}``, then one JSON request per stdin line, one answer per stdout line:

- ``{"cmd": "generate", "prompts": [[int]], "n": int, "ids": bool}``: greedy (``sampling_topk=1``), exactly
  ``n`` new tokens per prompt (``min_length = max_length = n``, no end token) -> ``{"seconds": float}`` plus
  ``"ids": [[int]]`` when asked;
- ``{"cmd": "logits", "ids": [int], "out": path}``: ``forward_batch`` logits of every position saved with
  ``numpy.save`` as float32 ``(T, V)`` -> ``{"shape": [T, V]}``;
- ``{"cmd": "exit"}`` (or end of input) ends it. A failed request answers ``{"error": str}``.

The request loop and the stdout handling are ``bench_ort_worker.py``'s (``serve_requests``, ``protocol_stdout``).

Example::

    python gpt2fast/bench_ct2_worker.py serve /tmp/ct2-int8 int8_float32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__:  # imported as gpt2fast.bench_ct2_worker
    from gpt2fast.bench_ort_worker import answer, protocol_stdout, serve_requests
else:  # run as a script, as the bench runs it: its folder is on sys.path
    from bench_ort_worker import answer, protocol_stdout, serve_requests


def serve(ct2_dir: str, compute_type: str, threads: int) -> None:
    import ctranslate2
    import numpy as np

    gen = ctranslate2.Generator(ct2_dir, device="cpu", compute_type=compute_type, intra_threads=threads,
                                inter_threads=1)
    with open(os.path.join(ct2_dir, "vocabulary.json")) as f:
        vocab = json.load(f)
    answer({"ready": True, "versions": f"ctranslate2 {ctranslate2.__version__}", "compute_type": compute_type,
            "intra_threads": threads})

    def generate(prompts: list[list[int]], n: int) -> list[list[int]]:
        results = gen.generate_batch([[vocab[i] for i in p] for p in prompts], max_length=n, min_length=n,
                                     sampling_topk=1, include_prompt_in_result=False, end_token=[])
        return [r.sequences_ids[0] for r in results]

    def logits(ids: list[int], out: str) -> list[int]:
        array = np.array(gen.forward_batch([ids]))[0].astype(np.float32)
        np.save(out, array)
        return list(array.shape)

    serve_requests(generate, logits)


def main(argv: list[str] | None = None) -> int:
    protocol_stdout()
    parser = argparse.ArgumentParser(prog="bench_ct2_worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("serve")
    p.add_argument("ct2_dir")
    p.add_argument("compute_type")
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    serve(args.ct2_dir, args.compute_type, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
