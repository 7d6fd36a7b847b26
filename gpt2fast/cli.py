"""The ``gpt2fast`` command line, with the knobs of OpenAI's original GPT-2 sampling scripts.

Example:
    gpt2fast generate --model random:gpt2 --prompt "Hello" --length 20 --temperature 0.8 --top-k 40 --seed 1
    gpt2fast generate --model gpt2 --nsamples 4 --batch-size 2 --unconditional
    gpt2fast generate --model gpt2                 # interactive: "Model prompt >>> "
    printf 'Hello\nThe dog\n' | gpt2fast generate --model gpt2 --length 20   # a pipe: one prompt per line
    gpt2fast bench --model random:gpt2 --quick     # speed, floor and accuracy tables (gpt2fast.bench)
    gpt2fast attention --model gpt2 --text "The dog on the ship ran" --out attn.html   # gpt2fast.viz.cli
    gpt2fast explore --model gpt2                  # next-token explorer page (gpt2fast.viz.explore)
    gpt2fast serve --model gpt2 --port 8000        # OpenAI-compatible server (gpt2fast.server)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace

from gpt2fast.errors import CheckpointError
from gpt2fast.ops import BACKENDS
from gpt2fast.outputs import GenerationError
from gpt2fast.quant import QUANTIZATIONS

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
    source.add_argument("--prompt", help="text to complete (without a prompt option: ask interactively, or "
                        "read prompts from a pipe, one per line; stdin that gives none is an error)")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    source.add_argument("--unconditional", action="store_true", help="sample from <|endoftext|>")
    gen.add_argument("--max-tokens", "--length", dest="max_tokens", type=int, default=50, help="tokens per sample")
    gen.add_argument("--nsamples", type=int, default=1, help="samples per prompt")
    gen.add_argument("--batch-size", type=int, default=None, help="samples run at once (default: all)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off; 40 is GPT-2's classic value")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    gen.add_argument("--seed", type=int, default=None, help="same seed, same samples, whatever --batch-size "
                     "(sample 1 is LLM.generate's with SamplingParams(seed=SEED))")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (one sample)")
    gen.add_argument("--backend", default=None, choices=BACKENDS)
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    gen.add_argument("--quantization", default="none", choices=["none", *QUANTIZATIONS],
                     help="int8: weight-only int8, quantized as it loads (cpu, torch backends)")
    gen.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                     help="run decode steps eagerly on CUDA (default: one CUDA graph per batch-size bucket)")
    # Only listed here: these are handed whole to their module's main (see SUBCOMMANDS and main below).
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text)
    return parser


def generate(args: argparse.Namespace) -> None:
    """``gpt2fast generate``: one prompt, a file, unconditional samples, or an interactive loop."""
    from gpt2fast.engine import LLM

    rounds = sample_rounds(args)
    if args.stream and args.nsamples != 1:
        raise ValueError("--stream prints one sample as it is generated; use it without --nsamples")
    check_device_and_backend(args)
    prompt_text = args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt_text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --prompt-file: {e}") from None
    piped = None
    if not args.unconditional and prompt_text is None and not _stdin_is_terminal():
        piped = _piped_lines()  # read before loading the model: no prompt is an error, found at once
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device, max_num_seqs=len(rounds[0]),
              cuda_graphs=args.cuda_graphs, quantization=args.quantization)
    if llm.is_random:
        print(f"gpt2fast: warning: {args.model} has random weights: it produces gibberish. "
              "Pass real weights (a Hub id, a Hugging Face or OpenAI folder) for real text.", file=sys.stderr)
    if args.unconditional:
        _complete(llm, "", rounds, args.stream)
    elif prompt_text is not None:
        _complete(llm, prompt_text, rounds, args.stream)
    else:
        _interactive(llm, rounds, args.stream, piped)


# Weyl increment (2**64 / golden ratio, odd): sample k's seed is seed + k * this mod 2**64, as SplitMix64 steps.
_SAMPLE_SEED_STEP = 0x9E3779B97F4A7C15


def sample_seed(seed: int, number: int) -> int:
    """The seed of sample ``number`` (0-based) of a run seeded ``seed``: fixed by the two, not by the batching.

    Sample 0 keeps ``seed`` itself, so a one-sample run equals ``LLM.generate`` with ``SamplingParams(seed=seed)``.

    Example:
        >>> sample_seed(7, 0), sample_seed(7, 1) != sample_seed(8, 0), 0 <= sample_seed(2**64 - 1, 3) < 2**64
        (7, True, True)
    """
    return (seed + number * _SAMPLE_SEED_STEP) % 2**64


def sample_rounds(args: argparse.Namespace) -> list[list]:
    """One list of per-sample ``SamplingParams`` per batch; a bad value raises ValueError.

    Every sample is its own one-sample request seeded ``sample_seed(--seed, sample number)``, so a seeded run
    prints the same samples whatever ``--batch-size`` is (rounds of ``n`` samples would repeat their seeds).

    Example:
        >>> args = build_parser().parse_args(["generate", "--model", "m", "--nsamples", "4", "--batch-size", "2"])
        >>> [len(batch) for batch in sample_rounds(args)]
        [2, 2]
    """
    from gpt2fast.sampling import SamplingParams

    if args.nsamples < 1:
        raise ValueError(f"--nsamples must be a positive integer, got {args.nsamples}")
    batch_size = args.batch_size if args.batch_size is not None else args.nsamples
    if not 1 <= batch_size <= args.nsamples or args.nsamples % batch_size:
        raise ValueError(f"--batch-size must divide --nsamples ({args.nsamples}), got {batch_size}")
    base = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)  # its ValueError names fields: main names the flags
    seeds = [None if args.seed is None else sample_seed(args.seed, k) for k in range(args.nsamples)]
    params = [replace(base, seed=seed) for seed in seeds]
    return [params[start:start + batch_size] for start in range(0, args.nsamples, batch_size)]


def check_device_and_backend(args: argparse.Namespace) -> None:
    """Fail before loading any weights when ``--device``, ``--backend`` or ``--quantization`` cannot run here.

    Example:
        >>> check_device_and_backend(build_parser().parse_args(["generate", "--model", "m", "--device", "cpu"]))
    """
    from gpt2fast.engine import resolve_device
    from gpt2fast.ops import check_quantization_support, default_backend, get_ops
    from gpt2fast.quant import check_quantization

    ops = get_ops(args.backend or default_backend(), resolve_device(args.device))
    check_quantization_support(ops, check_quantization(args.quantization))


# How the library names what a generate flag sets (its messages are for Python callers): message text -> flag.
FLAG_NAMES = {
    "SamplingParams.max_tokens": "--max-tokens/--length",
    "SamplingParams.temperature": "--temperature",
    "SamplingParams.top_k": "--top-k",
    "SamplingParams.top_p": "--top-p",
    "SamplingParams.seed": "--seed",
    "device='cpu'": "--device cpu",
    "device '": "--device '",
    "backend 'triton' needs": "--backend triton needs",
    "backend 'cuda'": "--backend cuda",
}


def name_flags(message: str, names: dict[str, str] = FLAG_NAMES) -> str:
    """``message`` with the library's names of things replaced by the flags that set them (idempotent).

    Example:
        >>> name_flags("SamplingParams.top_p must be in (0, 1], got 0")
        '--top-p must be in (0, 1], got 0'
    """
    for name, flag in names.items():
        message = re.sub(r"(?<![\w-])" + re.escape(name), flag, message)  # not inside a name, nor a flag already
    return message


def _stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _piped_lines() -> Iterator[str]:
    """The lines of a non-terminal stdin, each a prompt as if typed, read as they come.

    Reads up to the first non-empty line now, so that stdin giving no prompt at all (empty, /dev/null, closed,
    blank lines only) is a ValueError before any weights load.
    """
    head: list[str] = []
    while not head or not head[-1]:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            raise ValueError("no prompt: stdin is not a terminal and gave no text; pass --prompt TEXT, --prompt-file "
                             "FILE or --unconditional, or pipe prompts on stdin (one per line)")
        head.append(line.removesuffix("\n"))
    return itertools.chain(head, (line.removesuffix("\n") for line in iter(sys.stdin.readline, "")))


def _next_piped(lines: Iterator[str]) -> str:
    """``input(INTERACTIVE_PROMPT)`` over piped lines: the prompt is shown as ``input`` shows it."""
    print(INTERACTIVE_PROMPT, end="", flush=True)
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


def _complete(llm, prompt: str, rounds: list[list], stream: bool) -> None:
    if stream:
        print(prompt, end="", flush=True)
        for piece in llm.stream(prompt, rounds[0][0]):
            print(piece, end="", flush=True)
        print()
        return
    samples = [out.outputs[0] for batch in rounds for out in llm.generate([prompt] * len(batch), batch)]
    if len(samples) == 1:
        print(prompt + samples[0].text)
        return
    for number, sample in enumerate(samples, 1):
        print(f"{SEPARATOR} SAMPLE {number} {SEPARATOR}")
        print(prompt + sample.text)
    print(SEPARATOR * 2)


def _interactive(llm, rounds: list[list], stream: bool, piped: Iterator[str] | None = None) -> None:
    """Ask for prompts until end of input, like OpenAI's interactive_conditional_samples.py.

    ``piped``: the lines of a non-terminal stdin (``_piped_lines``), taken as if typed.
    """
    while True:
        try:
            prompt = input(INTERACTIVE_PROMPT) if piped is None else _next_piped(piped)
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
    return exit_status("gpt2fast", lambda: generate(args), FLAG_NAMES)


def exit_status(prog: str, action: Callable[[], object], flags: dict[str, str] | None = None) -> int:
    """Run a command's ``action``: 0; 2 with one line ``PROG: error: ...`` for bad input; 1 with one line when a
    request failed at run time (``GenerationError``); 130 on Ctrl-C.

    ``flags``: the library's names in the message -> the command's flags (see ``name_flags``).

    Example:
        >>> exit_status("demo", lambda: int("x"))
        2
    """
    try:
        action()
    except (ValueError, CheckpointError) as e:
        print(f"{prog}: error: {name_flags(str(e), flags) if flags else e}", file=sys.stderr)
        return 2
    except GenerationError as e:  # the input was fine; the model's numbers were not (its logits went non-finite)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
