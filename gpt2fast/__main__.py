"""``python -m gpt2fast`` is the ``gpt2fast`` command."""

from gpt2fast.cli import main

raise SystemExit(main())
