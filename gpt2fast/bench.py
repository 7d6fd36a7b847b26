"""``gpt2fast bench``: speed, the memory-bandwidth floor and accuracy of every backend, side by side in one run.

For one model, every provider (each requested ``--backends`` x ``--dtypes`` x ``--quantization``, shown
as ``gpt2fast[torch]/float32`` or ``gpt2fast[torch]/int8``, and the ``--baselines``) is measured on the
same weights, with the same prompts and the same ``--threads`` (default: torch's current count), in one run:

* ``hf`` = transformers ``generate``, eager; ``hf-static`` = transformers with a static KV cache,
  ``torch.compile``d on CUDA;
* ``ct2/float32``, ``ct2/int8`` = CTranslate2 (``pip install ctranslate2``): the weights saved as a
  transformers checkpoint (``save_pretrained`` + ``vocab.json``/``merges.txt`` rebuilt from
  ``gpt2fast/data/gpt2.tiktoken``), converted by ``TransformersConverter`` (``quantization`` float32 /
  int8), run by ``Generator(compute_type="float32" | "int8_float32", intra_threads=threads,
  inter_threads=1).generate_batch`` greedy with ``min_length = max_length = n`` and no end token, in a worker
  process of its own (``gpt2fast/bench_ct2_worker.py``, timed around the round trip as ort is): its bundled
  OpenMP runtime, run in this process, slowed every other provider's multi-threaded steps;
* ``ort/float32``, ``ort/int8`` = ONNX Runtime through optimum (``ORTModelForCausalLM.generate``; export
  task text-generation-with-past; int8 = onnxruntime dynamic quantization), ``intra_op_num_threads=threads``.
  optimum-onnx needs transformers < 4.58, so it runs in its own venv (``--ort-python`` or
  ``$GPT2FAST_ORT_PYTHON``; without either it is skipped and ``meta.skipped`` says how to set it up) through
  ``gpt2fast/bench_ort_worker.py`` in a subprocess: JSON requests and answers over its stdin/stdout,
  timed around the round trip (the decode subtraction cancels the pipe).

ct2 and ort run on CPU only (on a CUDA run they are skipped); every provider that cannot run is skipped with
its reason in ``meta.skipped``. What is measured:

* prefill: time of a 1-token generate per prompt length (``--prompt-lens``), batch 1;
* decode at each batch size (``--batch-sizes``; batches mix prompt lengths 16..64): time to first
  token (TTFT = prefill of the batch + its first tokens) and seconds per decode step
  ``(t(generate 1 + N tokens) - t(generate 1 token)) / N`` (medians over ``--repeats``; prefill and
  setup cancel), tokens/s = batch / step time;
* the floor beside every decode row: the bytes a decode step must move (every weight once, the LM
  head included, plus each sequence's K and V up to its mean context) over the copy bandwidth measured
  at start (a large copy, bytes read + written; device memory on CUDA, host memory on CPU);
* decode time vs context: batch 1, after a prompt of each ``--contexts`` length, with its floor;
* the runtime's own cost per decode step, on ``OVERHEAD_MODEL`` (GPT-2's 12 layers and vocabulary, 64
  wide) for every provider: step time, host time inside the model forward (timed by wrapping it), and
  the difference, both by the same subtraction as decode; ``hf_ratio`` = HF's figure / this one's;
  (ct2 and ort have no hook into their forward: no overhead rows);
* kernel launches of one eager decode step per gpt2fast backend with kernels (``gpt2fast.launches``),
  beside the target ``5 * n_layer + 3``;
* peak RSS per provider (CPU runs): a fresh process per provider loads the model as the provider does
  (gpt2fast: ``LLM``; hf: ``from_pretrained`` of the saved checkpoint; ct2: ``Generator`` alone, no
  torch; ort: the worker) and generates ``RSS_TOKENS`` tokens for ``RSS_BATCH`` mixed prompts; its
  ``VmHWM`` (``ru_maxrss`` would carry the parent's peak across fork and exec). ``vs_ct2_int8`` = this / ct2
  int8's;
* the acceptance ratios (``ratios``): per provider and batch, ``hf_ratio`` = HF ms/step / this and
  ``ct2_int8_ratio`` = ct2/int8 ms/step / this, printed first, pivoted with the peak RSS;
* accuracy of every gpt2fast, ct2 and ort provider against the fp32 reference (the same weights on
  ``backend="reference"``, the naive spec, in float32): max |logits - reference| and max |logits - HF
  fp32| (with transformers installed; without it bench runs and says how to add it) over a fixed text,
  perplexity of that text, and greedy agreement over ``--greedy-tokens`` generated tokens,
  flagged when outside ``TOLERANCES`` (by the row's dtype: int8 rows against the int8 bars). ct2's logits
  come from ``Generator.forward_batch``, ort's from the worker (``ORTModelForCausalLM`` forward, saved
  as ``.npy``), so every field is computed for them too. The fixed text is a slice of ``pydoc_data.topics`` (sorted
  keys), which every CPython ships. With random weights perplexity is about the vocabulary size: it
  is there to compare backends, not models.

Timing: ``time.perf_counter`` on CPU; CUDA events on CUDA (after a warm-up run of each shape). The decode,
context and prefill rows interleave the providers: each of ``--repeats`` rounds runs every provider once, each
round starting one provider later (``rounds``), and a row takes its provider's median. One provider's repeats
back to back would hand any drift of a shared machine's speed to whichever provider ran while it lasted.
Peak memory in the speed rows: on CUDA ``torch.cuda.max_memory_allocated`` during the row's warm-up run; on CPU
the process's max RSS so far (``resource.getrusage``; a high-water mark that only grows, so later rows
include earlier ones -- the ``rss`` table is the per-provider number). The floor of an int8 row counts
1 byte per matrix weight plus a 4-byte scale per output row (``decode_bytes``).

Outputs, in ``--out`` (default ``bench-results/``): ``bench.json``, ``bench.md`` and PNG plots
(``gpt2fast.bench_plots``: tokens/s vs batch size, decode ms vs context, % of floor). JSON schema::

    {"meta": {"model", "device", "device_name", "machine", "python", "torch", "transformers",
              "triton", "gpt2fast": str, "cpu_count", "threads": int, "load_avg_1m": float,
              "config": {GPT2Config fields: int/float/bool},
              "dtypes": [str], "bandwidth_gbs": float, "quick": bool, "peak_mem_kind": str,
              "quantization": [str], "engines": {backend: version str} (ct2/ort when they ran),
              "tolerances": {dtype: {"logits_rel", "ppl_rel", "agree_total": float}},
              "skipped": [str], "wall_s": float},
     "decode":   [{"provider", "backend", "dtype": str, "batch": int, "prompt_lens": [int],
                   "context": float, "new_tokens": int, "ttft_ms", "decode_ms", "tok_s",
                   "spread_pct", "floor_ms", "achieved_gbs", "pct_of_floor", "peak_mem_mb",
                   "hf_ratio" (when hf ran): float}],
     "context":  [{"provider", "backend", "dtype": str, "batch", "new_tokens": int, "context", "decode_ms",
                   "tok_s", "spread_pct", "floor_ms", "achieved_gbs", "pct_of_floor": float}],
     "prefill":  [{"provider", "backend", "dtype": str, "prompt_len": int, "prefill_ms", "tok_s",
                   "spread_pct", "peak_mem_mb": float}],
     "overhead": [{"provider", "backend", "dtype": str, "batch", "n_layer": int, "step_us", "forward_us",
                   "overhead_us", "hf_ratio" (when hf ran and overhead_us > 0): float}],
     "launches": [{"provider", "backend": str, "per_layer", "fixed", "per_step", "target_per_step": int}],
     "accuracy": [{"provider", "backend", "dtype": str, "text_tokens", "greedy_tokens": int,
                   "max_abs_logit_err", "max_abs_logit_diff_hf" (with transformers), "ppl", "ref_ppl", "ppl_rel_diff",
                   "agree_until_divergence", "agree_total": float, "flags": [str]}],
     "rss":      [{"provider", "backend", "dtype": str, "batch", "new_tokens": int, "peak_rss_mb",
                   "vs_ct2_int8" (when ct2/int8 ran): float}],
     "ratios":   [{"provider": str, "batch": int, "decode_ms", "hf_ratio" (when hf ran),
                   "ct2_int8_ratio" (when ct2/int8 ran): float}]}

Every number is finite. Every number is > 0 except the fields in ``MAY_BE_ZERO`` (errors and
spreads: >= 0) and ``FRACTIONS`` (in [0, 1]). ``flags`` is empty when every accuracy number is
within tolerance; otherwise it names the failing checks (``logits``, ``ppl``, ``greedy``).

Example:
    gpt2fast bench --model random:gpt2 --quick
    gpt2fast bench --model gpt2 --backends torch triton cuda --dtypes float16 bfloat16 --out results/h100
    gpt2fast bench --model random:gpt2 --batch-sizes 1 8 --quantization none int8 --baselines hf ct2 ort \\
        --ort-python /work/wt/venvs/ort/bin/python --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from gpt2fast.checkpoint.layout import is_transposed
from gpt2fast.engine import LLM
from gpt2fast.ops import BACKENDS
from gpt2fast.sampling import SamplingParams

# Without transformers bench still runs (accuracy is against our reference, the spec) and says how to add HF.
HF_INSTALL = 'pip install -e ".[bench]" adds them'
MAY_BE_ZERO = {"max_abs_logit_err", "max_abs_logit_diff_hf", "ppl_rel_diff", "spread_pct", "load_avg_1m", "overhead_us"}
FRACTIONS = {"agree_until_divergence", "agree_total"}
MIXED_PROMPT_LENS = (16, 23, 30, 37, 43, 50, 57, 64)  # a batch of B cycles through these
# --quick runs on 1 thread: on a shared 2-core machine torch's OpenMP threads spin against other
# processes (measured: 750 ms/step at 2 threads vs 81 ms at 1 for random:gpt2 beside a test run).
PROFILES = {  # defaults of a full run and of --quick; threads None = torch's own
    "full": dict(batch_sizes=[1, 8, 64], prompt_lens=[32, 128, 512, 1024], contexts=[32, 128, 512, 1024],
                 decode_tokens=32, repeats=5,
                 greedy_tokens=256, ppl_tokens=1024, baselines=["hf", "hf-static", "ct2", "ort"], threads=None),
    "quick": dict(batch_sizes=[1, 8], prompt_lens=[32], contexts=[32, 256], decode_tokens=8, repeats=3,
                  greedy_tokens=32, ppl_tokens=256, baselines=["hf"], threads=1),
}


@dataclass(frozen=True)
class Tolerance:
    """What a provider at this dtype must meet against the fp32 reference."""

    logits_rel: float  # max |logits - ref| <= logits_rel * max(1, max |ref|)
    ppl_rel: float  # |ppl - ref_ppl| / ref_ppl
    agree_total: float  # fraction of greedy tokens equal to the reference's


# fp32 leaves room for TF32 matmuls on GPU; random weights give near-flat logits, so greedy ties flip
# easily at 16 bits: the agreement bars are low there on purpose and real weights should beat them.
# bfloat16 keeps 8 significant bits (a relative rounding of up to 2^-9 per weight and per activation,
# over 12 layers of sums): 5e-2 of the largest logit, and 5% of perplexity.
# int8 (weights, symmetric per output channel, gpt2fast.quant; CTranslate2 and ONNX Runtime also
# quantize activations on the fly): a weight is off by up to half a step, max|row| / 254 -- 0.4% of its
# row's largest, like bf16's 2^-9 but relative to the row, not to each weight, so small weights in a
# row with an outlier lose more. The same bars as bf16 (5e-2 of the largest logit, 5% perplexity;
# published int8 weight-only GPT-2 perplexities move ~1%, measured here within the bars), and half the
# greedy tokens on random weights, whose near-flat logits flip ties.
TOLERANCES = {
    "float32": Tolerance(logits_rel=1e-3, ppl_rel=1e-3, agree_total=0.9),
    "float16": Tolerance(logits_rel=1e-2, ppl_rel=1e-2, agree_total=0.5),
    "bfloat16": Tolerance(logits_rel=5e-2, ppl_rel=5e-2, agree_total=0.5),
    "int8": Tolerance(logits_rel=5e-2, ppl_rel=5e-2, agree_total=0.5),
}


# ---- the machine ------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large copy on ``device``, counting bytes read plus bytes written.

    Example:
        >>> copy_bandwidth(torch.device("cpu"), megabytes=8, repeats=2) > 1e8
        True
    """
    src = torch.randn(megabytes * 2**20 // 4, device=device)  # (N,) fp32
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    seconds = timings(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * src.element_size() / statistics.median(seconds)


def weight_counts(cfg) -> tuple[int, int, int]:
    """(matrix elements, matrix output rows, vector elements) of a GPT-2, the position table left out.

    The matrices are what int8 quantizes (``gpt2fast.quant``: the tied embedding / LM head and every
    linear weight, one fp32 scale per output row); the vectors (biases, layer norms) stay in the model dtype.

    Example:
        >>> llm = LLM('random:{"n_layer": 2, "n_embd": 8, "n_head": 2}')
        >>> mats, _, vecs = weight_counts(llm.config)
        >>> mats + vecs == sum(p.numel() for n, p in llm.model.named_parameters() if n != "wpe.weight")
        True
    """
    c, inner, layers = cfg.n_embd, cfg.mlp_width, cfg.n_layer
    mats = cfg.vocab_size * c + layers * (c * 3 * c + c * c + c * inner + inner * c)
    rows = cfg.vocab_size + layers * (3 * c + c + inner + c)
    vecs = layers * (2 * c + 3 * c + c + 2 * c + inner + c) + 2 * c
    return mats, rows, vecs


def decode_bytes(llm: LLM, contexts: Sequence[float], quantization: str | None = None,
                 itemsize: int | None = None) -> float:
    """Bytes one decode step must move: every weight but the position table once, plus K and V per context.

    ``quantization="int8"``: the matrices at 1 byte plus a 4-byte scale per output row. ``itemsize``: the
    float size of everything else (default ``llm``'s dtype).

    Example:
        >>> llm = LLM('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}')
        >>> decode_bytes(llm, [10]) - decode_bytes(llm, [0])  # 1 layer, K + V, 10 tokens, 8 wide, fp32
        640.0
        >>> round(decode_bytes(llm, [0], "int8") / decode_bytes(llm, [0]), 3)  # 8 wide: a scale per 8 weights
        0.375
    """
    cfg, size = llm.config, itemsize or llm.dtype.itemsize
    mats, rows, vecs = weight_counts(cfg)
    weights = mats + rows * 4 + vecs * size if quantization == "int8" else (mats + vecs) * size
    return float(weights + size * 2 * cfg.n_layer * cfg.n_embd * sum(contexts))


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: the process's max RSS so far (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timings(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``: CUDA events on CUDA, perf_counter on CPU."""
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return seconds


def spread_pct(seconds: list[float]) -> float:
    """(max - min) / median of repeated timings, in percent."""
    return 100 * (max(seconds) - min(seconds)) / statistics.median(seconds)


# ---- providers --------------------------------------------------------------------------------------


@dataclass
class Provider:
    """Something that generates greedily: ``generate(prompts, n)`` runs ``n`` new tokens for every prompt."""

    name: str
    backend: str
    dtype: str  # the row's dtype: the model dtype, or the quantization ("int8") when the weights are quantized
    generate: Callable[[list[list[int]], int], None]
    llm: LLM  # whose weights (and config) it runs; its device times the rows
    forward_s: list[float] | None = None  # host seconds of each model forward, when built with timed=True
    quantization: str | None = None  # "int8": weights stored as int8 (the floor counts 1 byte per weight)
    itemsize: int | None = None  # bytes of a float it computes in (K/V, unquantized weights); default llm's dtype
    # For the accuracy table: logits of every position (T, V) fp32, and n greedy tokens after a prefix.
    logits: Callable[[list[int]], torch.Tensor] | None = None
    greedy: Callable[[list[int], int], list[int]] | None = None
    rss: Callable[[list[list[int]], int], float] | None = None  # peak RSS (MiB) of a fresh process generating
    close: Callable[[], None] | None = None  # frees what it holds outside this process (a worker)
    version: str | None = None  # an outside engine's version(s), for meta["engines"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ours(llm: LLM, timed: bool = False, quantization: str | None = None) -> Provider:
    """A gpt2fast provider: ``LLM.generate`` over the whole batch, greedy, never stopping early.

    ``timed``: record the host time of every model forward (the body, the LM head op the engine picks, and
    the static decode runner's replay and the wait for a launched step's tokens) in ``forward_s``, so the runtime's
    own cost can be told apart.
    ``quantization``: what ``llm`` was built with (``LLM(..., quantization=...)``); it names the row's dtype.
    """

    def generate(prompts: list[list[int]], n: int) -> None:
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)

    forward_s = None
    if timed:
        forward_s = []
        engine = llm.engine
        engine._forward = _timed(engine._forward, forward_s)
        if engine.decode_runner is not None:  # its replays, and the waits for the tokens of a launched step
            runner, launch = engine.decode_runner, engine.decode_runner.launch
            runner._replay = _timed(runner._replay, forward_s)

            def timed_launch(*args, **kwargs):
                pending = launch(*args, **kwargs)
                pending.result = _timed(pending.result, forward_s)
                return pending

            runner.launch = timed_launch
        ops = engine.model.ops
        engine.model.ops = replace(ops, **{name: _timed(getattr(ops, name), forward_s) for name in LM_HEAD_OPS})
    dtype = quantization or dtype_name(llm.dtype)
    spec = dict(kind="ours", model=llm.model_name, backend=llm.backend, dtype=dtype_name(llm.dtype),
                quantization=quantization)
    return Provider(f"gpt2fast[{llm.backend}]/{dtype}", llm.backend, dtype, generate, llm, forward_s,
                    quantization=quantization, logits=llm.logits,
                    greedy=lambda prefix, n: greedy_tokens(llm, prefix, n),
                    rss=lambda prompts, n: child_rss(spec, prompts, n, torch.get_num_threads()))


LM_HEAD_OPS = ("lm_head", "lm_head_argmax", "lm_head_gumbel")


def _timed(fn: Callable, seconds: list[float]) -> Callable:
    """``fn``, appending the host seconds of each call to ``seconds``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return wrapper


def hf_twin(llm: LLM, dtype: torch.dtype | None = None):
    """A transformers GPT2LMHeadModel holding exactly ``llm``'s weights (in ``dtype``, default ``llm``'s).

    Example:
        >>> llm = LLM('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}')
        >>> hf_twin(llm).config.n_embd
        8
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = llm.config
    hf = GPT2LMHeadModel(GPT2Config(
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions, n_inner=cfg.n_inner, layer_norm_epsilon=cfg.layer_norm_epsilon,
        scale_attn_weights=cfg.scale_attn_weights, scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
    ))
    dense = llm.model.dense_state_dict()  # int8 weights dequantized: HF holds the values we compute with
    state = {"transformer." + name: (t.t() if is_transposed(name) else t) for name, t in dense.items()}
    missing, unexpected = hf.load_state_dict(state | {"lm_head.weight": state["transformer.wte.weight"]}, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    return hf.to(llm.device, dtype or llm.dtype).eval()


def hf_provider(llm: LLM, static: bool, timed: bool = False) -> Provider:
    """transformers ``generate`` on ``llm``'s weights: batches left-padded with an attention mask.

    ``static``: a static KV cache, and ``torch.compile`` of the forward on CUDA (on CPU the compile
    takes minutes, so the static cache runs eagerly there). ``timed``: record the host time of every
    model forward (``GPT2LMHeadModel.forward``, LM head included) in ``forward_s``.
    """
    hf = hf_twin(llm)
    forward_s = [] if timed else None
    if timed:
        hf.forward = _timed(hf.forward, forward_s)
    if static and llm.device.type == "cuda":
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    extra = {"cache_implementation": "static"} if static else {}

    def generate(prompts: list[list[int]], n: int) -> None:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            hf.generate(ids.to(llm.device), attention_mask=mask.to(llm.device), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0, **extra)

    name = "hf-static" if static else "hf"
    return Provider(name, name, dtype_name(llm.dtype), generate, llm, forward_s)


# ---- the CPU engines users pick: CTranslate2 and ONNX Runtime ------------------------------------------

CT2_INSTALL = 'pip install ctranslate2 (or pip install -e ".[bench]")'
ORT_SETUP = ("ONNX Runtime runs in its own venv (optimum-onnx needs transformers < 4.58): python -m venv VENV; "
             "VENV/bin/pip install torch==2.13.0; VENV/bin/pip install 'transformers<4.58' optimum-onnx onnxruntime; "
             "then pass --ort-python VENV/bin/python or set GPT2FAST_ORT_PYTHON (benchmarks/README.md)")
ORT_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_ort_worker.py")
CT2_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_ct2_worker.py")
# The compute type each ct2 row runs: int8 weights with fp32 activations is CTranslate2's CPU int8.
CT2_COMPUTE = {"float32": "float32", "int8": "int8_float32"}
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character its vocab.json spells it with.

    Example:
        >>> m = bytes_to_unicode(); m[ord("A")], m[ord(" ")], len(set(m.values()))
        ('A', 'Ġ', 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


def hf_vocab_files(ranks: dict[bytes, int], folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face's GPT-2 vocab files) for tiktoken ``ranks``.

    Each multi-byte token's merge is found by running BPE on its bytes with only the merges ranked below
    it: what remains is the pair it was made from. ``<|endoftext|>`` takes the next id.

    Example:
        >>> import tempfile, pathlib
        >>> from gpt2fast.tokenizer import from_vocab_files
        >>> ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())} | {b"ab": 256, b"abc": 257}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     hf_vocab_files(ranks, d)
        ...     enc = from_vocab_files(pathlib.Path(d, "vocab.json"), pathlib.Path(d, "merges.txt"))
        ...     print(pathlib.Path(d, "merges.txt").read_text().splitlines()[1:], enc.encode("abc abd"))
        ['a b', 'ab c'] [257, 220, 256, 67]
    """
    spell = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    def split(token: bytes, rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not a merge of lower-ranked tokens")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    merges = [split(token, rank) for token, rank in ordered if len(token) > 1]
    vocab = {text(token): rank for token, rank in ordered} | {ENDOFTEXT: len(ranks)}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))


def save_hf_dir(llm: LLM, folder: str) -> list[str]:
    """``llm``'s weights as a transformers fp32 checkpoint in ``folder`` (``save_pretrained``) with GPT-2's
    vocab files, as the other engines' converters expect; returns the vocabulary (id -> token string).

    The vocabulary is gpt2fast's shipped ranks (``gpt2fast/data/gpt2.tiktoken``), cut to the model's size.
    """
    from tiktoken.load import load_tiktoken_bpe

    from gpt2fast.tokenizer import PACKAGED_RANKS

    hf_twin(llm, torch.float32).save_pretrained(folder)
    ranks = {t: r for t, r in load_tiktoken_bpe(str(PACKAGED_RANKS)).items() if r < llm.config.vocab_size}
    hf_vocab_files(ranks, folder)
    spell = bytes_to_unicode()
    tokens = ["".join(spell[b] for b in t) for t, _ in sorted(ranks.items(), key=lambda item: item[1])]
    return (tokens + [ENDOFTEXT])[:llm.config.vocab_size]


def ct2_missing() -> str | None:
    """Why ctranslate2 cannot be imported, or None."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as e:
        return str(e) or "ctranslate2 is not installed"
    return None


def ct2_providers(llm: LLM, hf_dir: str, threads: int, work: str) -> list[Provider]:
    """CTranslate2 ``Generator`` on ``llm``'s weights (converted from ``hf_dir``): ``ct2/float32`` and ``ct2/int8``.

    Each runs in a worker process (``bench_ct2_worker.py``, this Python): CTranslate2's own OpenMP runtime, run
    in this process, slowed every other provider's multi-threaded steps from its first generate on.
    ``generate_batch`` greedy (``sampling_topk=1``), ``min_length = max_length = n`` and no end token, so
    exactly ``n`` new tokens per prompt; ``intra_threads=threads``, ``inter_threads=1``. Logits for the
    accuracy table come from ``forward_batch``, through a ``.npy`` file. The worker maps ids to tokens with the
    ``vocabulary.json`` the converter writes beside each model.
    """
    import ctranslate2
    import numpy as np

    providers = []
    for dtype, compute in CT2_COMPUTE.items():
        out = os.path.join(work, f"ct2-{dtype}")
        ctranslate2.converters.TransformersConverter(hf_dir).convert(out, quantization=dtype, force=True)
        worker = Worker([sys.executable, CT2_WORKER, "serve", out, compute, "--threads", str(threads)],
                        f"ct2-{dtype}", work)

        def generate(prompts: list[list[int]], n: int, worker=worker) -> list[list[int]]:
            return worker.ask(cmd="generate", prompts=prompts, n=n, ids=True)["ids"]

        def logits(ids: list[int], worker=worker, path=os.path.join(work, "ct2-logits.npy")) -> torch.Tensor:
            worker.ask(cmd="logits", ids=ids, out=path)
            return torch.from_numpy(np.load(path)).float()  # (T, V)

        spec = dict(kind="ct2", path=out, compute_type=compute)
        providers.append(Provider(f"ct2/{dtype}", "ct2", dtype, generate, llm,
                                  quantization="int8" if dtype == "int8" else None, itemsize=4, logits=logits,
                                  greedy=lambda prefix, n, generate=generate: generate([prefix], n)[0],
                                  rss=lambda prompts, n, spec=spec: child_rss(spec, prompts, n, threads),
                                  close=worker.close, version=worker.ready.get("versions")))
    return providers


def ort_python(args: argparse.Namespace) -> str | None:
    """The ONNX Runtime venv's Python: ``--ort-python``, else ``$GPT2FAST_ORT_PYTHON``, else None."""
    return args.ort_python or os.environ.get("GPT2FAST_ORT_PYTHON") or None


class Worker:
    """One worker process (``bench_ort_worker.py serve``, ``bench_ct2_worker.py serve``): requests as JSON lines
    on its stdin, answers on its stdout. Its stderr goes to a file, shown in the error when the worker fails.
    """

    def __init__(self, argv: list[str], name: str, work: str) -> None:
        self.name = name
        self.log_path = os.path.join(work, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self.read()
        if not self.ready.get("ready"):
            raise RuntimeError(f"the {name} worker did not start: {self.ready}")

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.returncode}): {tail(self.log_path)}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.name} worker failed: {reply['error']}")
        return reply

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def tail(path: str, chars: int = 2000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:].strip() or "(no output)"


