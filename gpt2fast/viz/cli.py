"""``gpt2fast attention``: the attention of one text as a self-contained HTML page (and PNG heat maps).

Example:
    gpt2fast attention --model gpt2 --text "The dog on the ship ran" --out attn.html
    gpt2fast attention --model gpt2 --text-file story.txt --out attn.html --view model --png attn_png/

The page is ``LLM.attention(text).save_html(out, view)`` (with ``--title``: ``render_html``): ``--view``
``all`` (tabs: head, model and query/key views), ``head``, ``model`` or ``qk``. The query and key vectors
are captured only when the view shows them (``all``, ``qk``): they add about a third to the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2fast.cli import exit_status
from gpt2fast.ops import BACKENDS
from gpt2fast.quant import QUANTIZATIONS
from gpt2fast.viz.html import VIEWS, render_html

PROG = "gpt2fast attention"
QK_VIEWS = ("all", "qk")  # the views that draw query/key vectors


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``gpt2fast attention``.

    Example:
        >>> args = build_parser().parse_args(["--model", "random:gpt2", "--text", "Hi", "--view", "model"])
        >>> args.view, args.out, args.png
        ('model', 'attention.html', None)
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Write the attention views of a text as one HTML file.")
    parser.add_argument("--model", required=True, help="random:<preset>, a Hugging Face or OpenAI folder, or a Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to look inside of")
    source.add_argument("--text-file", help="read the text from this file (UTF-8)")
    parser.add_argument("--out", default="attention.html", help="the HTML file to write (default: attention.html)")
    parser.add_argument("--view", default="all", choices=VIEWS,
                        help="all (tabs: head, model, query/key), head, model (grid of every head) or qk")
    parser.add_argument("--png", metavar="DIR", help="also write heat maps as PNGs into DIR (one per layer + overview)")
    parser.add_argument("--title", help="the page's title (default: '<model> attention')")
    parser.add_argument("--backend", default=None, choices=BACKENDS)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quantization", default="none", choices=["none", *QUANTIZATIONS],
                        help="int8: weight-only int8, quantized as it loads (cpu, torch backends)")
    return parser


def _read_text(args: argparse.Namespace) -> str:
    if args.text_file is None:
        return args.text
    try:
        return Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text-file: {e}") from None


def run(args: argparse.Namespace) -> list[Path]:
    """Capture the attention of the text and write the page (and PNGs); returns the paths written, page first.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "attn.html"
        >>> args = build_parser().parse_args(["--model", 'random:{"n_layer": 1, "n_embd": 16, "n_head": 2}',
        ...                                   "--text", "Hello world", "--out", str(out)])
        >>> paths = run(args)  # doctest: +ELLIPSIS
        wrote ...attn.html (2 tokens, 1 layers x 2 heads, view all, ... MB)
        >>> paths == [out], out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
        (True, True)
    """
    from gpt2fast.engine import LLM

    text = _read_text(args)
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device, max_num_seqs=1,
              quantization=args.quantization)
    if llm.is_random:
        print(f"{PROG}: warning: {args.model} has random weights: its attention patterns mean nothing. "
              "Pass real weights (a Hub id, a Hugging Face or OpenAI folder) for real patterns.", file=sys.stderr)
    trace = llm.attention(text, qk=args.view in QK_VIEWS)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(trace, args.view, title=args.title), encoding="utf-8")
        pngs = trace.save_png(args.png) if args.png is not None else []
    except OSError as e:
        raise ValueError(f"cannot write {e.filename or args.out}: {e.strerror or e}") from None
    size = out.stat().st_size
    print(f"wrote {out} ({len(trace.tokens)} tokens, {trace.n_layer} layers x {trace.n_head} heads, "
          f"view {args.view}, {size / 1e6:.2f} MB)")
    if pngs:
        print(f"wrote {len(pngs)} PNGs to {args.png}: {', '.join(path.name for path in pngs)}")
    return [out, *pngs]


def main(argv: list[str] | None = None) -> int:
    """``gpt2fast attention ARGS``; returns the exit status: 0, or 2 with a one-line message for bad input.

    Example:
        >>> main(["--model", "/no/such/folder", "--text", "hi"])
        2
    """
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse has printed usage and the error (or --help)
        return e.code if isinstance(e.code, int) else 2
    return exit_status(PROG, lambda: run(args))
