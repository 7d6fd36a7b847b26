"""The ``gpt2fast`` command line, with the knobs of OpenAI's original GPT-2 sampling scripts.

Example:
    gpt2fast generate --model random:gpt2 --prompt "Hello" --length 20 --temperature 0.8 --top-k 40 --seed 1
    gpt2fast generate --model gpt2 --nsamples 4 --batch-size 2 --unconditional
    gpt2fast generate --model gpt2                 # interactive: "Model prompt >>> "
    gpt2fast bench --model random:gpt2 --quick     # speed, floor and accuracy tables (gpt2fast.bench)
    gpt2fast attention --model gpt2 --text "The dog on the ship ran" --out attn.html   # gpt2fast.viz.cli
    gpt2fast explore --model gpt2                  # next-token explorer page (gpt2fast.viz.explore)
    gpt2fast serve --model gpt2 --port 8000        # OpenAI-compatible server (gpt2fast.server)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from gpt2fast.errors import CheckpointError
from gpt2fast.ops import BACKENDS

INTERACTIVE_PROMPT = "Model prompt >>> "
# Subcommands with their own parser: `gpt2fast NAME ARGS...` calls MODULE.main(ARGS) and exits with its status.
SUBCOMMANDS = {
    "bench": ("gpt2fast.bench", "speed, memory-bandwidth floor and accuracy per backend (bench --help)"),
    "attention": ("gpt2fast.viz.cli", "write the attention views of a text as one HTML file (and PNGs)"),
    "explore": ("gpt2fast.viz.explore", "serve a local page: top-10 next tokens, click to extend, head view"),
    "serve": ("gpt2fast.server", "OpenAI-compatible HTTP server (/v1/completions) on the engine"),
}
SEPARATOR = "=" * 40


def build_parser() -> argparse.ArgumentParser:
    """Arguments of every subcommand.

    Example:
        >>> build_parser().parse_args(["generate", "--model", "random:gpt2", "--length", "5"]).max_tokens
        5
    """
    parser = argparse.ArgumentParser(prog="gpt2fast", description="Fast GPT-2 inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete prompts, or sample unconditionally")
    gen.add_argument("--model", required=True, help="random:<preset>, a Hugging Face or OpenAI folder, or a Hub id")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text to complete (without --prompt: ask interactively)")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    source.add_argument("--unconditional", action="store_true", help="sample from <|endoftext|>")
    gen.add_argument("--max-tokens", "--length", dest="max_tokens", type=int, default=50, help="tokens per sample")
    gen.add_argument("--nsamples", type=int, default=1, help="samples per prompt")
    gen.add_argument("--batch-size", type=int, default=None, help="samples run at once (default: all)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off; 40 is GPT-2's classic value")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (one sample)")
    gen.add_argument("--backend", default=None, choices=BACKENDS)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    gen.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                     help="run decode steps eagerly on CUDA (default: one CUDA graph per batch-size bucket)")
    # Only listed here: these are handed whole to their module's main (see SUBCOMMANDS and main below).
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text)
    return parser


def generate(args: argparse.Namespace) -> None:
    """``gpt2fast generate``: one prompt, a file, unconditional samples, or an interactive loop."""
    from gpt2fast.engine import LLM
    from gpt2fast.sampling import SamplingParams

    batch_size = args.batch_size if args.batch_size is not None else args.nsamples
    if not 1 <= batch_size <= args.nsamples or args.nsamples % batch_size:
        raise ValueError(f"--batch-size must divide --nsamples ({args.nsamples}), got {batch_size}")
    # One round per batch, as OpenAI's scripts do; a seeded run gives round r the seed seed + r.
    rounds = [
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=None if args.seed is None else args.seed + r, n=batch_size)
        for r in range(args.nsamples // batch_size)
    ]
    if args.stream and args.nsamples != 1:
        raise ValueError("--stream prints one sample as it is generated; use it without --nsamples")
    prompt_text = args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt_text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file: {e}") from None
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device, max_num_seqs=batch_size,
              cuda_graphs=args.cuda_graphs)
    if llm.is_random:
        print(f"gpt2fast: warning: {args.model} has random weights: it produces gibberish. "
              "Pass real weights (a Hub id, a Hugging Face or OpenAI folder) for real text.", file=sys.stderr)
    if args.unconditional:
        _complete(llm, "", rounds, args.stream)
    elif prompt_text is not None:
        _complete(llm, prompt_text, rounds, args.stream)
    else:
        _interactive(llm, rounds, args.stream)


def _complete(llm, prompt: str, rounds: list, stream: bool) -> None:
    if stream:
        print(prompt, end="", flush=True)
        for piece in llm.stream(prompt, rounds[0]):
            print(piece, end="", flush=True)
        print()
        return
    samples = [s for params in rounds for s in llm.generate(prompt, params)[0].outputs]
    if len(samples) == 1:
        print(prompt + samples[0].text)
        return
    for number, sample in enumerate(samples, 1):
        print(f"{SEPARATOR} SAMPLE {number} {SEPARATOR}")
        print(prompt + sample.text)
    print(SEPARATOR * 2)


def _interactive(llm, rounds: list, stream: bool) -> None:
    """Ask for prompts until end of input, like OpenAI's interactive_conditional_samples.py."""
    while True:
        try:
            prompt = input(INTERACTIVE_PROMPT)
        except EOFError:
            print()
            return
        if not prompt:
            print("Prompt should not be empty!")
            continue
        try:
            _complete(llm, prompt, rounds, stream)
        except ValueError as e:  # one bad prompt does not end the session
            print(f"gpt2fast: error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for bad input).

    Example:
        >>> main(["generate", "--model", "/no/such/folder", "--prompt", "hi"])
        2
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        return module.main(argv[1:])
    args = build_parser().parse_args(argv)
    return exit_status("gpt2fast", lambda: generate(args))


def exit_status(prog: str, action: Callable[[], object]) -> int:
    """Run a command's ``action``: 0; 2 with one line ``PROG: error: ...`` for bad input; 130 on Ctrl-C.

    Example:
        >>> exit_status("demo", lambda: int("x"))
        2
    """
    try:
        action()
    except (ValueError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
