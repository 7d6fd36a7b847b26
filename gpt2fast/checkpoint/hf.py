"""Hugging Face GPT-2 folders: ``config.json`` + ``model.safetensors`` (or sharded, or ``pytorch_model.bin``).

Names may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``).
``.bin`` files are read with ``weights_only=True``: they are never unpickled as code.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from gpt2fast.checkpoint.files import inside_folder, parse_json_file, read_json
from gpt2fast.checkpoint.layout import Entry, assemble, check_layout, is_transposed, progress
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
    return parse_json_file(folder / "config.json", "config", GPT2Config.from_hf_dict)


def load_hf_folder(folder: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Read a Hugging Face GPT-2 folder into our config and canonical state dict.

    Example (with a folder written by ``GPT2LMHeadModel.save_pretrained``):
        >>> config, state = load_hf_folder(Path("my-gpt2"))  # doctest: +SKIP
        >>> state["h.0.attn.c_attn.weight"].shape  # doctest: +SKIP
        torch.Size([2304, 768])
    """
    config = read_config(folder)
    files = _weight_files(folder)
    if all(path.suffix == ".safetensors" for path in files):
        # The headers list every name and shape: check them against the config before reading any tensor.
        check_layout(_safetensors_layout(files), config, str(folder))
    entries: dict[str, Entry] = {}
    tied_head = None
    for path in files:
        for source_name, tensor in _read_file(path).items():
            name = _canonical_name(source_name)
            if name == "lm_head.weight":
                tied_head = tensor
            elif name is not None:
                entries[name] = Entry(source_name, tensor, is_transposed(name), str(path))
    state = assemble(entries, config, str(folder))
    if tied_head is not None and not torch.equal(tied_head, entries["wte.weight"].tensor):
        raise CheckpointError(f"{folder}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    return config, state


def _canonical_name(source_name: str) -> str | None:
    """Our name for a tensor of the file (``lm_head.weight`` kept for the tie check); None for buffers."""
    name = source_name.removeprefix("transformer.")
    return None if name.endswith(_IGNORED_SUFFIXES) else name


def _weight_files(folder: Path) -> list[Path]:
    """The weight file, or the shards an index names (each checked to lie inside the folder)."""
    for file_name in _WEIGHT_FILES:
        path = folder / file_name
        if not path.exists():
            continue
        return _shards(path) if file_name.endswith(".index.json") else [path]
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    looked_for = ", ".join(_WEIGHT_FILES)
    raise CheckpointError(f"{folder}: no weights found (looked for {looked_for}; the folder has {present})")


def _shards(index_path: Path) -> list[Path]:
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    paths = []
    for shard in sorted(set(weight_map.values())):
        path = inside_folder(index_path.parent, shard, index_path)
        if not os.path.exists(path):  # unlike Path.exists, False (not OSError) for a name the OS refuses
            raise CheckpointError(f"{index_path}: shard {shard} is missing from the folder")
        paths.append(path)
    return paths


def _safetensors_layout(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        for source_name, shape in shapes.items():
            name = _canonical_name(source_name)
            if name is not None and name != "lm_head.weight":
                found[name] = (source_name, shape, is_transposed(name))
    return found


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
