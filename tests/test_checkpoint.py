"""Every way weights arrive, and a clear error for every way they can be wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from gpt2fast import LLM
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.errors import CheckpointError

ROOT = Path(__file__).parents[1]


@pytest.fixture
def tiny_copy(hf_folder, tmp_path):
    """A private, editable copy of the tiny HF folder."""
    _, folder = hf_folder(TINY)
    return shutil.copytree(folder, tmp_path / "model")


def edit_weights(folder, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_folder():
    with pytest.raises(CheckpointError, match="no such checkpoint folder: /definitely/not/here"):
        load_checkpoint("/definitely/not/here")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="neither a Hugging Face folder"):
        load_checkpoint(str(tmp_path))


def test_folder_without_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(str(tiny_copy))


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.5, 0.999])
def test_truncated_safetensors(tiny_copy, keep_fraction):
    path = tiny_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        load_checkpoint(str(tiny_copy))


def test_truncated_bin(hf_folder, tmp_path):
    _, folder = hf_folder(TINY, "bin")
    copy = shutil.copytree(folder, tmp_path / "bin")
    data = (copy / "pytorch_model.bin").read_bytes()
    (copy / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot load"):
        load_checkpoint(str(copy))


def test_bin_with_code_is_refused(tiny_copy):
    """A pickle that would run code on load is rejected (weights_only=True)."""
    (tiny_copy / "model.safetensors").unlink()
    torch.save({"payload": torch.nn.Linear(2, 2)}, tiny_copy / "pytorch_model.bin")  # a module, not tensors
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(str(tiny_copy))


def test_wrong_shape(tiny_copy):
    def shrink(state):
        state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :-1].contiguous()

    edit_weights(tiny_copy, shrink)
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \(96, 383\), expected "
                                              r"\(96, 384\)"):
        load_checkpoint(str(tiny_copy))


def test_missing_tensor(tiny_copy):
    edit_weights(tiny_copy, lambda state: state.pop("transformer.h.2.ln_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) h.2.ln_2.bias"):
        load_checkpoint(str(tiny_copy))


def test_extra_tensor(tiny_copy):
    edit_weights(tiny_copy, lambda state: state.update({"transformer.h.3.ln_1.weight": torch.ones(96)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) transformer.h.3.ln_1.weight"):
        load_checkpoint(str(tiny_copy))


def test_untied_head_is_refused(tiny_copy):
    edit_weights(tiny_copy, lambda state: state.update({"lm_head.weight": torch.randn(1000, 96)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte.weight"):
        load_checkpoint(str(tiny_copy))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"n_embd": 95}, "must be divisible by n_head"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    ],
)
def test_unsupported_config(tiny_copy, change, message):
    path = tiny_copy / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tiny_copy))


def test_corrupt_config_json(tiny_copy):
    (tiny_copy / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read config"):
        load_checkpoint(str(tiny_copy))


def test_missing_shard(hf_folder, tmp_path):
    _, folder = hf_folder(TINY, "sharded")
    copy = shutil.copytree(folder, tmp_path / "sharded")
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is missing"):
        load_checkpoint(str(copy))


@pytest.mark.parametrize("spec", ["random:gpt-3", "random:", 'random:{"n_layers": 2}', "random:{bad json"])
def test_bad_random_spec(spec):
    with pytest.raises(ValueError, match="unknown preset|unknown GPT2Config field|not valid JSON"):
        load_checkpoint(spec)


def test_random_weights_are_seeded():
    spec = 'random:{"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50}'
    a, b, c = load_checkpoint(spec, seed=1), load_checkpoint(spec, seed=1), load_checkpoint(spec, seed=2)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not torch.equal(a.state_dict["wte.weight"], c.state_dict["wte.weight"])
    assert all(bool((t != 0).all()) for t in a.state_dict.values()), "random weights, biases included, are non-zero"


def offline_hub(monkeypatch, cache_dir) -> None:
    """Point huggingface_hub at an empty cache and forbid the network (it reads its env vars at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_gives_a_clear_error(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(CheckpointError, match="(?s)could not get 'openai-community/gpt2-medium'.*pass its folder"):
        load_checkpoint("openai-community/gpt2-medium")


def test_hub_id_resolves_from_the_cache(hf_folder, tmp_path, monkeypatch):
    """A Hub id found in the local cache loads without the network."""
    _, folder = hf_folder(TINY)
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    offline_hub(monkeypatch, tmp_path / "hub")
    ckpt = load_checkpoint("someone/tiny-gpt2")
    assert ckpt.config.n_embd == 96 and ckpt.vocab_dir == snapshot


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-2), ("bfloat16", 1.5e-1)])
def test_half_precision_dtypes(hf_folder, dtype, atol):
    _, folder = hf_folder(TINY)
    ids = list(range(5, 40, 3))
    ref = LLM(str(folder), device="cpu", dtype="float32").logits(ids)
    llm = LLM(str(folder), device="cpu", dtype=dtype)
    assert llm.model.wte.weight.dtype == getattr(torch, dtype)
    torch.testing.assert_close(llm.logits(ids), ref, atol=atol, rtol=0)