def run_worker(python: str, *argv: str, timeout: float = 1800) -> dict:
    """Run ``bench_ort_worker.py`` once with ``argv``; its last stdout line, parsed. RuntimeError on failure."""
    done = subprocess.run([python, ORT_WORKER, *argv], capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{os.path.basename(ORT_WORKER)} {argv[0]} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:] or '(no output)'}")
    return json.loads(lines[-1])


def ort_providers(python: str, llm: LLM, hf_dir: str, threads: int, work: str) -> list[Provider]:
    """ONNX Runtime through optimum (``ORTModelForCausalLM.generate``) in a worker process per row:
    ``ort/float32`` (optimum's export, task text-generation-with-past) and ``ort/int8`` (onnxruntime
    dynamic quantization of that export: int8 weights, activations quantized on the fly).

    Timing wraps the round trip to the worker (a JSON line each way, well under a millisecond, which the
    decode subtraction cancels). Logits come back through a ``.npy`` file.
    """
    import numpy as np

    onnx_dir = os.path.join(work, "onnx")
    files = run_worker(python, "export", hf_dir, onnx_dir, "--int8")["files"]
    providers = []
    for file_name, dtype in zip(files, ("float32", "int8")):
        worker = Worker([python, ORT_WORKER, "serve", onnx_dir, file_name, "--threads", str(threads)],
                        f"ort-{file_name}", work)

        def generate(prompts: list[list[int]], n: int, worker=worker) -> None:
            worker.ask(cmd="generate", prompts=prompts, n=n)

        def greedy(prefix: list[int], n: int, worker=worker) -> list[int]:
            return worker.ask(cmd="generate", prompts=[prefix], n=n, ids=True)["ids"][0]

        def logits(ids: list[int], worker=worker, path=os.path.join(work, "ort-logits.npy")) -> torch.Tensor:
            worker.ask(cmd="logits", ids=ids, out=path)
            return torch.from_numpy(np.load(path)).float()

        def rss(prompts: list[list[int]], n: int, file_name=file_name) -> float:
            return run_worker(python, "rss", onnx_dir, file_name, "--threads", str(threads), "--prompts",
                              json.dumps(prompts), "--tokens", str(n))["peak_rss_mb"]

        providers.append(Provider(f"ort/{dtype}", "ort", dtype, generate, llm,
                                  quantization="int8" if dtype == "int8" else None, itemsize=4, logits=logits,
                                  greedy=greedy, rss=rss, close=worker.close, version=worker.ready.get("versions")))
    return providers


