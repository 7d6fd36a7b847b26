"""Every way weights arrive, and a clear error for every way they can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from gpt2fast import LLM
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.errors import CheckpointError


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
