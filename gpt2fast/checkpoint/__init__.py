"""Where weights come from: every source becomes a config plus a state dict in our canonical layout.

Sources: ``random:<preset or JSON>`` (seeded random weights), a Hugging Face folder, an OpenAI
TensorFlow folder, or a Hugging Face Hub id (cache first, then the network).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2fast.checkpoint.hf import load_hf_folder
from gpt2fast.checkpoint.hub import download
from gpt2fast.checkpoint.openai import load_openai_folder
from gpt2fast.config import GPT2Config, preset
from gpt2fast.errors import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Checkpoint:
    """A model's config, its weights in our layout (on CPU, as stored), and where its vocab files are."""

    config: GPT2Config
    state_dict: dict[str, torch.Tensor]
    vocab_dir: Path | None  # folder with encoder.json+vocab.bpe or vocab.json+merges.txt, if the source has one
    is_random: bool = False


def load_checkpoint(source: str | os.PathLike, *, seed: int = 0) -> Checkpoint:
    """Load weights from any supported source.

    Example:
        >>> ckpt = load_checkpoint('random:{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100}')
        >>> ckpt.config.n_layer, ckpt.state_dict["wte.weight"].shape
        (2, torch.Size([100, 64]))
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"model must be a folder, a Hub id or random:<preset>, got {source!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if source.startswith("random:"):
        return _random(source.removeprefix("random:"), seed)
    folder = Path(source).expanduser()
    if not folder.exists():
        if source.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(source):
            raise CheckpointError(f"no such checkpoint folder: {source}")
        folder = download(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint must be a folder (config.json or hparams.json + weights)")
    if (folder / "config.json").exists():
        config, state = load_hf_folder(folder)
    elif (folder / "hparams.json").exists():
        config, state = load_openai_folder(folder)
    else:
        raise CheckpointError(
            f"{folder}: neither a Hugging Face folder (config.json) nor an OpenAI TensorFlow folder (hparams.json)"
        )
    return Checkpoint(config, state, folder)


def _random(spec: str, seed: int) -> Checkpoint:
    from gpt2fast.model import GPT2

    config = GPT2Config.from_json(spec) if spec.lstrip().startswith("{") else preset(spec)
    state = GPT2(config).init_random(seed).state_dict()
    return Checkpoint(config, state, None, is_random=True)