# ---- peak RSS, one fresh process per provider ---------------------------------------------------------

RSS_BATCH, RSS_TOKENS = 8, 16  # what each RSS child generates (batch 8 mixed prompts x 16 new tokens)
# Each child loads its model the way the provider does, generates once, and prints its peak RSS (MiB):
# it imports only what that engine needs (ct2: ctranslate2 alone), so the number is what a user's
# process running that engine would peak at.
RSS_CHILD = {
    "ours": """
import torch
from gpt2fast.engine import LLM
from gpt2fast.sampling import SamplingParams
llm = LLM(a["model"], backend=a["backend"], dtype=a["dtype"], device="cpu", max_num_seqs=len(prompts),
          quantization=a["quantization"])
llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
""",
    "hf": """
import torch
from transformers import GPT2LMHeadModel
hf = GPT2LMHeadModel.from_pretrained(a["path"]).eval()
width = max(map(len, prompts))
ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
extra = {"cache_implementation": "static"} if a["static"] else {}
with torch.no_grad():
    hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                **extra)
""",
    "ct2": """
import ctranslate2
gen = ctranslate2.Generator(a["path"], device="cpu", compute_type=a["compute_type"], intra_threads=threads,
                            inter_threads=1)
import os
with open(os.path.join(a["path"], "vocabulary.json")) as f:
    vocab = json.load(f)
gen.generate_batch([[vocab[i] for i in p] for p in prompts], max_length=n, min_length=n, sampling_topk=1,
                   include_prompt_in_result=False, end_token=[])
""",
}
RSS_PRELUDE = ("import json, resource, sys\n"
               "a = json.loads(sys.argv[1]); prompts, n, threads = a['prompts'], a['n'], a['threads']\n")
