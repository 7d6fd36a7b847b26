"""Reading the small files of a checkpoint folder safely: JSON with a clear error, and names that stay inside.

Every error is a one-line ``CheckpointError`` naming the file (and the entry, for a path a file names).
A path named inside a file (a shard in ``model.safetensors.index.json``, the prefix in OpenAI's
``checkpoint``) must stay inside the folder once ``..`` and symlinks are resolved; the one exception is
the Hugging Face Hub cache, whose snapshot folders hold links into the repository's own ``blobs/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, TypeVar

from gpt2fast.errors import CheckpointError

T = TypeVar("T")

# Longer names are refused before the OS sees them (it would raise "File name too long" from exists()).
MAX_NAME_CHARS = 1024


def read_json(path: Path, what: str) -> Any:
    """Parse the JSON file ``path`` (``what`` it holds, for errors): every failure is one ``CheckpointError`` naming it.

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = bad.write_text("[" * 100000)
        >>> read_json(bad, "config")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: .../config.json: cannot read config (JSON nested too deeply)
    """
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: cannot read {what} (not UTF-8: byte {e.object[e.start]:#04x} "
                              f"at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e})") from None
    except RecursionError:  # json recurses once per nesting level: "[" * 100000 exhausts the stack
        raise CheckpointError(f"{path}: cannot read {what} (JSON nested too deeply)") from None


def parse_json_file(path: Path, what: str, parse: Callable[[Any], T]) -> T:
    """``parse(read_json(path, what))``, its ValueError turned into a ``CheckpointError`` naming the file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "hparams.json"
        >>> _ = path.write_text('{"n_layer": 2}')
        >>> parse_json_file(path, "hparams", lambda d: d["n_layer"])
        2
    """
    data = read_json(path, what)
    try:
        return parse(data)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def inside_folder(folder: Path, name: str, named_by: Path) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` (``..``, absolute paths and symlinks resolved).

    ``named_by`` is the file that names ``name``, for the error.

    Example:
        >>> inside_folder(Path("/models/gpt2"), "model-00001-of-00002.safetensors", Path("index.json"))
        PosixPath('/models/gpt2/model-00001-of-00002.safetensors')
        >>> inside_folder(Path("/models/gpt2"), "../other/model.safetensors", Path("index.json"))
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: index.json: names '../other/model.safetensors', which is outside /models/gpt2
    """
    shown = name if len(name) <= 200 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
    if len(name) > MAX_NAME_CHARS or "\0" in name:
        raise CheckpointError(f"{named_by}: names {shown!r}, which is not a usable file name")
    if not name or PurePath(name).is_absolute() or ".." in PurePath(name).parts:
        raise CheckpointError(f"{named_by}: names {shown!r}, which is outside {folder}")
    path = folder / name
    try:
        resolved, roots = path.resolve(), _allowed_roots(folder)
    except (OSError, RuntimeError) as e:  # a symlink loop, or a link to a name too long
        raise CheckpointError(f"{named_by}: names {shown!r}, which cannot be resolved ({e})") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{named_by}: names {shown!r}, which leads outside {folder} (to {resolved})")
    return path


def _allowed_roots(folder: Path) -> list[Path]:
    root = folder.resolve()
    # huggingface_hub keeps models--org--name/snapshots/<rev>/<file> as links to models--org--name/blobs/<hash>.
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return [root, root.parent.parent / "blobs"]
    return [root]

