"""Prefill, decode, the memory-bandwidth floor and accuracy of gpt2fast vs transformers: ``gpt2fast bench``.

The same code as the ``gpt2fast bench`` command (``gpt2fast/bench.py``; its docstring defines every
number and the JSON schema). See benchmarks/README.md for how to read the tables.

Run: python benchmarks/bench_generate.py --model random:gpt2 --quick [--out bench-results]
"""

from gpt2fast.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
