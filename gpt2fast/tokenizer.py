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
GPT2_VOCAB_SIZE = 50257
# A checkpoint's own vocabulary: (token -> id JSON, BPE merges), OpenAI's names then Hugging Face's.
VOCAB_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def load_tokenizer(vocab_dir: Path | None = None) -> tiktoken.Encoding:
    """The tokenizer for a checkpoint folder (its own vocab files), or GPT-2's.

    Example:
        >>> enc = load_tokenizer()
        >>> enc.encode("Hello world"), enc.eot_token
        ([15496, 995], 50256)
    """
    files = vocab_files(vocab_dir) if vocab_dir is not None else None
    if files is not None:
        return from_vocab_files(*files)
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


def vocab_files(folder: Path) -> tuple[Path, Path] | None:
    """The folder's own (encoder, merges) vocab files, the first complete pair of ``VOCAB_PAIRS``, or None.

    Example:
        >>> vocab_files(Path("/nowhere")) is None
        True
    """
    for encoder_name, merges_name in VOCAB_PAIRS:
        if (folder / encoder_name).exists() and (folder / merges_name).exists():
            return folder / encoder_name, folder / merges_name
    return None


def from_vocab_files(encoder_path: Path, merges_path: Path) -> tiktoken.Encoding:
    """Build an Encoding from a pair of ``encoder.json``/``vocab.json`` and ``vocab.bpe``/``merges.txt``.

    Example:
        >>> enc = from_vocab_files(Path("gpt2/vocab.json"), Path("gpt2/merges.txt"))  # doctest: +SKIP
    """
    encoder = _read_encoder(encoder_path)
    if ENDOFTEXT not in encoder:
        raise CheckpointError(f"{encoder_path}: has no {ENDOFTEXT} token")
    try:
        # tiktoken caches files by path: key the cache by content too, so an edited file is re-read.
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(merges_path), str(encoder_path), _sha256(merges_path), _sha256(encoder_path)
        )
    except AssertionError:  # tiktoken's check that the merges rebuild the encoder's tokens, with no message
        raise CheckpointError(f"{encoder_path.parent}: cannot build the tokenizer from {encoder_path.name} and "
                              f"{merges_path.name} (the merges do not rebuild the encoder's tokens in id order)"
                              ) from None
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{encoder_path.parent}: cannot build the tokenizer from {encoder_path.name} and "
                              f"{merges_path.name} ({type(e).__name__}: {e})") from None
    return tiktoken.Encoding(
        name=f"gpt2:{encoder_path.parent.name}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]},
    )


def _read_encoder(path: Path) -> dict[str, int]:
    """``encoder.json``/``vocab.json``: a JSON object mapping each token to its id, or a clear error naming it."""
    from gpt2fast.checkpoint.files import read_json  # here: the checkpoint package imports this module

    encoder = read_json(path, "the vocabulary")
    if not isinstance(encoder, dict):
        raise CheckpointError(f"{path}: must be a JSON object mapping tokens to ids, got a {type(encoder).__name__}")
    bad = next(((k, v) for k, v in encoder.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise CheckpointError(f"{path}: token {bad[0][:50]!r} maps to {str(bad[1])[:50]!r}, not a token id "
                              "(a non-negative integer)")
    return encoder


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
