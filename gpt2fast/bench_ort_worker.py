"""The ONNX Runtime side of ``gpt2fast bench``'s ``ort`` provider, run by another Python (``--ort-python``).

optimum-onnx needs transformers < 4.58, so ONNX Runtime lives in its own virtual environment and this
script runs there, in a subprocess: it imports nothing from gpt2fast (only the standard library, numpy,
torch, transformers, optimum-onnx and onnxruntime). Three modes, each answering JSON on stdout (anything
else the libraries print goes to stderr):

* ``export HF_DIR OUT_DIR [--int8]``: optimum's ONNX export of the saved transformers model
  (task ``text-generation-with-past``) to ``OUT_DIR/model.onnx``; ``--int8`` adds
  ``model_int8.onnx`` (onnxruntime dynamic quantization, int8 weights). Answers
  ``{"files": [str], "export_s": float}``.
* ``serve ONNX_DIR FILE --threads N``: loads ``ORTModelForCausalLM`` (CPU, ``intra_op_num_threads=N``,
  ``inter_op_num_threads=1``), answers ``{"ready": true, "rss_mb": float, "versions": str}``, then one JSON request
  per stdin line, one answer per stdout line:

  - ``{"cmd": "generate", "prompts": [[int]], "n": int, "ids": bool}``: greedy, exactly ``n`` new
    tokens per prompt (batches left-padded with an attention mask, as transformers does) ->
    ``{"seconds": float}`` plus ``"ids": [[int]]`` (the new tokens) when asked;
  - ``{"cmd": "logits", "ids": [int], "out": path}``: the logits of every position, saved with
    ``numpy.save`` as float32 ``(T, V)`` -> ``{"shape": [T, V]}``;
  - ``{"cmd": "exit"}`` (or end of input) ends it. A failed request answers ``{"error": str}``.
* ``rss ONNX_DIR FILE --threads N --prompts JSON --tokens N``: loads the model as ``serve`` does,
  generates once, answers ``{"peak_rss_mb": float}`` (this process's VmHWM).

Example (with the ort venv of benchmarks/README.md)::

    $ORT_PYTHON gpt2fast/bench_ort_worker.py export /tmp/hf /tmp/onnx --int8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable

_answer = sys.stdout  # replaced in main(): the protocol gets the real stdout, everything else stderr


def answer(obj: dict) -> None:
    _answer.write(json.dumps(obj) + "\n")
    _answer.flush()


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM (ru_maxrss would carry the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    return ", ".join(one(name) for name in ("onnxruntime", "optimum-onnx", "transformers", "torch"))


def export(hf_dir: str, out_dir: str, int8: bool) -> None:
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    main_export(hf_dir, output=out_dir, task="text-generation-with-past")
    files = ["model.onnx"]
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(os.path.join(out_dir, "model.onnx"), os.path.join(out_dir, "model_int8.onnx"),
                         weight_type=QuantType.QInt8)
        files.append("model_int8.onnx")
    answer({"files": files, "export_s": time.perf_counter() - start})


def load(onnx_dir: str, file_name: str, threads: int):
    import onnxruntime
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(threads)  # the padding and argmax around the sessions
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ORTModelForCausalLM.from_pretrained(onnx_dir, file_name=file_name, session_options=options,
                                               provider="CPUExecutionProvider", use_cache=True)


def generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy, exactly ``n`` new tokens per prompt; returns them."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T), left-padded
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[:, width:].tolist()


def logits(model, ids: list[int], out: str) -> list[int]:
    import numpy as np
    import torch

    with torch.no_grad():
        x = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    array = x.float().numpy()
    np.save(out, array)
    return list(array.shape)


def serve(onnx_dir: str, file_name: str, threads: int) -> None:
    model = load(onnx_dir, file_name, threads)
    answer({"ready": True, "rss_mb": peak_rss_mb(), "versions": versions()})
    serve_requests(lambda prompts, n: generate(model, prompts, n), lambda ids, out: logits(model, ids, out))


def serve_requests(generate: Callable[[list[list[int]], int], list[list[int]]],
                   logits: Callable[[list[int], str], list[int]]) -> None:
    """The request loop of ``serve``, this worker's and ``bench_ct2_worker.py``'s: one JSON request per stdin
    line, one answer per stdout line, until ``exit`` or the end of input. ``generate(prompts, n)`` returns the
    new tokens (timed here); ``logits(ids, out)`` saves them to ``out`` and returns their shape.
    """
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "exit":
                return
            if request["cmd"] == "generate":
                start = time.perf_counter()
                new = generate(request["prompts"], request["n"])
                reply = {"seconds": time.perf_counter() - start}
                if request.get("ids"):
                    reply["ids"] = new
                answer(reply)
            elif request["cmd"] == "logits":
                answer({"shape": logits(request["ids"], request["out"])})
            else:
                answer({"error": f"unknown cmd {request['cmd']!r}"})
        except Exception as e:  # the parent reports it; this process stays up for the next request
            answer({"error": f"{type(e).__name__}: {e}"})


def protocol_stdout() -> None:
    """Keep the real stdout for the protocol (``answer``); whatever else is printed, by Python or by a library's
    C code (export progress, warnings), goes to stderr."""
    global _answer
    _answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def main(argv: list[str] | None = None) -> None:
    protocol_stdout()
    parser = argparse.ArgumentParser(prog="bench_ort_worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("export")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--int8", action="store_true")
    for mode in ("serve", "rss"):
        p = sub.add_parser(mode)
        p.add_argument("onnx_dir")
        p.add_argument("file_name")
        p.add_argument("--threads", type=int, default=1)
        if mode == "rss":
            p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
            p.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "export":
        export(args.hf_dir, args.out_dir, args.int8)
    elif args.mode == "serve":
        serve(args.onnx_dir, args.file_name, args.threads)
    else:
        model = load(args.onnx_dir, args.file_name, args.threads)
        generate(model, json.loads(args.prompts), args.tokens)
        answer({"peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