def test_bfloat16_checkpoint_loads(tiny_copy):
    edit_weights(tiny_copy, lambda state: state.update({k: v.bfloat16() for k, v in state.items()}))
    ckpt = load_checkpoint(str(tiny_copy))
    assert ckpt.state_dict["wte.weight"].dtype == torch.bfloat16


def test_progress_bar_while_loading_a_big_checkpoint(hf_folder, monkeypatch, capsys):
    """Checkpoints past the size threshold show a tqdm bar on stderr; small ones stay quiet."""
    from gpt2fast.checkpoint import layout

    _, folder = hf_folder(TINY)
    monkeypatch.delenv("GPT2FAST_NO_PROGRESS", raising=False)
    load_checkpoint(str(folder))
    assert "loading model.safetensors" not in capsys.readouterr().err
    monkeypatch.setattr(layout, "_PROGRESS_MIN_BYTES", 0)
    load_checkpoint(str(folder))
    assert "loading model.safetensors" in capsys.readouterr().err


# ---- issue 13: non-finite weights, huge configs, paths out of the folder, unreadable files, missing tokenizer ----


def shard_holding(folder, name: str):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_non_finite_weight_is_named(hf_folder, tmp_path, fmt, bad):
    """One NaN/inf anywhere is refused at load, naming the file and the tensor (it used to 'generate')."""
    _, folder = hf_folder(TINY, fmt)
    copy = shutil.copytree(folder, tmp_path / fmt)
    name, index = "transformer.h.0.ln_1.weight", 17
    if fmt == "bin":
        state = torch.load(copy / "pytorch_model.bin", weights_only=True)
        state[name][index] = bad
        torch.save(state, copy / "pytorch_model.bin")
        path = copy / "pytorch_model.bin"
    else:
        path = shard_holding(copy, name) if fmt == "sharded" else copy / "model.safetensors"
        state = load_file(path)
        state[name][index] = bad
        save_file(state, path, metadata={"format": "pt"})
    message = rf"{path}: tensor '{name}' holds 1 NaN/inf value\(s\), first at index \({index},\)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(copy))
    with pytest.raises(CheckpointError, match=message):
        LLM(str(copy), device="cpu")


def test_finite_weights_that_overflow_a_sum_still_load(tiny_copy):
    """The cheap check (one sum per tensor) must not refuse finite weights whose sum overflows."""
    edit_weights(tiny_copy, lambda state: state["transformer.wte.weight"].fill_(3e38))
    ckpt = load_checkpoint(str(tiny_copy))
    assert bool((ckpt.state_dict["wte.weight"] == 3e38).all())


def set_config(folder, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def test_config_with_more_layers_than_the_weights(tiny_copy):
    set_config(tiny_copy, n_layer=40)
    with pytest.raises(CheckpointError, match=r"the config says n_layer=40 but the weights hold 3 layer\(s\)"):
        load_checkpoint(str(tiny_copy))


@pytest.mark.parametrize("field, value", [("n_layer", 10**6), ("n_layer", 10**7), ("n_positions", 10**9),
                                          ("vocab_size", 10**9), ("vocab_size", 10**10), ("n_embd", 96 * 10**6)])
def test_huge_config_fails_at_once(tiny_copy, field, value):
    """n_layer 10**6 with 3-layer weights took 19 s and 2.4 GB before failing (10**7: minutes)."""
    set_config(tiny_copy, **{field: value})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"config.json: GPT2Config.{field} is {value}, more than gpt2fast's "
                                              "limit"):
        load_checkpoint(str(tiny_copy))
    assert time.perf_counter() - start < 5  # generous for a busy machine; the limit check itself takes microseconds


@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_config_is_checked_against_the_headers_before_any_tensor_is_read(hf_folder, tmp_path, monkeypatch, fmt):
    from gpt2fast.checkpoint import hf

    copy = shutil.copytree(hf_folder(TINY, fmt)[1], tmp_path / fmt)
    set_config(copy, n_positions=100_000)

    def no_reading(path):
        raise AssertionError(f"read {path} before checking the config against its header")

    monkeypatch.setattr(hf, "_read_file", no_reading)
    with pytest.raises(CheckpointError, match=r"'transformer.wpe.weight' has shape \(64, 96\), expected \(100000, "):
        load_checkpoint(str(copy))


