"""Tests for the TensorFlow tensor-bundle reader against a checkpoint written by real TensorFlow.

The fixture tests/data/openai-tiny/ comes from tests/data/make_openai_fixture.py; tensors.npz holds the
arrays that TensorFlow was asked to save.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

from gpt2fast.checkpoint.tf_bundle import _masked_crc32c, _read_varint, find_checkpoint_prefix, read_tf_bundle
from gpt2fast.errors import CheckpointError

FIXTURE = Path(__file__).parent / "data" / "openai-tiny"
INDEX = "model.ckpt.index"
DATA = "model.ckpt.data-00000-of-00001"

INDEX_CUTS = [0, 1, 8, 47, 48, 100, 500, -49, -48, -9, -8, -1]  # bytes kept (negative: bytes dropped)
DATA_CUTS = [0, 1, 1000, -57600, -1]  # -57600 drops exactly model/wte, the last tensor
# model/wte's entry in the index starts with dtype=DT_FLOAT (08 01) and shape [300, 48] (12 09 12 03 08 ac 02 ...).
WTE_ENTRY = b"\x08\x01\x12\x09\x12\x03\x08\xac\x02"
MISSING_FILES = [(INDEX, "cannot read index file"), (DATA, "cannot read data file")]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "tensors.npz"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    copy = tmp_path / "openai-tiny"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_reads_exactly_what_tensorflow_saved(expected: dict[str, np.ndarray]) -> None:
    actual = read_tf_bundle(FIXTURE / "model.ckpt")
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype == np.float32, name
        assert actual[name].shape == value.shape, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_has_openai_names_and_shapes() -> None:
    tensors = read_tf_bundle(FIXTURE / "model.ckpt")
    assert tensors["model/wte"].shape == (300, 48)
    assert tensors["model/wpe"].shape == (32, 48)
    assert tensors["model/h1/attn/c_attn/w"].shape == (1, 48, 144)
    assert tensors["model/h1/mlp/c_proj/w"].shape == (1, 192, 48)
    assert len(tensors) == 2 + 12 * 2 + 2


def test_accepts_str_prefix() -> None:
    assert set(read_tf_bundle(str(FIXTURE / "model.ckpt"))) == set(read_tf_bundle(FIXTURE / "model.ckpt"))


def test_find_checkpoint_prefix() -> None:
    assert find_checkpoint_prefix(FIXTURE) == FIXTURE / "model.ckpt"
    assert find_checkpoint_prefix(str(FIXTURE)) == FIXTURE / "model.ckpt"


def test_find_checkpoint_prefix_without_state_file(folder: Path) -> None:
    (folder / "checkpoint").unlink()
    assert find_checkpoint_prefix(folder) == folder / "model.ckpt"


def test_find_checkpoint_prefix_prefers_folder_over_stale_absolute_path(folder: Path) -> None:
    (folder / "checkpoint").write_text('model_checkpoint_path: "/nowhere/trained/model.ckpt"\n')
    assert find_checkpoint_prefix(folder) == folder / "model.ckpt"


def test_find_checkpoint_prefix_decodes_escapes(folder: Path) -> None:
    (folder / INDEX).rename(folder / 'm\u00e9"del.ckpt.index')
    (folder / "checkpoint").write_text('model_checkpoint_path: "m\\303\\251\\"del.ckpt"\n')
    assert find_checkpoint_prefix(folder) == folder / 'm\u00e9"del.ckpt'


def test_find_checkpoint_prefix_errors(folder: Path) -> None:
    (folder / "checkpoint").write_text('model_checkpoint_path: "other.ckpt"\n')
    with pytest.raises(CheckpointError, match=r"checkpoint: names 'other.ckpt'.*other\.ckpt\.index"):
        find_checkpoint_prefix(folder)
    (folder / "checkpoint").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="checkpoint: no model_checkpoint_path"):
        find_checkpoint_prefix(folder)
    (folder / "checkpoint").unlink()
    (folder / INDEX).unlink()
    with pytest.raises(CheckpointError, match="no 'checkpoint' file and no model.ckpt.index"):
        find_checkpoint_prefix(folder)


@pytest.mark.parametrize(("filename", "problem"), MISSING_FILES)
def test_missing_file(folder: Path, filename: str, problem: str) -> None:
    (folder / filename).unlink()
    with pytest.raises(CheckpointError, match=f"{filename}: {problem}"):
        read_tf_bundle(folder / "model.ckpt")


@pytest.mark.parametrize("cut", DATA_CUTS)
def test_truncated_data_file(folder: Path, cut: int) -> None:
    data = (folder / DATA).read_bytes()
    (folder / DATA).write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=f"{DATA}: tensor '.*' spans bytes .*truncated"):
        read_tf_bundle(folder / "model.ckpt")


@pytest.mark.parametrize("cut", INDEX_CUTS)
def test_truncated_index_file(folder: Path, cut: int) -> None:
    index = (folder / INDEX).read_bytes()
    (folder / INDEX).write_bytes(index[:cut])
    with pytest.raises(CheckpointError, match=f"{INDEX}: "):
        read_tf_bundle(folder / "model.ckpt")


def test_bad_magic(folder: Path) -> None:
    index = bytearray((folder / INDEX).read_bytes())
    index[-1] ^= 0xFF
    (folder / INDEX).write_bytes(index)
    with pytest.raises(CheckpointError, match=f"{INDEX}: bad table magic"):
        read_tf_bundle(folder / "model.ckpt")


def test_not_an_index(folder: Path) -> None:
    (folder / INDEX).write_bytes(b"{}" * 100)
    with pytest.raises(CheckpointError, match=f"{INDEX}: bad table magic"):
        read_tf_bundle(folder / "model.ckpt")


def test_every_single_byte_corruption_of_the_index_is_caught_or_harmless(folder: Path) -> None:
    # Block checksums catch edits inside blocks; the footer's padding is unused, so edits there are harmless.
    original = (folder / INDEX).read_bytes()
    names = set(read_tf_bundle(folder / "model.ckpt"))
    for position in range(len(original)):
        corrupted = bytearray(original)
        corrupted[position] ^= 0x5A
        (folder / INDEX).write_bytes(corrupted)
        try:
            assert set(read_tf_bundle(folder / "model.ckpt")) == names, position
        except CheckpointError as e:
            assert INDEX in str(e), (position, str(e))


def _edit_first_data_block(folder: Path, old: bytes = WTE_ENTRY, new: bytes = WTE_ENTRY, compression: int = 0) -> None:
    """Replace bytes in the index's first data block and re-sign it, as if TF had written the edit."""
    index = bytearray((folder / INDEX).read_bytes())
    # TF writes the data block(s) first, so with one data block it ends right before the metaindex block.
    metaindex_offset, _ = _read_varint(bytes(index[-48:]), 0)
    end = metaindex_offset - 5
    block = bytes(index[:end])
    assert block.count(old) == 1
    index[:end] = block.replace(old, new)
    index[end] = compression
    index[end + 1 : end + 5] = _masked_crc32c(bytes(index[: end + 1])).to_bytes(4, "little")
    (folder / INDEX).write_bytes(index)