RSS_TORCH_THREADS = "torch.set_num_threads(threads)\n"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child would report its parent's peak.
RSS_REPORT = """
try:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
print(json.dumps({"peak_rss_mb": kib / 1024}))
"""


def child_rss(spec: dict, prompts: list[list[int]], n: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh Python that loads ``spec``'s model and generates ``n`` tokens for ``prompts``."""
    body = RSS_CHILD[spec["kind"]]
    if "import torch" in body:  # the torch thread count, right after the import, before any work
        head, _, rest = body.partition("import torch\n")
        body = head + "import torch\n" + RSS_TORCH_THREADS + rest
    code = RSS_PRELUDE + body + RSS_REPORT
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this gpt2fast, not another
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
                        "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec | dict(prompts=prompts, n=n, threads=threads))],
                          capture_output=True, text=True, env=env, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the RSS child for {spec['kind']} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:] or '(no output)'}")
    return float(json.loads(lines[-1])["peak_rss_mb"])


def measure_rss(p: Provider, skipped: list[str]) -> dict | None:
    """``p``'s peak RSS in a fresh process generating ``RSS_TOKENS`` tokens for ``RSS_BATCH`` mixed prompts."""
    if p.rss is None:
        skipped.append(f"peak RSS of {p.name}: no way to load it in a fresh process")
        return None
    cfg = p.llm.config
    prompts = mixed_batch(RSS_BATCH, cfg.vocab_size, cfg.n_positions - RSS_TOKENS - 1)
    try:
        mb = p.rss(prompts, RSS_TOKENS)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        skipped.append(f"peak RSS of {p.name}: {e}")
        return None
    return dict(provider=p.name, backend=p.backend, dtype=p.dtype, batch=RSS_BATCH, new_tokens=RSS_TOKENS,
                peak_rss_mb=mb)


# ---- speed ------------------------------------------------------------------------------------------


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def mixed_batch(batch: int, vocab: int, max_len: int) -> list[list[int]]:
    """``batch`` random prompts cycling through ``MIXED_PROMPT_LENS`` (capped at ``max_len``)."""
    return [random_prompt(min(MIXED_PROMPT_LENS[i % len(MIXED_PROMPT_LENS)], max_len), vocab, seed=i)
            for i in range(batch)]


def rounds(jobs: int, repeats: int) -> list[int]:
    """The order ``jobs`` jobs run in over ``repeats`` rounds: each job once per round, every round starting
    one job later than the last, so no job always runs right after the same other one.

    Example:
        >>> rounds(3, 2)
        [0, 1, 2, 1, 2, 0]
    """
    return [(r + i) % jobs for r in range(repeats) for i in range(jobs)]


# Pause before each timed CPU job: thread pools spin-wait after their work (OpenMP runtimes, ONNX Runtime's pool
# in its worker), and a pool still spinning would take a core from the next provider in the rounds. A precaution,
# not measured on its own: the 2-thread slowdown first blamed on it (our int8 step 3.7 -> 10.8 ms) was
# CTranslate2's runtime in the bench's process (ct2_providers).
SETTLE_S = 0.25


