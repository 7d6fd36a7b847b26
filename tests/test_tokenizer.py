"""GPT-2's BPE through tiktoken: known ids, Unicode round trips, every source of the ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiktoken

from gpt2fast import tokenizer as tok
from gpt2fast.errors import CheckpointError

OPENAI_TINY = Path(__file__).parent / "data" / "openai-tiny"
ODD_TEXTS = [
    "Hello world",
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 and skin tones 👍🏽",
    "combining: e\u0301 a\u0308 and zero-width\u200bspace",
    "RTL: שלום עולם مرحبا",
    "tabs\tand\nnewlines\r\n  and   spaces ",
    "<|endoftext|> is special only when allowed",
    "\x00\x01 control bytes \x7f",
    "",
]


@pytest.fixture(scope="module")
def gpt2() -> tiktoken.Encoding:
    return tok.load_tokenizer()


def test_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eot_token == 50256 and gpt2.n_vocab == 50257
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    # A rare word splits into pieces, as the source articles show ("Vig" -> "V" + "ig").
    assert [gpt2.decode([t]) for t in gpt2.encode(" Vig")] != [" Vig"]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip(gpt2, text):
    ids = gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text
    assert all(0 <= t < 50256 for t in ids)


def test_packaged_ranks_are_gpt2s_exact_bpe():
    """The shipped ranks are byte-identical to openai-whisper's copy of GPT-2's BPE."""
    whisper_copy = tok.whisper_ranks_path()
    assert whisper_copy is not None, "openai-whisper is a test dependency"
    assert tok.PACKAGED_RANKS.read_bytes() == whisper_copy.read_bytes()


def test_vocab_files_of_a_checkpoint(tmp_path):
    """encoder.json + vocab.bpe (OpenAI) and vocab.json + merges.txt (HF) give the same tokenizer."""
    openai = tok.load_tokenizer(OPENAI_TINY)
    shutil.copy(OPENAI_TINY / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(OPENAI_TINY / "vocab.bpe", tmp_path / "merges.txt")
    hf = tok.load_tokenizer(tmp_path)
    text = "the theory of the thing"
    assert openai.encode(text) == hf.encode(text)
    assert openai.n_vocab == hf.n_vocab == 300 and openai.eot_token == 299
    assert openai.decode(openai.encode(text)) == text


def test_inconsistent_vocab_files(tmp_path):
    shutil.copy(OPENAI_TINY / "encoder.json", tmp_path / "encoder.json")
    lines = (OPENAI_TINY / "vocab.bpe").read_text().splitlines()
    (tmp_path / "vocab.bpe").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one merge missing
    with pytest.raises(CheckpointError, match="cannot build the tokenizer from encoder.json and vocab.bpe"):
        tok.load_tokenizer(tmp_path)


def _no_tiktoken_cache(name):
    raise ConnectionError("offline and not cached")


def test_falls_back_to_whisper_when_the_packaged_copy_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(tok, "PACKAGED_RANKS", tmp_path / "missing.tiktoken")
    monkeypatch.setattr(tok.tiktoken, "get_encoding", _no_tiktoken_cache)
    assert tok.load_tokenizer().encode("Hello world") == [15496, 995]


def test_clear_error_when_no_source_has_the_ranks(monkeypatch, tmp_path):
    monkeypatch.setattr(tok, "PACKAGED_RANKS", tmp_path / "missing.tiktoken")
    monkeypatch.setattr(tok.tiktoken, "get_encoding", _no_tiktoken_cache)
    monkeypatch.setattr(tok, "whisper_ranks_path", lambda: None)
    with pytest.raises(CheckpointError, match="cannot find GPT-2's BPE vocabulary.*ConnectionError"):
        tok.load_tokenizer()


# ---- issue 13: an encoder.json that is not a token -> id object gets a clear error naming it ----

BAD_ENCODERS = [
    (b"[" * 100_000, r"cannot read the vocabulary \(JSON nested too deeply\)"),
    (b'["!", "\\""]', "must be a JSON object mapping tokens to ids, got a list"),
    (b'{"!": "0", "<|endoftext|>": "1"}', r"token '!' maps to '0', not a token id \(a non-negative integer\)"),
    (b'{"!": 0, "<|endoftext|>": true}', r"token '<\|endoftext\|>' maps to 'True', not a token id"),
    (b'{"caf\xe9": 0}', r"cannot read the vocabulary \(not UTF-8: byte 0xe9"),
]


@pytest.mark.parametrize("content, message", BAD_ENCODERS)
def test_bad_encoder_json_names_the_file(tmp_path, content, message):
    shutil.copy(OPENAI_TINY / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'encoder.json'}: {message}"):
        tok.load_tokenizer(tmp_path)


def test_encoder_and_merges_that_disagree_say_so(tmp_path):
    """tiktoken's own check is a bare assert: the error says what it means."""
    encoder = json.loads((OPENAI_TINY / "encoder.json").read_text())
    first, second = list(encoder)[:2]
    encoder[first], encoder[second] = encoder[second], encoder[first]  # two ids swapped
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    shutil.copy(OPENAI_TINY / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(CheckpointError, match=r"encoder.json and vocab.bpe \(the merges do not rebuild the encoder's "
                                              r"tokens in id order\)$"):
        tok.load_tokenizer(tmp_path)