def test_edit_helper_keeps_a_valid_index(folder: Path, expected: dict[str, np.ndarray]) -> None:
    _edit_first_data_block(folder)
    np.testing.assert_array_equal(read_tf_bundle(folder / "model.ckpt")["model/wte"], expected["model/wte"])


def test_unsupported_dtype(folder: Path) -> None:
    _edit_first_data_block(folder, new=b"\x08\x07" + WTE_ENTRY[2:])  # DT_STRING (7)
    with pytest.raises(CheckpointError, match=f"{DATA}: tensor 'model/wte' has unsupported TensorFlow dtype enum 7"):
        read_tf_bundle(folder / "model.ckpt")


def test_compressed_block(folder: Path) -> None:
    _edit_first_data_block(folder, compression=1)
    with pytest.raises(CheckpointError, match=rf"{INDEX}: block at offset 0 is compressed \(snappy\)"):
        read_tf_bundle(folder / "model.ckpt")


def test_checksum_mismatch(folder: Path) -> None:
    index = bytearray((folder / INDEX).read_bytes())
    index[30] ^= 1
    (folder / INDEX).write_bytes(index)
    with pytest.raises(CheckpointError, match=f"{INDEX}: checksum mismatch in block at offset 0"):
        read_tf_bundle(folder / "model.ckpt")
