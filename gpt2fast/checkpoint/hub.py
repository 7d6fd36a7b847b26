"""Hugging Face Hub ids (``gpt2``, ``openai-community/gpt2-medium``): the local cache first, then the network."""

from __future__ import annotations

from pathlib import Path

from gpt2fast.errors import CheckpointError

_SAFETENSORS = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json", "merges.txt"]
_BIN = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "vocab.json", "merges.txt"]


def download(repo_id: str) -> Path:
    """Return a local folder holding ``repo_id``'s config, weights and vocab; raise a clear error offline.

    Example:
        >>> download("openai-community/gpt2")  # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d...')
    """
    from huggingface_hub import snapshot_download

    errors = []
    for local_only in (True, False):
        for patterns in (_SAFETENSORS, _BIN):
            try:
                folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            except Exception as e:  # hub errors differ by cause (offline, missing repo, auth); report them all
                errors.append(f"{type(e).__name__}: {e}")
                break
            if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
                return folder
    raise CheckpointError(
        f"could not get {repo_id!r} from the Hugging Face Hub, and there is no local folder of that name "
        f"({errors[-1] if errors else 'no weights in the repository'}). If this machine is offline, download "
        "the model elsewhere and pass its folder: --model /path/to/folder (config.json + model.safetensors), "
        "or an OpenAI checkpoint folder (hparams.json + model.ckpt.*)."
    )
