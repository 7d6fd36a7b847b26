"""The ``gpt2fast`` command line.

Example:
    gpt2fast generate --model random:gpt2 --prompt "Hello" --max-tokens 20 --temperature 0.8 --top-k 40 --seed 1
"""

from __future__ import annotations

import argparse
import sys

from gpt2fast.errors import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2fast", description="Fast GPT-2 inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete a prompt")
    gen.add_argument("--model", required=True, help="random:<preset>, a Hugging Face or OpenAI folder, or a Hub id")
    gen.add_argument("--prompt", default="", help="text to complete; empty = unconditional (from <|endoftext|>)")
    gen.add_argument("--max-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off; 40 is GPT-2's classic value")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"])
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def generate(args: argparse.Namespace) -> None:
    from gpt2fast.engine import LLM
    from gpt2fast.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device)
    if llm.is_random:
        print(f"gpt2fast: warning: {args.model} has random weights: it produces gibberish. "
              "Pass real weights (a Hub id, a Hugging Face or OpenAI folder) for real text.", file=sys.stderr)
    output = llm.generate(args.prompt, params)[0]
    print(args.prompt + output.outputs[0].text)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
    except (ValueError, CheckpointError) as e:
        print(f"gpt2fast: error: {e}", file=sys.stderr)
        return 2
    return 0