def interleaved(jobs: list[Callable[[], object]], repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds of ``repeats`` calls of each job, run round by round (``rounds``), not job after job: on a shared
    machine whose speed drifts during a run (other tenants' load, clocks), the drift reaches every job's median
    alike instead of whichever provider ran while it lasted. On CPU each job starts ``SETTLE_S`` after the last.

    Example:
        >>> [len(s) for s in interleaved([lambda: None, lambda: None], 3, torch.device("cpu"))]
        [3, 3]
    """
    seconds: list[list[float]] = [[] for _ in jobs]
    for i in rounds(len(jobs), repeats):
        if device.type == "cpu":
            time.sleep(SETTLE_S)
        seconds[i] += timings(jobs[i], 1, device)
    return seconds


def warm_up(p: Provider, fn: Callable[[], object]) -> float:
    """Run ``fn`` once untimed (every shape it needs is built) and return the peak memory it reached (MiB)."""
    reset_peak_memory(p.llm.device)
    fn()
    return peak_memory_mb(p.llm.device)


def measure_prefill(providers: list[Provider], prompt_len: int, repeats: int) -> list[dict]:
    """Batch 1: time of generating one token after a ``prompt_len``-token prompt, every provider in each round."""
    prompt = [random_prompt(prompt_len, providers[0].llm.config.vocab_size, seed=prompt_len)]
    peaks = [warm_up(p, lambda p=p: p.generate(prompt, 1)) for p in providers]
    runs = interleaved([lambda p=p: p.generate(prompt, 1) for p in providers], repeats, providers[0].llm.device)
    rows = []
    for p, seconds, peak in zip(providers, runs, peaks):
        s = statistics.median(seconds)
        rows.append(dict(provider=p.name, backend=p.backend, dtype=p.dtype, prompt_len=prompt_len, prefill_ms=s * 1e3,
                         tok_s=prompt_len / s, spread_pct=spread_pct(seconds), peak_mem_mb=peak))
    return rows


def measure_decode(providers: list[Provider], batch: int, new_tokens: int, repeats: int,
                   bandwidth: float) -> list[dict]:
    """Decode at ``batch`` mixed-length prompts: TTFT, s/step by subtraction, and the floor beside it."""
    cfg = providers[0].llm.config
    prompts = mixed_batch(batch, cfg.vocab_size, cfg.n_positions - new_tokens - 1)
    return decode_rows(providers, prompts, new_tokens, repeats, bandwidth)


def measure_context(providers: list[Provider], context: int, new_tokens: int, repeats: int,
                    bandwidth: float) -> list[dict]:
    """Batch 1 decode after a ``context``-token prompt (capped so ``new_tokens`` more still fit)."""
    cfg = providers[0].llm.config
    prompt = random_prompt(min(context, cfg.n_positions - new_tokens - 1), cfg.vocab_size, seed=context)
    keep = ("provider", "backend", "dtype", "batch", "context", "new_tokens", "decode_ms", "tok_s", "spread_pct",
            "floor_ms", "achieved_gbs", "pct_of_floor")
    return [{key: row[key] for key in keep} for row in decode_rows(providers, [prompt], new_tokens, repeats, bandwidth)]


def decode_rows(providers: list[Provider], prompts: list[list[int]], new_tokens: int, repeats: int,
                bandwidth: float) -> list[dict]:
    """Generate 1 and 1 + ``new_tokens`` tokens for ``prompts``; the difference over ``new_tokens`` is a step.

    Every provider runs both in each round (``interleaved``); a provider's row takes the medians of its rounds.
    """
    peaks = [warm_up(p, lambda p=p: p.generate(prompts, 1 + new_tokens)) for p in providers]
    jobs = [job for p in providers for job in (lambda p=p: p.generate(prompts, 1),
                                               lambda p=p: p.generate(prompts, 1 + new_tokens))]
    runs = interleaved(jobs, repeats, providers[0].llm.device)
    rows = []
    for i, (p, peak) in enumerate(zip(providers, peaks)):
        first, total = runs[2 * i], runs[2 * i + 1]
        step_s = (statistics.median(total) - statistics.median(first)) / new_tokens
        if step_s <= 0:
            raise ValueError(f"{p.name} at batch {len(prompts)}: {new_tokens} decode steps took no measurable time "
                             "over timing noise; raise --decode-tokens or --repeats")
        contexts = [len(prompt) + new_tokens / 2 for prompt in prompts]  # the mean position each sequence decodes at
        moved = decode_bytes(p.llm, contexts, p.quantization, p.itemsize)
        rows.append(dict(provider=p.name, backend=p.backend, dtype=p.dtype, batch=len(prompts),
                         prompt_lens=sorted(set(map(len, prompts))), context=statistics.mean(contexts),
                         new_tokens=new_tokens, ttft_ms=statistics.median(first) * 1e3,
                         decode_ms=step_s * 1e3, tok_s=len(prompts) / step_s, spread_pct=spread_pct(total),
                         floor_ms=moved / bandwidth * 1e3, achieved_gbs=moved / step_s / 1e9,
                         pct_of_floor=100 * moved / bandwidth / step_s, peak_mem_mb=peak))
    return rows


def by_provider(rows: list[dict], providers: list[Provider]) -> list[dict]:
    """``rows`` grouped by provider in ``providers``' order (each group keeps its rows' order).

    Example:
        >>> ps = [Provider("a", "x", "float32", print, None), Provider("b", "x", "float32", print, None)]
        >>> [r["provider"] for r in by_provider([dict(provider="b"), dict(provider="a")], ps)]
        ['a', 'b']
    """
    order = {p.name: i for i, p in enumerate(providers)}
    return sorted(rows, key=lambda r: order[r["provider"]])


# ---- runtime overhead -------------------------------------------------------------------------------

# GPT-2's 12 layers and vocabulary with a 64-wide body: the model's arithmetic is tiny, so what a step
# costs beyond its forward is the runtime (scheduler, sampler, Python) - and, inside the forward, the
# per-layer cost of issuing ops.
OVERHEAD_MODEL = 'random:{"n_layer": 12, "n_embd": 64, "n_head": 2}'


def overhead_providers(providers: list[Provider], max_batch: int) -> list[Provider]:
    """Every provider again on ``OVERHEAD_MODEL``, with its forwards timed (the baselines share one twin)."""
    tiny: list[Provider] = []
    for p in providers:
        if p.name.startswith("gpt2fast"):
            tiny.append(ours(LLM(OVERHEAD_MODEL, backend=p.backend, dtype=p.llm.dtype, device=p.llm.device,
                                 max_num_seqs=max_batch, quantization=p.quantization), timed=True,
                             quantization=p.quantization))
    base = tiny[0].llm
    tiny += [hf_provider(base, static=p.backend == "hf-static", timed=True)
             for p in providers if p.backend in ("hf", "hf-static")]
    return tiny


def measure_overhead(p: Provider, batch: int, new_tokens: int, repeats: int) -> dict:
    """Per decode step: wall time, host time inside the model forward, and the rest (the runtime's overhead).

    Both by subtraction, ``(x(1 + N tokens) - x(1 token)) / N``, so prefill and setup cancel.
    """
    prompts = mixed_batch(batch, p.llm.config.vocab_size, 64)

    def run(n: int) -> tuple[float, float]:
        p.forward_s.clear()
        start = time.perf_counter()
        p.generate(prompts, n)
        return time.perf_counter() - start, sum(p.forward_s)

    p.generate(prompts, 2)  # warm-up
    first = [run(1) for _ in range(repeats)]
    full = [run(1 + new_tokens) for _ in range(repeats)]
    per_step = [(statistics.median(f[i] for f in full) - statistics.median(f[i] for f in first)) / new_tokens * 1e6
                for i in (0, 1)]
    step_us, forward_us = per_step
    return dict(provider=p.name, backend=p.backend, dtype=p.dtype, batch=batch, n_layer=p.llm.config.n_layer,
                step_us=step_us, forward_us=forward_us, overhead_us=max(step_us - forward_us, 0.0))


# ---- accuracy ---------------------------------------------------------------------------------------


def fixed_text(chars: int = 20_000) -> str:
    """The accuracy text: ``pydoc_data.topics`` (shipped with CPython) in sorted-key order, first ``chars``.

    Example:
        >>> fixed_text(10)
        'The "asser'
    """
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))[:chars]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean next-token NLL) of ``ids`` under ``logits`` (T, V).

    Example:
        >>> round(perplexity(torch.zeros(3, 10), [1, 2, 3]), 6)  # uniform over 10 tokens
        10.0
    """
    targets = torch.tensor(ids[1:], device=logits.device)  # (T-1,)
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].float(), targets).item())


def greedy_tokens(llm: LLM, prefix: list[int], n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return llm.generate(prefix, params, use_tqdm=False)[0].outputs[0].token_ids


def agreement(ours_ids: list[int], ref_ids: list[int]) -> tuple[float, float]:
    """(fraction before the first divergence, fraction of positions equal).

    Example:
        >>> agreement([1, 2, 3, 4], [1, 2, 9, 4])
        (0.5, 0.75)
    """
    n = len(ref_ids)
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), n)
    return first / n, sum(a == b for a, b in zip(ours_ids, ref_ids)) / n


@dataclass
class Reference:
    """The fp32 reference on the fixed text: logits, HF fp32 logits, perplexity, greedy tokens."""

    ids: list[int]
    prefix: list[int]
    logits: torch.Tensor  # (T, V) fp32, backend torch
    hf_logits: torch.Tensor | None  # (T, V) fp32, transformers; None without it
    ppl: float
    greedy: list[int]


