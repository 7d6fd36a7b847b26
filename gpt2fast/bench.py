"""``gpt2fast bench``: speed, the memory-bandwidth floor and accuracy of every backend, side by side in one run.

For one model, every provider (each requested ``--backends`` x ``--dtypes``, shown as
``gpt2fast[torch]/float32``, and the baselines ``hf`` = transformers ``generate``, eager, and
``hf-static`` = transformers with a static KV cache, ``torch.compile``d on CUDA) is measured on the
same weights in the same process:

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
* kernel launches of one eager decode step per gpt2fast backend with kernels (``gpt2fast.launches``),
  beside the target ``5 * n_layer + 3``;
* accuracy of every gpt2fast provider against the fp32 reference (the same weights on
  ``backend="reference"``, the naive spec, in float32): max |logits - reference| and max |logits - HF
  fp32| (with transformers installed; without it bench runs and says how to add it) over a fixed text,
  perplexity of that text, and greedy agreement over ``--greedy-tokens`` generated tokens,
  flagged when outside ``TOLERANCES``. The fixed text is a slice of ``pydoc_data.topics`` (sorted
  keys), which every CPython ships. With random weights perplexity is about the vocabulary size: it
  is there to compare backends, not models.

Timing: ``time.perf_counter`` on CPU; CUDA events on CUDA (after a warm-up run of each shape).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` since the row began; on CPU the process's
max RSS so far (``resource.getrusage``; a high-water mark that only grows, so later rows include
earlier ones).

Outputs, in ``--out`` (default ``bench-results/``): ``bench.json``, ``bench.md`` and PNG plots
(``gpt2fast.bench_plots``: tokens/s vs batch size, decode ms vs context, % of floor). JSON schema::

    {"meta": {"model", "device", "device_name", "machine", "python", "torch", "transformers",
              "triton", "gpt2fast": str, "cpu_count", "threads": int, "load_avg_1m": float,
              "config": {GPT2Config fields: int/float/bool},
              "dtypes": [str], "bandwidth_gbs": float, "quick": bool, "peak_mem_kind": str,
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
                   "agree_until_divergence", "agree_total": float, "flags": [str]}]}

Every number is finite. Every number is > 0 except the fields in ``MAY_BE_ZERO`` (errors and
spreads: >= 0) and ``FRACTIONS`` (in [0, 1]). ``flags`` is empty when every accuracy number is
within tolerance; otherwise it names the failing checks (``logits``, ``ppl``, ``greedy``).

Example:
    gpt2fast bench --model random:gpt2 --quick
    gpt2fast bench --model gpt2 --backends torch triton cuda --dtypes float16 bfloat16 --out results/h100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
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
                 greedy_tokens=256, ppl_tokens=1024, baselines=["hf", "hf-static"], threads=None),
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
TOLERANCES = {
    "float32": Tolerance(logits_rel=1e-3, ppl_rel=1e-3, agree_total=0.9),
    "float16": Tolerance(logits_rel=1e-2, ppl_rel=1e-2, agree_total=0.5),
    "bfloat16": Tolerance(logits_rel=5e-2, ppl_rel=5e-2, agree_total=0.5),
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


def decode_bytes(llm: LLM, contexts: Sequence[float]) -> float:
    """Bytes one decode step must move: every weight but the position table once, plus K and V per context.

    Example:
        >>> llm = LLM('random:{"n_layer": 1, "n_embd": 8, "n_head": 2}')
        >>> decode_bytes(llm, [10]) - decode_bytes(llm, [0])  # 1 layer, K + V, 10 tokens, 8 wide, fp32
        640.0
    """
    cfg, size = llm.config, llm.dtype.itemsize
    weights = sum(p.numel() for name, p in llm.model.named_parameters() if name != "wpe.weight")
    return float(size * (weights + 2 * cfg.n_layer * cfg.n_embd * sum(contexts)))


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
    dtype: str
    generate: Callable[[list[list[int]], int], None]
    llm: LLM  # whose weights (and bytes) it runs
    forward_s: list[float] | None = None  # host seconds of each model forward, when built with timed=True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ours(llm: LLM, timed: bool = False) -> Provider:
    """A gpt2fast provider: ``LLM.generate`` over the whole batch, greedy, never stopping early.

    ``timed``: record the host time of every model forward (the body, the LM head op the engine picks, and
    the static decode runner's step) in ``forward_s``, so the runtime's own cost can be told apart.
    """

    def generate(prompts: list[list[int]], n: int) -> None:
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)

    forward_s = None
    if timed:
        forward_s = []
        engine = llm.engine
        engine._forward = _timed(engine._forward, forward_s)
        if engine.decode_runner is not None:
            engine.decode_runner.run = _timed(engine.decode_runner.run, forward_s)
        ops = engine.model.ops
        engine.model.ops = replace(ops, **{name: _timed(getattr(ops, name), forward_s) for name in LM_HEAD_OPS})
    return Provider(f"gpt2fast[{llm.backend}]/{dtype_name(llm.dtype)}", llm.backend, dtype_name(llm.dtype),
                    generate, llm, forward_s)


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
    state = {"transformer." + name: (t.t() if is_transposed(name) else t) for name, t in llm.model.state_dict().items()}
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


# ---- speed ------------------------------------------------------------------------------------------


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def mixed_batch(batch: int, vocab: int, max_len: int) -> list[list[int]]:
    """``batch`` random prompts cycling through ``MIXED_PROMPT_LENS`` (capped at ``max_len``)."""
    return [random_prompt(min(MIXED_PROMPT_LENS[i % len(MIXED_PROMPT_LENS)], max_len), vocab, seed=i)
            for i in range(batch)]


def measure_prefill(p: Provider, prompt_len: int, repeats: int) -> dict:
    """Batch 1: time of generating one token after a ``prompt_len``-token prompt."""
    prompt = [random_prompt(prompt_len, p.llm.config.vocab_size, seed=prompt_len)]
    device = p.llm.device
    p.generate(prompt, 1)  # warm-up
    reset_peak_memory(device)
    seconds = timings(lambda: p.generate(prompt, 1), repeats, device)
    s = statistics.median(seconds)
    return dict(provider=p.name, backend=p.backend, dtype=p.dtype, prompt_len=prompt_len, prefill_ms=s * 1e3,
                tok_s=prompt_len / s, spread_pct=spread_pct(seconds), peak_mem_mb=peak_memory_mb(device))


def measure_decode(p: Provider, batch: int, new_tokens: int, repeats: int, bandwidth: float) -> dict:
    """Decode at ``batch`` mixed-length prompts: TTFT, s/step by subtraction, and the floor beside it."""
    cfg = p.llm.config
    prompts = mixed_batch(batch, cfg.vocab_size, cfg.n_positions - new_tokens - 1)
    return decode_row(p, prompts, new_tokens, repeats, bandwidth)


def measure_context(p: Provider, context: int, new_tokens: int, repeats: int, bandwidth: float) -> dict:
    """Batch 1 decode after a ``context``-token prompt (capped so ``new_tokens`` more still fit)."""
    cfg = p.llm.config
    prompt = random_prompt(min(context, cfg.n_positions - new_tokens - 1), cfg.vocab_size, seed=context)
    row = decode_row(p, [prompt], new_tokens, repeats, bandwidth)
    keep = ("provider", "backend", "dtype", "batch", "context", "new_tokens", "decode_ms", "tok_s", "spread_pct",
            "floor_ms", "achieved_gbs", "pct_of_floor")
    return {key: row[key] for key in keep}


def decode_row(p: Provider, prompts: list[list[int]], new_tokens: int, repeats: int, bandwidth: float) -> dict:
    """Generate 1 and 1 + ``new_tokens`` tokens for ``prompts``; the difference over ``new_tokens`` is a step."""
    device = p.llm.device
    p.generate(prompts, 2)  # warm-up: every shape of a prefill and a decode step
    reset_peak_memory(device)
    first = timings(lambda: p.generate(prompts, 1), repeats, device)
    total = timings(lambda: p.generate(prompts, 1 + new_tokens), repeats, device)
    step_s = (statistics.median(total) - statistics.median(first)) / new_tokens
    if step_s <= 0:
        raise ValueError(f"{p.name} at batch {len(prompts)}: {new_tokens} decode steps took no measurable time over "
                         "timing noise; raise --decode-tokens or --repeats")
    contexts = [len(prompt) + new_tokens / 2 for prompt in prompts]  # the mean position each sequence decodes at
    moved = decode_bytes(p.llm, contexts)
    return dict(provider=p.name, backend=p.backend, dtype=p.dtype, batch=len(prompts),
                prompt_lens=sorted(set(map(len, prompts))), context=statistics.mean(contexts), new_tokens=new_tokens,
                ttft_ms=statistics.median(first) * 1e3,
                decode_ms=step_s * 1e3, tok_s=len(prompts) / step_s, spread_pct=spread_pct(total),
                floor_ms=moved / bandwidth * 1e3, achieved_gbs=moved / step_s / 1e9,
                pct_of_floor=100 * moved / bandwidth / step_s, peak_mem_mb=peak_memory_mb(device))


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
            tiny.append(ours(LLM(OVERHEAD_MODEL, backend=p.backend, dtype=p.dtype, device=p.llm.device,
                                 max_num_seqs=max_batch), timed=True))
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
    logits = p.llm.logits(ref.ids).float()
    tol = TOLERANCES[p.dtype]
    err = (logits - ref.logits).abs().max().item()
    ppl = perplexity(logits, ref.ids)
    until, total = agreement(greedy_tokens(p.llm, ref.prefix, len(ref.greedy)), ref.greedy)
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
            f"{meta['threads']} torch threads, load average {meta['load_avg_1m']:.1f} at start; "
            f"copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s (read + write); "
            f"torch {meta['torch']}, "
            f"transformers {meta['transformers']}; peak memory = {meta['peak_mem_kind']}")


SECTIONS = [("Decode (batches mix prompt lengths; floor = bytes a step must move / copy bandwidth)", "decode",
             DECODE_COLUMNS),
            ("Decode time vs context (batch 1)", "context", CONTEXT_COLUMNS),
            ("Prefill (batch 1, one new token)", "prefill", PREFILL_COLUMNS),
            (f"Runtime overhead per decode step on {OVERHEAD_MODEL} (step - model forward, host time)", "overhead",
             OVERHEAD_COLUMNS),
            ("Kernel launches per eager decode step (target <= 5 per layer + 3)", "launches", LAUNCH_COLUMNS),
            ("Accuracy vs the fp32 reference (backend reference, float32) on the pydoc_data.topics text", "accuracy",
             ACCURACY_COLUMNS)]


def print_report(result: dict) -> None:
    print(headline(result["meta"]))
    for title, key, columns in SECTIONS:
        if result[key]:
            print(f"\n{title}\n{text_table(result[key], columns)}")
    for note in result["meta"]["skipped"]:
        print(f"skipped: {note}")


def markdown_report(result: dict) -> str:
    meta = result["meta"]
    parts = [f"# gpt2fast bench: {meta['model']}", "", headline(meta), "",
             f"Tolerances (vs fp32 reference): {json.dumps(meta['tolerances'])}. Wall time {meta['wall_s']:.0f} s."]
    for title, key, columns in SECTIONS:
        if result[key]:
            parts += ["", f"## {title}", "", markdown_table(result[key], columns)]
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
    parser.add_argument("--baselines", nargs="*", choices=["hf", "hf-static"], help="default: hf hf-static (quick: hf)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="decode batch sizes (default 1 8 64; quick 1 8)")
    parser.add_argument("--prompt-lens", nargs="+", type=int, help="prefill lengths (default 32 128 512 1024; "
                        "quick 32)")
    parser.add_argument("--contexts", nargs="+", type=int, help="batch-1 decode after prompts this long (default "
                        "32 128 512 1024; quick 32 256; capped to leave room for the decoded tokens)")
    parser.add_argument("--decode-tokens", type=int, help="N in (t(1+N) - t(1)) / N (default 32; quick 8)")
    parser.add_argument("--repeats", type=int, help="timed runs per number (default 5; quick 3)")
    parser.add_argument("--greedy-tokens", type=int, help="greedy agreement length (default 256; quick 32)")
    parser.add_argument("--ppl-tokens", type=int, help="tokens of the fixed text (default 1024; quick 256)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; quick: 1, which "
                        "keeps OpenMP threads from spinning against other processes)")
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
    return args


def load_providers(args: argparse.Namespace, skipped: list[str]) -> list[Provider]:
    """One gpt2fast provider per distinct (resolved backend, dtype); requests that cannot run are skipped."""
    providers: dict[str, Provider] = {}
    for dtype in args.dtypes:
        for backend in args.backends:
            try:
                llm = LLM(args.model, backend=backend, dtype=dtype, device=args.device,
                          max_num_seqs=max(args.batch_sizes))
            except (ValueError, RuntimeError) as e:
                if backend == "auto" or len(args.backends) == 1:
                    raise
                skipped.append(f"backend {backend} / {dtype}: {e}")
                continue
            p = ours(llm)
            providers.setdefault(p.name, p)
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


def baselines(args: argparse.Namespace, llm: LLM, skipped: list[str]) -> list[Provider]:
    """The HF baselines ``args`` asks for; without transformers none, and ``skipped`` says how to add them."""
    if transformers_missing() is not None:
        skipped.append(f"the HF baselines ({', '.join(args.baselines) or 'none asked for'}) and the 'max|diff| vs "
                       f"hf' accuracy column: transformers is not installed; {HF_INSTALL}")
        return []
    return [hf_provider(llm, static=name == "hf-static") for name in args.baselines]


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
    first = ours_[0].llm
    bandwidth = copy_bandwidth(first.device)
    providers = ours_ + baselines(args, first, skipped)
    lens = [n for n in args.prompt_lens if n <= first.config.n_positions]  # a full-context prompt still yields 1 token
    skipped += [f"prompt length {n}: beyond the context ({first.config.n_positions})"
                for n in args.prompt_lens if n not in lens]
    decode = [measure_decode(p, b, args.decode_tokens, args.repeats, bandwidth)
              for p in providers for b in args.batch_sizes]
    context = [measure_context(p, n, args.decode_tokens, args.repeats, bandwidth)
               for p in providers for n in args.contexts]
    prefill = [measure_prefill(p, n, args.repeats) for p in providers for n in lens]
    overhead = [measure_overhead(p, b, args.decode_tokens, args.repeats)
                for p in overhead_providers(providers, max(args.batch_sizes)) for b in args.batch_sizes]
    launches = [launch_row(p, skipped) for p in ours_]
    ref = make_reference(reference_llm(args, ours_), args.ppl_tokens, args.greedy_tokens)
    accuracy = [measure_accuracy(p, ref) for p in ours_]
    meta = machine_meta(args, first, bandwidth) | dict(
        load_avg_1m=load, dtypes=sorted({p.dtype for p in ours_}), skipped=skipped,
        wall_s=time.perf_counter() - started)
    add_ratio_to_hf(decode, "decode_ms", ("batch",))
    add_ratio_to_hf(overhead, "overhead_us", ("batch",))
    return dict(meta=meta, decode=decode, context=context, prefill=prefill, overhead=overhead,
                launches=[row for row in launches if row], accuracy=accuracy)


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
