"""GPT-2's byte-level BPE as a tiktoken ``Encoding``.

Where the ranks come from, first hit wins:
1. the checkpoint's own vocab files: ``encoder.json`` + ``vocab.bpe`` (OpenAI) or ``vocab.json`` +
   ``merges.txt`` (Hugging Face) — the same two formats, read by tiktoken's own loader;
2. the copy of GPT-2's ranks shipped in ``gpt2fast/data`` (works offline);
3. tiktoken's ``gpt2`` encoding (its cache, or the internet);
4. the ``gpt2.tiktoken`` file that ``openai-whisper`` ships;
otherwise a clear error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2fast.errors import CheckpointError

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# GPT-2's pre-tokenisation regex, as tiktoken writes it.
GPT2_PATTERN = r50k_pat_str
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
PACKAGED_RANKS = Path(__file__).parent / "data" / "gpt2.tiktoken"
_VOCAB_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def load_tokenizer(vocab_dir: Path | None = None) -> tiktoken.Encoding:
    """The tokenizer for a checkpoint folder (its own vocab files), or GPT-2's.

    Example:
        >>> enc = load_tokenizer()
        >>> enc.encode("Hello world"), enc.eot_token
        ([15496, 995], 50256)
    """
    if vocab_dir is not None:
        for encoder_name, merges_name in _VOCAB_PAIRS:
            if (vocab_dir / encoder_name).exists() and (vocab_dir / merges_name).exists():
                return from_vocab_files(vocab_dir / encoder_name, vocab_dir / merges_name)
    sources: list[tuple[str, Callable[[], tiktoken.Encoding | None]]] = [
        ("the copy shipped with gpt2fast", lambda: _from_tiktoken_file(PACKAGED_RANKS)),
        ("tiktoken's gpt2 encoding (cache or internet)", lambda: tiktoken.get_encoding("gpt2")),
        ("openai-whisper's gpt2.tiktoken", lambda: _from_tiktoken_file(whisper_ranks_path())),
    ]
    failures = []
    for description, make in sources:
        try:
            encoding = make()
        except Exception as e:  # network, cache and file errors all mean "try the next source"
            failures.append(f"{description}: {type(e).__name__}: {e}")
            continue
        if encoding is not None:
            return encoding
        failures.append(f"{description}: not found")
    raise CheckpointError(
        "cannot find GPT-2's BPE vocabulary; tried " + "; ".join(failures) + ". Reinstall gpt2fast, or pass a "
        "checkpoint folder with encoder.json + vocab.bpe (or vocab.json + merges.txt)."
    )


def from_vocab_files(encoder_path: Path, merges_path: Path) -> tiktoken.Encoding:
    """Build an Encoding from a pair of ``encoder.json``/``vocab.json`` and ``vocab.bpe``/``merges.txt``.

    Example:
        >>> enc = from_vocab_files(Path("gpt2/vocab.json"), Path("gpt2/merges.txt"))  # doctest: +SKIP
    """
    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
        # tiktoken caches files by path: key the cache by content too, so an edited file is re-read.
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(merges_path), str(encoder_path), _sha256(merges_path), _sha256(encoder_path)
        )
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"{encoder_path.parent}: cannot build the tokenizer from {encoder_path.name} and "
                              f"{merges_path.name} ({type(e).__name__}: {e})") from None
    if ENDOFTEXT not in encoder:
        raise CheckpointError(f"{encoder_path}: has no {ENDOFTEXT} token")
    return tiktoken.Encoding(
        name=f"gpt2:{encoder_path.parent.name}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]},
    )


def whisper_ranks_path() -> Path | None:
    """Where ``openai-whisper`` keeps GPT-2's ranks, found without importing whisper (it imports torch)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    return path if path.exists() else None


def _from_tiktoken_file(path: Path | None) -> tiktoken.Encoding | None:
    if path is None or not path.exists():
        return None
    ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: GPT2_EOT_ID}
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