def make_reference(llm: LLM, ppl_tokens: int, greedy: int) -> Reference:
    """``llm`` must be the fp32 torch-backend model; the text is cut to the context and to ``ppl_tokens``."""
    ids = llm.tokenizer.encode(fixed_text())[:min(ppl_tokens, llm.config.n_positions)]
    prefix = ids[:16]
    logits = llm.logits(ids)
    hf_logits = None
    if transformers_missing() is None:
        with torch.no_grad():
            hf_logits = hf_twin(llm, torch.float32)(torch.tensor([ids], device=llm.device)).logits[0].float()
    n = min(greedy, llm.config.n_positions - len(prefix))
    return Reference(ids, prefix, logits, hf_logits, perplexity(logits, ids), greedy_tokens(llm, prefix, n))


def measure_accuracy(p: Provider, ref: Reference) -> dict:
    """One provider against the reference; ``flags`` names what is outside ``TOLERANCES[dtype]``."""
    logits = p.logits(ref.ids).float().to(ref.logits.device)
    tol = TOLERANCES[p.dtype]
    err = (logits - ref.logits).abs().max().item()
    ppl = perplexity(logits, ref.ids)
    until, total = agreement(p.greedy(ref.prefix, len(ref.greedy)), ref.greedy)
    row = dict(provider=p.name, backend=p.backend, dtype=p.dtype, text_tokens=len(ref.ids),
               greedy_tokens=len(ref.greedy), max_abs_logit_err=err, ppl=ppl, ref_ppl=ref.ppl,
               ppl_rel_diff=abs(ppl - ref.ppl) / ref.ppl, agree_until_divergence=until, agree_total=total)
    if ref.hf_logits is not None:
        row["max_abs_logit_diff_hf"] = (logits - ref.hf_logits).abs().max().item()
    checks = {"logits": err <= tol.logits_rel * max(1.0, ref.logits.abs().max().item()),
              "ppl": row["ppl_rel_diff"] <= tol.ppl_rel, "greedy": total >= tol.agree_total}
    return row | {"flags": [name for name, ok in checks.items() if not ok]}


# ---- reports ----------------------------------------------------------------------------------------

Column = tuple[str, str, str]  # header, row key, format
DECODE_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("batch", "batch", "d"), ("ctx", "context", ".0f"), ("TTFT ms", "ttft_ms", ".1f"),
    ("ms/step", "decode_ms", ".2f"), ("tok/s", "tok_s", ".1f"), ("spread %", "spread_pct", ".0f"),
    ("floor ms", "floor_ms", ".2f"), ("GB/s", "achieved_gbs", ".1f"), ("% of floor", "pct_of_floor", ".1f"),
    ("hf / this", "hf_ratio", ".2f"), ("peak MiB", "peak_mem_mb", ".0f"),
]
CONTEXT_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("ctx", "context", ".0f"), ("ms/step", "decode_ms", ".2f"),
    ("tok/s", "tok_s", ".1f"), ("spread %", "spread_pct", ".0f"), ("floor ms", "floor_ms", ".2f"),
    ("GB/s", "achieved_gbs", ".1f"), ("% of floor", "pct_of_floor", ".1f"),
]
OVERHEAD_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("batch", "batch", "d"), ("step us", "step_us", ".0f"),
    ("forward us", "forward_us", ".0f"), ("overhead us", "overhead_us", ".0f"), ("hf / this", "hf_ratio", ".2f"),
]
LAUNCH_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("per layer", "per_layer", "d"), ("fixed", "fixed", "d"),
    ("per step", "per_step", "d"), ("target", "target_per_step", "d"),
]
PREFILL_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("prompt", "prompt_len", "d"), ("prefill ms", "prefill_ms", ".2f"),
    ("tok/s", "tok_s", ".0f"), ("spread %", "spread_pct", ".0f"), ("peak MiB", "peak_mem_mb", ".0f"),
]
ACCURACY_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("max|err| vs fp32", "max_abs_logit_err", ".2e"),
    ("max|diff| vs hf", "max_abs_logit_diff_hf", ".2e"), ("ppl", "ppl", ".6g"), ("ppl rel diff", "ppl_rel_diff", ".1e"),
    ("greedy agree (until 1st diff)", "agree_until_divergence", ".3f"), ("greedy agree (total)", "agree_total", ".3f"),
    ("flags", "flags", "s"),
]


def _cells(rows: list[dict], columns: list[Column]) -> list[list[str]]:
    def cell(value, fmt: str) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value)) if value else "ok"
        return format(value, fmt)

    return [[cell(row[key], fmt) if key in row else "-" for _, key, fmt in columns] for row in rows]


def text_table(rows: list[dict], columns: list[Column]) -> str:
    """Fixed-width columns: the provider left-aligned, numbers right-aligned."""
    cells = [[header for header, _, _ in columns]] + _cells(rows, columns)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in _cells(rows, columns)])


def headline(meta: dict) -> str:
    return (f"{meta['model']} on {meta['device_name']} ({meta['device']}, {', '.join(meta['dtypes'])}); "
            f"{meta['threads']} threads (every provider), load average {meta['load_avg_1m']:.1f} at start; "
            f"copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s (read + write); "
            f"torch {meta['torch']}, "
            f"transformers {meta['transformers']}; peak memory = {meta['peak_mem_kind']}")


RSS_COLUMNS: list[Column] = [
    ("provider", "provider", "s"), ("batch", "batch", "d"), ("new tokens", "new_tokens", "d"),
    ("peak RSS MiB", "peak_rss_mb", ".0f"), ("/ ct2-int8's", "vs_ct2_int8", ".2f"),
]
TARGETS = ("issue 14's bars: gpt2fast fp32 hf/this >= 1.4 at batch 1 and >= 2 at batch 8; gpt2fast int8 "
           "ct2-int8/this >= 1 and peak RSS <= 2x ct2 int8's")


def acceptance_table(result: dict) -> tuple[list[dict], list[Column]]:
    """The ``ratios`` and ``rss`` rows pivoted to one row per provider: HF ms/step / this and ct2/int8 ms/step
    / this at each batch, then the peak RSS and its ratio to ct2 int8's.

    Example:
        >>> rows, cols = acceptance_table(dict(ratios=[dict(provider="x", batch=1, decode_ms=1.0, hf_ratio=2.0)],
        ...                                    rss=[dict(provider="x", peak_rss_mb=900.0)]))
        >>> text_table(rows, cols).splitlines()[1]
        'x                  2.00           900'
    """
    batches = sorted({r["batch"] for r in result["ratios"]})
    rows: dict[str, dict] = {}
    for r in result["ratios"]:
        row = rows.setdefault(r["provider"], {"provider": r["provider"]})
        for key, short in (("hf_ratio", "hf"), ("ct2_int8_ratio", "ct2")):
            if key in r:
                row[f"{short}_{r['batch']}"] = r[key]
    for r in result.get("rss", []):
        row = rows.setdefault(r["provider"], {"provider": r["provider"]})
        row["rss"] = r["peak_rss_mb"]
        if "vs_ct2_int8" in r:
            row["rss_vs"] = r["vs_ct2_int8"]
    columns: list[Column] = [("provider", "provider", "s")]
    for short, header in (("hf", "hf / this"), ("ct2", "ct2-int8 / this")):
        columns += [(f"{header} b={b}", f"{short}_{b}", ".2f") for b in batches
                    if any(f"{short}_{b}" in row for row in rows.values())]
    columns += [(header, key, ".0f" if key == "rss" else ".2f") for header, key in
                (("peak RSS MiB", "rss"), ("RSS / ct2-int8's", "rss_vs")) if any(key in row for row in rows.values())]
    return list(rows.values()), columns


def sections(result: dict) -> list[tuple[str, list[dict], list[Column]]]:
    """(title, rows, columns) of every non-empty table, in report order."""
    found = []
    if result.get("ratios"):
        rows, columns = acceptance_table(result)
        found.append((f"Acceptance ratios (decode ms/step ratios, above 1: this is faster; {TARGETS})", rows,
                      columns))
    for title, key, columns in SECTIONS:
        if result.get(key):
            found.append((title, result[key], columns))
    return found


SECTIONS = [("Decode (batches mix prompt lengths; floor = bytes a step must move / copy bandwidth)", "decode",
             DECODE_COLUMNS),
            ("Decode time vs context (batch 1)", "context", CONTEXT_COLUMNS),
            ("Prefill (batch 1, one new token)", "prefill", PREFILL_COLUMNS),
            (f"Runtime overhead per decode step on {OVERHEAD_MODEL} (step - model forward, host time)", "overhead",
             OVERHEAD_COLUMNS),
            ("Kernel launches per eager decode step (target <= 5 per layer + 3)", "launches", LAUNCH_COLUMNS),
            ("Accuracy vs the fp32 reference (backend reference, float32) on the pydoc_data.topics text", "accuracy",
             ACCURACY_COLUMNS),
            (f"Peak RSS per provider (a fresh process: load, generate {RSS_TOKENS} tokens for {RSS_BATCH} mixed "
             "prompts; its VmHWM)", "rss", RSS_COLUMNS)]