@pytest.mark.parametrize("spec, message", [
    ('random:{"n_positions": 1000000000}', "n_positions is 1000000000, more than gpt2fast's limit"),
    ('random:{"vocab_size": 10000000000}', "vocab_size is 10000000000, more than gpt2fast's limit"),
    ('random:{"n_layer": 1024, "n_embd": 65536, "n_head": 64, "vocab_size": 2097152}',
     r"parameters need .* GiB \(fp32\), more than the .* GiB of memory available"),
    ("random:" + '{"n_layer": ' + "[" * 100000, "not valid JSON: nested too deeply"),
])
def test_random_spec_too_big_to_allocate(spec, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_checkpoint(spec)
    assert time.perf_counter() - start < 5


def outside_copy_of_a_shard(folder, tmp_path):
    """A valid shard outside the model folder, so that following the path would load without error."""
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    (tmp_path / "other").mkdir()
    return shutil.copy(shard, tmp_path / "other" / shard.name), shard


@pytest.mark.parametrize("entry", ["../other/{name}", "{outside}", "/etc/passwd", "sub/../../other/{name}",
                                   "link/{name}", "filelink"])
def test_shard_paths_may_not_leave_the_folder(hf_folder, tmp_path, entry):
    copy = shutil.copytree(hf_folder(TINY, "sharded")[1], tmp_path / "model")
    outside, shard = outside_copy_of_a_shard(copy, tmp_path)
    (copy / "link").symlink_to(tmp_path / "other", target_is_directory=True)
    (copy / "filelink").symlink_to(outside)
    entry = entry.format(name=shard.name, outside=outside)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (entry if v == shard.name else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: names '{re.escape(entry)}', which "
                                              "(is|leads) outside"):
        load_checkpoint(str(copy))


def test_hub_snapshot_links_into_its_blobs_still_load(hf_folder, tmp_path):
    """huggingface_hub's cache keeps snapshot files as links to ../../blobs/<hash>: those stay allowed."""
    folder = hf_folder(TINY, "sharded")[1]
    repo = tmp_path / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(folder.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    ckpt = load_checkpoint(str(snapshot))
    assert ckpt.state_dict.keys() == load_checkpoint(str(folder)).state_dict.keys()


@pytest.mark.parametrize("file_name", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("content, problem", [
    (b"[" * 100000, r"JSON nested too deeply"),
    (b'{"n_layer": 3, "name": "caf\xe9"}', "not UTF-8: byte 0xe9 at offset 27"),
])
def test_unreadable_json_names_the_file(hf_folder, tmp_path, file_name, content, problem):
    copy = shutil.copytree(hf_folder(TINY, "sharded")[1], tmp_path / "model")
    (copy / file_name).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{copy / file_name}: cannot read .*\({problem}"):
        load_checkpoint(str(copy))


def test_folder_whose_vocabulary_is_not_gpt2s_needs_its_vocab_files(tiny_copy):
    """It used to take GPT-2's tokenizer silently, then fail on the first prompt ("token id 15496 is outside")."""
    (tiny_copy / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"vocabulary has 1000 tokens, not GPT-2's 50257, and the folder lacks "
                                              r"its tokenizer: add encoder.json \+ vocab.bpe \(or vocab.json \+ "
                                              r"merges.txt\); it has only vocab.json"):
        load_checkpoint(str(tiny_copy))
    (tiny_copy / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"lacks its tokenizer: add encoder.json \+ vocab.bpe \(or vocab.json "
                                              r"\+ merges.txt\)$"):
        LLM(str(tiny_copy), device="cpu")


def test_folder_with_gpt2s_vocabulary_may_use_the_packaged_tokenizer(tmp_path):
    from conftest import hf_model, save_hf

    folder = save_hf(hf_model(dict(n_layer=1, n_embd=8, n_head=2, vocab_size=50257, n_positions=16)),
                     tmp_path / "model", "safetensors")
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    assert LLM(str(folder), device="cpu").engine.encode("Hello world") == [15496, 995]


def test_conftest_vocab_files_are_gpt2s():
    """The fixture folders' merges.txt is byte-identical to OpenAI's vocab.bpe (tiktoken's pinned hash)."""
    import hashlib

    from conftest import gpt2_vocab_files

    merges = gpt2_vocab_files()[1].encode()
    # vocab_bpe_hash of the gpt2 encoding in tiktoken_ext/openai_public.py
    assert hashlib.sha256(merges).hexdigest() == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def test_cli_prints_one_line_for_a_bad_folder(tiny_copy):
    """`gpt2fast generate --model <bad folder>`: exit 2, one line, no traceback."""
    edit_weights(tiny_copy, lambda state: state["transformer.h.0.ln_1.weight"].__setitem__(0, float("nan")))
    run = subprocess.run([sys.executable, "-m", "gpt2fast", "generate", "--model", str(tiny_copy), "--prompt", "Hi"],
                         capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "tensor 'transformer.h.0.ln_1.weight' holds 1 NaN/inf value(s)" in run.stderr
