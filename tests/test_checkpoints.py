"""Reading checkpoint files: safe unpickling, clear errors for broken files, lazy shapes, wrappers."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from vidsynth.checkpoints import Checkpoint
from vidsynth.errors import CheckpointError


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_malicious_pickle_is_refused_without_running(tmp_path, zipfile_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        Checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(128)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        Checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"a": torch.randn(256, 256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.ckpt"):
        Checkpoint(path)


@pytest.mark.parametrize("name,content", [
    ("random.safetensors", os.urandom(4096)),
    ("random.ckpt", os.urandom(4096)),
    ("random.bin", os.urandom(4096)),
    ("empty.safetensors", b""),
    ("empty.ckpt", b""),
    ("notes.ckpt", b"this is a text file, not weights\n" * 20),
    ("notes.safetensors", b"this is a text file, not weights\n" * 20),
    ("header.safetensors", (20).to_bytes(8, "little") + b'{"a": not json !!!} '),
])
def test_garbage_files_give_our_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "absent.safetensors")


def test_safetensors_shapes_dtypes_and_tensors(tmp_path):
    tensors = {"x.weight": torch.randn(3, 4), "x.ids": torch.arange(5), "h": torch.randn(2).half()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    ckpt = Checkpoint(path)
    assert ckpt.shapes == {"x.weight": (3, 4), "x.ids": (5,), "h": (2,)}
    assert ckpt.dtype("x.ids") == torch.int64 and ckpt.main_dtype() == torch.float32
    for key, value in tensors.items():
        assert torch.equal(ckpt.tensor(key), value)
    state = ckpt.state_dict("x.", dtype=torch.float16)
    assert state["weight"].dtype == torch.float16 and state["ids"].dtype == torch.int64  # integers keep their type
    assert torch.equal(state["weight"], tensors["x.weight"].half())


def test_ckpt_wrapper_and_non_tensor_entries(tmp_path):
    path = tmp_path / "mm.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2), "animatediff_config": {"x": 1}}, "global_step": 7}, path)
    ckpt = Checkpoint(path)
    assert ckpt.shapes == {"a.weight": (2,)}
    assert torch.equal(ckpt.tensor("a.weight"), torch.ones(2))


@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16, torch.float64])
def test_conversion_through_the_chunk_buffer_is_exact(tmp_path, target):
    big = torch.randn(3, 2_000_000)  # 24 MB: more than one 16 MiB staging chunk
    path = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.randn(5).half()}, path)
    ckpt = Checkpoint(path)
    assert torch.equal(ckpt.tensor("big", target), big.to(target))
    assert torch.equal(ckpt.tensor("small", target), ckpt.tensor("small").to(target))
    assert torch.equal(ckpt.tensor("big"), big)