def print_report(result: dict) -> None:
    print(headline(result["meta"]))
    for title, rows, columns in sections(result):
        print(f"\n{title}\n{text_table(rows, columns)}")
    for note in result["meta"]["skipped"]:
        print(f"skipped: {note}")


def markdown_report(result: dict) -> str:
    meta = result["meta"]
    parts = [f"# gpt2fast bench: {meta['model']}", "", headline(meta), "",
             f"Tolerances (vs fp32 reference): {json.dumps(meta['tolerances'])}. Wall time {meta['wall_s']:.0f} s."]
    for title, rows, columns in sections(result):
        parts += ["", f"## {title}", "", markdown_table(rows, columns)]
    parts += [""] + [f"- skipped: {note}" for note in meta["skipped"]]
    return "\n".join(parts) + "\n"


def write_outputs(result: dict, out: str) -> list:
    """``bench.json``, ``bench.md`` and the PNG plots (``gpt2fast.bench_plots``) in ``out``; returns the plots."""
    from gpt2fast.bench_plots import write_plots

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(markdown_report(result))
    return write_plots(result, out)


# ---- the run ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``gpt2fast bench``'s options; unset ones take the full or ``--quick`` profile (``PROFILES``).

    Example:
        >>> build_parser().parse_args(["--quick"]).backends
        ['auto']
    """
    parser = argparse.ArgumentParser(prog="gpt2fast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:gpt2", help="random:<preset>, a folder, or a Hub id")
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=BACKENDS)
    parser.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES,
                        help="default: hf hf-static ct2 ort (quick: hf); ct2 and ort each give float32 and int8 rows")
    parser.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "int8"],
                        help="weight quantizations of every gpt2fast provider (default none): int8 adds "
                        "gpt2fast[<backend>]/int8 rows")
    parser.add_argument("--ort-python", help="the Python of the ONNX Runtime venv for the ort baseline (default: "
                        "$GPT2FAST_ORT_PYTHON; without either, ort is skipped: see benchmarks/README.md)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS table (a fresh process per provider)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="decode batch sizes (default 1 8 64; quick 1 8)")
    parser.add_argument("--prompt-lens", nargs="+", type=int, help="prefill lengths (default 32 128 512 1024; "
                        "quick 32)")
    parser.add_argument("--contexts", nargs="+", type=int, help="batch-1 decode after prompts this long (default "
                        "32 128 512 1024; quick 32 256; capped to leave room for the decoded tokens)")
    parser.add_argument("--decode-tokens", type=int, help="N in (t(1+N) - t(1)) / N (default 32; quick 8)")
    parser.add_argument("--repeats", type=int, help="timed runs per number (default 5; quick 3)")
    parser.add_argument("--greedy-tokens", type=int, help="greedy agreement length (default 256; quick 32)")
    parser.add_argument("--ppl-tokens", type=int, help="tokens of the fixed text (default 1024; quick 256)")
    parser.add_argument("--threads", type=int, help="CPU threads of every provider: torch's for gpt2fast and hf, "
                        "CTranslate2's intra_threads, ONNX Runtime's intra_op_num_threads (default: torch's current "
                        "count; quick: 1, which keeps OpenMP threads from spinning against other processes)")
    parser.add_argument("--quick", action="store_true", help="a small run: under 3 minutes for random:gpt2 on 2 cores")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md")
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the profile and check them; a bad value raises ValueError.

    Without transformers the profile's HF baselines are dropped (``run`` says so); asked for by name, they are an error.
    """
    if args.baselines and transformers_missing():
        raise ValueError(f"--baselines {' '.join(args.baselines)} needs transformers, which is not installed: "
                         'pip install -e ".[bench]"')
    for key, value in PROFILES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_sizes", "prompt_lens", "contexts"):
        if any(v < 1 for v in getattr(args, key)):
            raise ValueError(f"--{key.replace('_', '-')} must be positive integers, got {getattr(args, key)}")
    for key in ("decode_tokens", "repeats", "greedy_tokens", "ppl_tokens"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.ppl_tokens < 2:
        raise ValueError("--ppl-tokens must be at least 2 (perplexity needs a next token)")
    args.quantization = list(dict.fromkeys(None if q == "none" else q for q in args.quantization))
    return args


def load_providers(args: argparse.Namespace, skipped: list[str]) -> list[Provider]:
    """One gpt2fast provider per distinct (resolved backend, dtype, quantization); requests that cannot run are
    skipped."""
    providers: dict[str, Provider] = {}
    for quantization in args.quantization:
        for dtype in args.dtypes:
            for backend in args.backends:
                try:
                    llm = LLM(args.model, backend=backend, dtype=dtype, device=args.device,
                              max_num_seqs=max(args.batch_sizes), quantization=quantization)
                except (ValueError, RuntimeError, NotImplementedError) as e:
                    if quantization is None and (backend == "auto" or len(args.backends) == 1):
                        raise
                    skipped.append(f"backend {backend} / {dtype}{f' / {quantization}' if quantization else ''}: {e}")
                    continue
                p = ours(llm, quantization=quantization)
                providers.setdefault(p.name, p)
    if not providers:
        raise ValueError(f"no gpt2fast provider could run: {'; '.join(skipped)}")
    return list(providers.values())


def reference_llm(args: argparse.Namespace, providers: list[Provider]) -> LLM:
    """The fp32 model on the reference ops (the spec): reused when a provider already is one."""
    for p in providers:
        if p.backend == "reference" and p.dtype == "float32":
            return p.llm
    return LLM(args.model, backend="reference", dtype="float32", device=providers[0].llm.device)


def transformers_missing() -> str | None:
    """Why transformers cannot be imported (the HF baselines and the 'vs hf' column need it), or None.

    Example:
        >>> transformers_missing() is None or "transformers" in transformers_missing()
        True
    """
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return str(e) or "transformers is not installed"
    return None


BASELINES = ["hf", "hf-static", "ct2", "ort"]


def fp32_llm(args: argparse.Namespace, ours_: list[Provider], ref: LLM) -> LLM:
    """An unquantized float32 gpt2fast model: the weights the HF twin, CTranslate2 and ONNX Runtime run."""
    return next((p.llm for p in ours_ if p.quantization is None and p.llm.dtype == torch.float32), ref)


def baselines(args: argparse.Namespace, llm: LLM, fp32: LLM, skipped: list[str], work: str) -> list[Provider]:
    """The baselines ``args`` asks for, on the same weights: HF on ``llm`` (our first unquantized model, in
    its dtype), CTranslate2 and ONNX Runtime on ``fp32`` (saved once to ``work`` as a transformers checkpoint).
    Whatever cannot run is left out and ``skipped`` says why (and how to add it)."""
    if transformers_missing() is not None:
        skipped.append(f"the baselines ({', '.join(args.baselines) or 'none asked for'}) and the 'max|diff| vs "
                       f"hf' accuracy column: transformers is not installed; {HF_INSTALL}")
        return []
    threads = torch.get_num_threads()
    found = [hf_provider(llm, static=name == "hf-static") for name in args.baselines if name.startswith("hf")]
    engines = [name for name in args.baselines if name in ("ct2", "ort")]
    if engines and llm.device.type != "cpu":
        skipped.append(f"{' and '.join(engines)}: CPU engines, measured when bench runs with --device cpu")
        return found
    if not engines and not found:
        return found
    hf_dir = os.path.join(work, "hf")
    save_hf_dir(fp32, hf_dir)
    for p in found:  # HF's peak RSS: from_pretrained of the saved checkpoint, as a user loads it
        spec = dict(kind="hf", path=hf_dir, static=p.backend == "hf-static")
        p.rss = lambda prompts, n, spec=spec: child_rss(spec, prompts, n, threads)
    if "ct2" in engines:
        if (why := ct2_missing()) is not None:
            skipped.append(f"ct2: ctranslate2 cannot be imported ({why}); {CT2_INSTALL}")
        else:
            try:
                found += ct2_providers(fp32, hf_dir, threads, work)
            except (RuntimeError, OSError) as e:
                skipped.append(f"ct2: {e}")
    if "ort" in engines:
        python = ort_python(args)
        if python is None:
            skipped.append(f"ort: no --ort-python or GPT2FAST_ORT_PYTHON. {ORT_SETUP}")
        else:
            try:
                found += ort_providers(python, fp32, hf_dir, threads, work)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                skipped.append(f"ort ({python}): {e}")
    return found


def machine_meta(args: argparse.Namespace, llm: LLM, bandwidth: float) -> dict:
    import gpt2fast

    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except ImportError:
            return "not installed"

    cuda = llm.device.type == "cuda"
    return dict(model=args.model, device=str(llm.device), machine=platform.machine(),
                device_name=torch.cuda.get_device_name(llm.device) if cuda else (platform.processor() or "cpu"),
                cpu_count=os.cpu_count() or 1, threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__,
                transformers=version("transformers"), triton=version("triton"),
                gpt2fast=getattr(gpt2fast, "__version__", "0.1.0"), config=asdict(llm.config),
                bandwidth_gbs=bandwidth / 1e9, quick=args.quick,
                peak_mem_kind="torch.cuda.max_memory_allocated per row" if cuda else "process max RSS so far (grows)",
                tolerances={name: asdict(t) for name, t in TOLERANCES.items()})


def run(args: argparse.Namespace) -> dict:
    """Measure everything ``args`` asks for; returns the JSON-ready result (see the module docstring)."""
    started, load = time.perf_counter(), os.getloadavg()[0]  # before we add our own load
    skipped: list[str] = []
    ours_ = load_providers(args, skipped)
    first = next((p.llm for p in ours_ if p.quantization is None), ours_[0].llm)
    bandwidth = copy_bandwidth(first.device)
    ref_llm = reference_llm(args, ours_)
    with tempfile.TemporaryDirectory(prefix="gpt2fast-bench-") as work:
        providers = ours_ + baselines(args, first, fp32_llm(args, ours_, ref_llm), skipped, work)
        try:
            result = measure_all(args, providers, ours_, ref_llm, bandwidth, skipped)
        finally:
            for p in providers:
                if p.close is not None:
                    p.close()
    meta = machine_meta(args, first, bandwidth) | dict(
        load_avg_1m=load, dtypes=sorted({p.dtype for p in ours_}), skipped=skipped,
        quantization=[q or "none" for q in args.quantization],
        engines={p.backend: p.version for p in providers if p.version is not None},
        wall_s=time.perf_counter() - started)
    return dict(meta=meta) | result


def measure_all(args: argparse.Namespace, providers: list[Provider], ours_: list[Provider], ref_llm: LLM,
                bandwidth: float, skipped: list[str]) -> dict:
    """Every table but ``meta``: each provider on the same prompts, the same subtraction, the same reference."""
    first = providers[0].llm
    lens = [n for n in args.prompt_lens if n <= first.config.n_positions]  # a full-context prompt still yields 1 token
    skipped += [f"prompt length {n}: beyond the context ({first.config.n_positions})"
                for n in args.prompt_lens if n not in lens]
    decode = by_provider([row for b in args.batch_sizes
                          for row in measure_decode(providers, b, args.decode_tokens, args.repeats, bandwidth)],
                         providers)
    context = by_provider([row for n in args.contexts
                           for row in measure_context(providers, n, args.decode_tokens, args.repeats, bandwidth)],
                          providers)
    prefill = by_provider([row for n in lens for row in measure_prefill(providers, n, args.repeats)], providers)
    overhead = [measure_overhead(p, b, args.decode_tokens, args.repeats)
                for p in overhead_providers(providers, max(args.batch_sizes)) for b in args.batch_sizes]
    launches = [launch_row(p, skipped) for p in ours_]
    ref = make_reference(ref_llm, args.ppl_tokens, args.greedy_tokens)
    accuracy = [row for p in providers if p.logits is not None and (row := accuracy_row(p, ref, skipped))]
    rss = []
    if args.no_rss:
        skipped.append("peak RSS per provider: --no-rss")
    elif first.device.type != "cpu":
        skipped.append("peak RSS per provider: measured on CPU runs only")
    else:
        rss = [row for p in providers if (row := measure_rss(p, skipped))]
    add_ratio_to_hf(decode, "decode_ms", ("batch",))
    add_ratio_to_hf(overhead, "overhead_us", ("batch",))
    add_ratio_to(rss, "peak_rss_mb", "ct2/int8", "vs_ct2_int8", invert=True)
    return dict(decode=decode, context=context, prefill=prefill, overhead=overhead,
                launches=[row for row in launches if row], accuracy=accuracy, rss=rss, ratios=ratio_rows(decode))


def accuracy_row(p: Provider, ref: Reference, skipped: list[str]) -> dict | None:
    try:
        return measure_accuracy(p, ref)
    except RuntimeError as e:  # a worker's failure: the other rows stand
        skipped.append(f"accuracy of {p.name}: {e}")
        return None


def add_ratio_to(rows: list[dict], key: str, provider: str, name: str, match: tuple[str, ...] = (),
                 invert: bool = False) -> None:
    """Give every row ``name`` = ``provider``'s ``key`` / this row's (``invert``: this row's / ``provider``'s).

    Example:
        >>> rows = [dict(provider="a", mb=200.0), dict(provider="b", mb=300.0)]
        >>> add_ratio_to(rows, "mb", "a", "vs_a", invert=True); [r["vs_a"] for r in rows]
        [1.0, 1.5]
    """
    base = {tuple(r[m] for m in match): r[key] for r in rows if r["provider"] == provider}
    for r in rows:
        b = base.get(tuple(r[m] for m in match))
        if b is not None and r[key] > 0 and b > 0:
            r[name] = r[key] / b if invert else b / r[key]


def ratio_rows(decode: list[dict]) -> list[dict]:
    """The issue's acceptance ratios per provider and batch: ``hf_ratio`` (HF ms/step / this) and
    ``ct2_int8_ratio`` (ct2/int8 ms/step / this), each when that baseline ran.

    Example:
        >>> rows = [dict(provider="hf", batch=1, decode_ms=4.0), dict(provider="ct2/int8", batch=1, decode_ms=2.0),
        ...         dict(provider="ours", batch=1, decode_ms=1.0)]
        >>> add_ratio_to_hf(rows, "decode_ms", ("batch",)); ratio_rows(rows)[2]
        {'provider': 'ours', 'batch': 1, 'decode_ms': 1.0, 'hf_ratio': 4.0, 'ct2_int8_ratio': 2.0}
    """
    rows = [{k: r[k] for k in ("provider", "batch", "decode_ms", "hf_ratio") if k in r} for r in decode]
    add_ratio_to(rows, "decode_ms", "ct2/int8", "ct2_int8_ratio", ("batch",))
    return rows


def add_ratio_to_hf(rows: list[dict], key: str, match: tuple[str, ...]) -> None:
    """Give every row ``hf_ratio`` = HF's ``key`` / this row's ``key`` (at the same ``match`` fields), when HF ran.

    Example:
        >>> rows = [dict(provider="hf", batch=1, ms=6.0), dict(provider="ours", batch=1, ms=2.0)]
        >>> add_ratio_to_hf(rows, "ms", ("batch",)); [r["hf_ratio"] for r in rows]
        [1.0, 3.0]
    """
    hf = {tuple(r[m] for m in match): r[key] for r in rows if r["provider"] == "hf"}
    for r in rows:
        base = hf.get(tuple(r[m] for m in match))
        if base is not None and r[key] > 0:
            r["hf_ratio"] = base / r[key]


def launch_row(p: Provider, skipped: list[str]) -> dict | None:
    """Kernel launches of one eager decode step on ``p``'s backend and the target ``5 * n_layer + 3``."""
    from gpt2fast.launches import decode_launches

    counts = decode_launches(p.backend, p.llm.device)
    if counts is None:
        skipped.append(f"launch count of {p.name}: no kernels (PyTorch ops on {p.llm.device.type})")
        return None
    per_layer, fixed = counts
    n_layer = p.llm.config.n_layer
    return dict(provider=p.name, backend=p.backend, per_layer=per_layer, fixed=fixed,
                per_step=per_layer * n_layer + fixed, target_per_step=5 * n_layer + 3)


# The library's names in messages -> bench's flags (``gpt2fast.cli.name_flags``).
BENCH_FLAG_NAMES = {"device='cpu'": "--device cpu", "device '": "--device '"}


def main(argv: list[str] | None = None) -> int:
    """``gpt2fast bench``: measure, print the tables, write ``bench.json`` and ``bench.md`` to ``--out``.

    Returns the exit status: 0, or 2 with a one-line message for bad input.
    """
    from gpt2fast.cli import name_flags
    from gpt2fast.errors import CheckpointError

    threads = torch.get_num_threads()
    try:
        args = resolve_args(build_parser().parse_args(argv))
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()  # save_pretrained / from_pretrained bars of the ct2 and ort setup
        except ImportError:
            pass
        torch.set_num_threads(args.threads or threads)
        result = run(args)
    except (ValueError, CheckpointError) as e:
        print(f"gpt2fast bench: error: {name_flags(str(e), BENCH_FLAG_NAMES)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it
    print_report(result)
    result_plots = write_outputs(result, args.out)
    print(f"\nwrote {os.path.join(args.out, 'bench.json')}, bench.md and {', '.join(p.name for p in result_plots)} "
          f"({result['meta']['wall_s']:.0f} s)")
    return 0
