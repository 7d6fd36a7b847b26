"""Prefill and decode speed of gpt2fast vs Hugging Face transformers, side by side, with the floor.

Both run the same weights in the same process. Decode time per token is
``(t(generate 1 + N tokens) - t(generate 1 token)) / N``, median over repeats, so prefill and
setup cancel. The floor is the bytes a decode step must read (every weight once, the LM head
included, plus the KV cache at that context) divided by the machine's copy bandwidth, measured
at start. Accuracy beside speed: max |logits - HF fp32 logits| over the prompt.

Run: python benchmarks/bench_generate.py --model random:gpt2 --prompt-len 32 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from gpt2fast import LLM, SamplingParams
from gpt2fast.checkpoint.layout import is_transposed


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decode_bytes(llm: LLM, context: int) -> int:
    """Bytes one decode step must read: all weights but the position table, plus K and V up to ``context``."""
    cfg, size = llm.config, llm.dtype.itemsize
    weights = sum(p.numel() for name, p in llm.model.named_parameters() if name != "wpe.weight")
    return size * (weights + 2 * cfg.n_layer * context * cfg.n_embd)


def hf_twin(llm: LLM):
    """A transformers GPT2LMHeadModel holding exactly ``llm``'s weights."""
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
    return hf.to(llm.device, llm.dtype).eval()


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(generate, tokens: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(prefill + first token seconds, seconds per decoded token)."""
    generate(2)  # warm-up
    first = median_seconds(lambda: generate(1), repeats, device)
    total = median_seconds(lambda: generate(1 + tokens), repeats, device)
    return first, (total - first) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args()

    llm = LLM(args.model)
    prompt = torch.randint(0, llm.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    hf = hf_twin(llm)
    bandwidth = copy_bandwidth(llm.device)
    floor_s = decode_bytes(llm, args.prompt_len + args.tokens // 2) / bandwidth

    def ours(n: int) -> None:
        llm.generate(prompt.tolist(), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    def theirs(n: int) -> None:
        with torch.no_grad():
            hf.generate(prompt[None].to(llm.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0,
                        attention_mask=torch.ones(1, args.prompt_len, dtype=torch.long, device=llm.device))

    with torch.no_grad():
        reference = hf(prompt[None].to(llm.device)).logits[0].float()
    rows = []
    for name, generate in [(f"gpt2fast[{llm.backend}]", ours), ("hf", theirs)]:
        prefill_s, token_s = measure(generate, args.tokens, args.repeats, llm.device)
        rows.append(dict(provider=name, prefill_ms=prefill_s * 1e3, decode_ms=token_s * 1e3, tok_s=1 / token_s,
                         pct_of_floor=100 * floor_s / token_s))
    rows[0]["max_abs_logit_diff_vs_hf"] = float((llm.logits(prompt.tolist()) - reference).abs().max())

    print(f"{args.model} on {llm.device} {llm.dtype}, prompt {args.prompt_len}, {args.tokens} decode tokens, "
          f"batch 1; copy bandwidth {bandwidth / 1e9:.1f} GB/s -> decode floor {floor_s * 1e3:.2f} ms/token")
    print(f"{'provider':<18}{'prefill ms':>12}{'decode ms/tok':>15}{'tok/s':>9}{'% of floor':>12}")
    for r in rows:
        print(f"{r['provider']:<18}{r['prefill_ms']:>12.2f}{r['decode_ms']:>15.2f}{r['tok_s']:>9.1f}"
              f"{r['pct_of_floor']:>11.1f}%")
    ratio = rows[1]["decode_ms"] / rows[0]["decode_ms"]
    print(f"decode speed-up vs hf: {ratio:.2f}x; max |logits - hf| = {rows[0]['max_abs_logit_diff_vs_hf']:.2e}")
    if args.json:
        meta = dict(model=args.model, device=str(llm.device), dtype=str(llm.dtype), torch=torch.__version__,
                    machine=platform.machine(), bandwidth_gbs=bandwidth / 1e9, floor_ms=floor_s * 1e3)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
