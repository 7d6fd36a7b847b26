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

    errors: list[Exception] = []
    for local_only in (True, False):
        for patterns in (_SAFETENSORS, _BIN):
            try:
                folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
            except Exception as e:  # hub errors differ by cause (offline, missing repo, auth); the last says why
                errors.append(e)
                break
            if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
                return folder
    why = _why(errors[-1]) if errors else "the repository has no model.safetensors or pytorch_model.bin"
    raise CheckpointError(
        f"could not get {repo_id!r} from the Hugging Face Hub: {why}; there is no local folder of that name either. "
        "Download it on a machine with network access and pass its folder: --model /path/to/folder (or "
        "LLM(folder)) holding config.json + model.safetensors, or an OpenAI checkpoint folder (hparams.json + "
        "model.ckpt.*)"
    )


def _why(error: Exception) -> str:
    """A few words for a huggingface_hub error: its own text is many lines of advice meant for its own API.

    Example:
        >>> _why(ValueError("one\\ntwo"))
        'ValueError: one'
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE:
            return "this process is offline (HF_HUB_OFFLINE is set) and the id is not in the local Hub cache"
        return "the Hub could not be reached (offline?) and the id is not in the local Hub cache"
    if isinstance(error, GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository (or it is private: log in with hf auth login)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line[:200]}".rstrip(": ")
