"""Generate tests/data/openai-tiny/: a tiny GPT-2 checkpoint in OpenAI's release layout, written by TensorFlow.

Run once by hand, not in CI. TensorFlow must live in its own venv, never in the project's::

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    .venv/bin/python tests/data/make_openai_fixture.py --tf-python /tmp/tfvenv/bin/python

The project's venv does everything except saving: random tensors (fixed seed) with OpenAI's variable names and
shapes from gpt-2's ``src/model.py``, ``hparams.json``, and a 300-token truncation of GPT-2's BPE
(``encoder.json`` + ``vocab.bpe``) taken from the ``gpt2.tiktoken`` file that openai-whisper ships. It then runs
this same file under the TensorFlow venv with ``--save-with-tf``, which saves the tensors with
``tf.compat.v1.train.Saver`` in graph mode, as OpenAI did. OpenAI also ships ``model.ckpt.meta`` (the graph);
it is large and not needed to read the weights, so it is not kept. ``tensors.npz`` holds the same arrays
under the same names as the ground truth for tests.

The result is checked three ways: TensorFlow reads the checkpoint back, gpt2fast's reader agrees with
``tensors.npz``, and tiktoken accepts the BPE files and round-trips text.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HPARAMS = {"n_vocab": 300, "n_ctx": 32, "n_embd": 48, "n_head": 3, "n_layer": 2}
N_MERGES = 43  # 256 byte tokens + 43 merges = ids 0..298; <|endoftext|> is 299
EOT = "<|endoftext|>"
SEED = 1234
OUT = Path(__file__).resolve().parent / "openai-tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- tensors --------------------------------------------------------------------------------------------


def gpt2_shapes(n_vocab: int, n_ctx: int, n_embd: int, n_layer: int, **_: int) -> dict[str, tuple[int, ...]]:
    """OpenAI's variable names and shapes (gpt-2 src/model.py: conv1d weights are [1, nx, nf])."""
    shapes = {"model/wte": (n_vocab, n_embd), "model/wpe": (n_ctx, n_embd)}
    for i in range(n_layer):
        h = f"model/h{i}"
        shapes |= {
            f"{h}/ln_1/g": (n_embd,),
            f"{h}/ln_1/b": (n_embd,),
            f"{h}/attn/c_attn/w": (1, n_embd, 3 * n_embd),
            f"{h}/attn/c_attn/b": (3 * n_embd,),
            f"{h}/attn/c_proj/w": (1, n_embd, n_embd),
            f"{h}/attn/c_proj/b": (n_embd,),
            f"{h}/ln_2/g": (n_embd,),
            f"{h}/ln_2/b": (n_embd,),
            f"{h}/mlp/c_fc/w": (1, n_embd, 4 * n_embd),
            f"{h}/mlp/c_fc/b": (4 * n_embd,),
            f"{h}/mlp/c_proj/w": (1, 4 * n_embd, n_embd),
            f"{h}/mlp/c_proj/b": (n_embd,),
        }
    return shapes | {"model/ln_f/g": (n_embd,), "model/ln_f/b": (n_embd,)}


def random_tensors() -> dict[str, np.ndarray]:
    """Weights and biases ~ N(0, 0.02), gains ~ 1 + N(0, 0.1); nonzero biases catch a reader that drops them."""
    rng = np.random.default_rng(SEED)
    tensors = {}
    for name, shape in gpt2_shapes(**HPARAMS).items():
        if name.endswith("/g"):
            values = 1.0 + rng.normal(0.0, 0.1, shape)
        else:
            values = rng.normal(0.0, 0.02, shape)
        tensors[name] = values.astype(np.float32)
    return tensors


# --- BPE files ------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used in encoder.json and vocab.bpe (gpt-2 src/encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's token -> rank (= token id) from whisper's bundled gpt2.tiktoken, without importing whisper."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        sys.exit("openai-whisper is not installed in this venv; run this script with the project's venv")
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def split_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Recover the merge that made ``token``: byte-level BPE with only lower-ranked merges ends in two parts."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"cannot split {token!r} into one merge: {parts}")
    return parts[0], parts[1]


def write_bpe_files(folder: Path) -> None:
    """Write encoder.json and vocab.bpe in OpenAI's formats for ids 0..298 plus <|endoftext|>."""
    ranks = gpt2_ranks()
    by_rank = sorted(ranks, key=ranks.__getitem__)[: 256 + N_MERGES]
    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    encoder = {text(token): ranks[token] for token in by_rank} | {EOT: 256 + N_MERGES}
    merges = [split_merge(token, ranks) for token in by_rank[256:]]
    (folder / "encoder.json").write_text(json.dumps(encoder))
    # tiktoken (and OpenAI's encoder.py) drop the first line and the text after the final newline.
    lines = ["#version: 0.2", *(f"{text(a)} {text(b)}" for a, b in merges)]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_bpe_files(folder: Path) -> None:
    """tiktoken asserts that encoder.json and vocab.bpe agree; then round-trip text with GPT-2's split regex."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken caches by path, which would hide a regenerated file
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"), encoder_json_file=str(folder / "encoder.json")
    )
    assert len(ranks) == 256 + N_MERGES
    enc = tiktoken.Encoding(
        "gpt2-tiny", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 256 + N_MERGES}
    )
    sample = "Hello there, the other theatre is in Paris. Ünïcödé ✓\n\n  tabs\tand 123!" + EOT
    ids = enc.encode(sample, allowed_special="all")
    assert enc.decode(ids) == sample and max(ids) < HPARAMS["n_vocab"] and ids[-1] == 256 + N_MERGES
    assert len(ids) < len(sample.encode()), "no merge was used"


# --- TensorFlow (runs in the TensorFlow venv) -----------------------------------------------------------


def save_with_tensorflow(folder: Path) -> None:
    """Save tensors.npz as folder/model.ckpt with the TF1 Saver in graph mode, then read it back with TF."""
    import tensorflow as tf

    tensors = dict(np.load(folder / "tensors.npz"))
    tf.compat.v1.disable_eager_execution()
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.Variable(value, name=name.replace("/", "_")) for name, value in tensors.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"), write_meta_graph=False)
    (folder / "model.ckpt.meta").unlink(missing_ok=True)

    reader = tf.train.load_checkpoint(str(folder / "model.ckpt"))
    assert set(reader.get_variable_to_shape_map()) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    print(f"TensorFlow {tf.__version__} saved and re-read {len(tensors)} tensors")


# --- driver ---------------------------------------------------------------------------------------------


def check_with_gpt2fast(folder: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from gpt2fast.checkpoint.tf_bundle import find_checkpoint_prefix, read_tf_bundle

    expected = dict(np.load(folder / "tensors.npz"))
    actual = read_tf_bundle(find_checkpoint_prefix(folder))
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tf-python", default="/tmp/tfvenv/bin/python", help="python of a venv with TensorFlow")
    parser.add_argument("--save-with-tf", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_with_tf:
        save_with_tensorflow(args.save_with_tf)
        return

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    (OUT / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")  # as OpenAI formats it
    np.savez(OUT / "tensors.npz", **random_tensors())
    write_bpe_files(OUT)
    check_bpe_files(OUT)
    subprocess.run([args.tf_python, __file__, "--save-with-tf", str(OUT)], check=True)
    check_with_gpt2fast(OUT)
    for path in sorted(OUT.iterdir()):
        print(f"{path.stat().st_size:>8}  {path.name}")


if __name__ == "__main__":
    main()
