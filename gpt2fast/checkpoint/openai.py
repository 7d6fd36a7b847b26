"""OpenAI's original GPT-2 TensorFlow folders, read without TensorFlow.

A folder as OpenAI distributes it: ``hparams.json``, ``checkpoint``, ``model.ckpt.index``,
``model.ckpt.data-00000-of-00001``, ``encoder.json``, ``vocab.bpe``. Variables are named
``model/h{i}/attn/c_attn/w`` and so on; Conv1D weights are ``[1, in, out]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gpt2fast.checkpoint.files import parse_json_file
from gpt2fast.checkpoint.layout import Entry, assemble, check_layout, is_transposed
from gpt2fast.checkpoint.tf_bundle import find_checkpoint_prefix, read_tf_bundle
from gpt2fast.config import GPT2Config
from gpt2fast.errors import CheckpointError

_TOP_LEVEL = {
    "model/wte": "wte.weight",
    "model/wpe": "wpe.weight",
    "model/ln_f/g": "ln_f.weight",
    "model/ln_f/b": "ln_f.bias",
}
_LAYER = re.compile(r"model/h(\d+)/(.+)")
_IN_LAYER = {
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}


def canonical_name(tf_name: str) -> str | None:
    """Our name for an OpenAI variable, or None if it is not one of GPT-2's.

    Example:
        >>> canonical_name("model/h11/mlp/c_fc/w")
        'h.11.mlp.c_fc.weight'
    """
    if tf_name in _TOP_LEVEL:
        return _TOP_LEVEL[tf_name]
    match = _LAYER.fullmatch(tf_name)
    if match and match.group(2) in _IN_LAYER:
        return f"h.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    return None


def read_hparams(folder: Path) -> GPT2Config:
    """The model shape from OpenAI's ``hparams.json``."""
    return parse_json_file(folder / "hparams.json", "hparams", GPT2Config.from_openai_hparams)


def load_openai_folder(folder: Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Read an OpenAI GPT-2 TensorFlow checkpoint folder into our config and canonical state dict.

    Example:
        >>> config, state = load_openai_folder(Path("models/124M"))  # doctest: +SKIP
        >>> config.n_layer, state["wte.weight"].shape  # doctest: +SKIP
        (12, torch.Size([50257, 768]))
    """
    config = read_hparams(folder)
    prefix = find_checkpoint_prefix(folder)

    def check_shapes(shapes: dict[str, tuple[int, ...]]) -> None:  # from the index, before any data is read
        found = {}
        for tf_name, shape in shapes.items():
            name = canonical_name(tf_name)
            if name is None:
                # Optimizer slots and step counters are not weights; anything else under model/ is a surprise.
                if tf_name.startswith("model/"):
                    raise CheckpointError(f"{prefix}: unexpected variable {tf_name!r}")
                continue
            found[name] = (tf_name, _squeezed(name, shape), is_transposed(name))
        check_layout(found, config, str(prefix))

    entries: dict[str, Entry] = {}
    for tf_name, array in read_tf_bundle(prefix, check_shapes).items():
        name = canonical_name(tf_name)
        if name is not None:
            tensor = torch.from_numpy(array)
            entries[name] = Entry(tf_name, tensor.reshape(_squeezed(name, tensor.shape)), is_transposed(name))
    return config, assemble(entries, config, str(prefix))


def _squeezed(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # OpenAI's conv1d weights keep a leading kernel-width axis of 1: [1, in, out].
    return tuple(shape[1:]) if is_transposed(name) and len(shape) == 3 and shape[0] == 1 else tuple(shape)
