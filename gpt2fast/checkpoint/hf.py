"""Hugging Face GPT-2 folders: ``config.json`` + ``model.safetensors`` (or sharded, or ``pytorch_model.bin``).

Names may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``).
``.bin`` files are read with ``weights_only=True``: they are never unpickled as code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from gpt2fast.checkpoint.layout import Entry, assemble, is_transposed, progress
from gpt2fast.config import GPT2Config
from gpt2fast.errors import CheckpointError

# Buffers older transformers versions saved beside the weights (the causal mask); not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_config(folder: Path) -> GPT2Config:
    """The model shape from a Hugging Face ``config.json``, refusing what we cannot compute."""
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None
    try:
        return GPT2Config.from_hf_dict(hf)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_hf_folder(folder: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Read a Hugging Face GPT-2 folder into our config and canonical state dict.

    Example (with a folder written by ``GPT2LMHeadModel.save_pretrained``):
        >>> config, state = load_hf_folder(Path("my-gpt2"))  # doctest: +SKIP
        >>> state["h.0.attn.c_attn.weight"].shape  # doctest: +SKIP
        torch.Size([2304, 768])
    """
    config = read_config(folder)
    raw = _read_weights(folder)
    entries: dict[str, Entry] = {}
    tied_head = None
    for source_name, tensor in raw.items():
        name = source_name.removeprefix("transformer.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            tied_head = tensor
            continue
        entries[name] = Entry(source_name, tensor, is_transposed(name))
    state = assemble(entries, config, str(folder))
    if tied_head is not None and not torch.equal(tied_head, entries["wte.weight"].tensor):
        raise CheckpointError(f"{folder}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    return config, state


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for file_name in _WEIGHT_FILES:
        path = folder / file_name
        if not path.exists():
            continue
        if file_name.endswith(".index.json"):
            return _read_sharded(path)
        return _read_file(path)
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    looked_for = ", ".join(_WEIGHT_FILES)
    raise CheckpointError(f"{folder}: no weights found (looked for {looked_for}; the folder has {present})")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: cannot read shard index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = index_path.parent / shard
        if not path.exists():
            raise CheckpointError(f"{index_path}: shard {shard} is missing from the folder")
        tensors |= _read_file(path)
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    total = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in progress(list(f.keys()), total, f"loading {path.name}")}
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        # mmap avoids a second copy of big files, but only the zip format (torch >= 1.6) supports it.
        zip_format = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/... for bad archives
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state
