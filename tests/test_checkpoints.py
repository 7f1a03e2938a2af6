"""Reading checkpoint files: safe unpickling, clear errors for broken files, lazy shapes, wrappers."""
from __future__ import annotations

import json
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


def _resident_bytes_of(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: range, perms, offset, dev, inode, path
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux /proc/self/smaps")
def test_converted_ckpt_tensors_release_their_file_pages(tmp_path):
    """A converting load of a memory-mapped .ckpt gives back each stored tensor's pages once it is copied (the mapping
    would otherwise hold the whole float32 file resident), and the stored values stay readable afterwards."""
    big, other = torch.randn(4, 1_000_000), torch.randn(1000, 1000)
    state = {"big": big, "tied": big, "other": other, "small": torch.randn(7)}  # "tied" shares big's storage
    path = tmp_path / "mm.ckpt"
    torch.save(state, path)
    ckpt = Checkpoint(path)
    assert sum(float(t.sum()) for t in ckpt._tensors.values()) != 0  # every page touched
    assert _resident_bytes_of(path) > 15_000_000
    converted = ckpt.state_dict(dtype=torch.bfloat16)
    assert _resident_bytes_of(path) < 200_000
    for key, t in state.items():
        assert torch.equal(converted[key], t.to(torch.bfloat16)), key
        assert torch.equal(ckpt.tensor(key), t), key  # dropped pages are read from the file again


def test_unsigned_and_float8_dtypes_read_back(tmp_path):
    tensors = {"u16": torch.tensor([0, 65535], dtype=torch.uint16),
               "u32": torch.tensor([7, 2**32 - 1], dtype=torch.uint32),
               "u64": torch.tensor([1, 2**63], dtype=torch.uint64),
               "f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
               "c64": torch.tensor([1 + 2j], dtype=torch.complex64)}
    path = tmp_path / "types.safetensors"
    save_file(tensors, path)
    ckpt = Checkpoint(path)
    for key, value in tensors.items():
        assert ckpt.dtype(key) == value.dtype
        assert ckpt.tensor(key).view(torch.uint8).tolist() == value.view(torch.uint8).tolist(), key


def _safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "F16", "shape": [4],
                                                                              "data_offsets": [16, 24]}}


@pytest.mark.parametrize("content,words", [
    (_safetensors(GOOD, bytes(24), length=100_000_001), "100 MB"),
    (_safetensors({**GOOD, "a": {**GOOD["a"], "shape": [-2, -2]}}, bytes(24)), "corrupt header"),
    (_safetensors({**GOOD, "a": {**GOOD["a"], "shape": [2.0, 2]}}, bytes(24)), "corrupt header"),
    (_safetensors({**GOOD, "a": {**GOOD["a"], "shape": [1 << 62, 1 << 62]}}, bytes(24)), "corrupt header"),
    (_safetensors({**GOOD, "a": {**GOOD["a"], "data_offsets": [16, 0]}}, bytes(24)), "invalid offset"),
    (_safetensors({**GOOD, "b": {**GOOD["b"], "data_offsets": [8, 16]}}, bytes(24)), "corrupt header"),
    (_safetensors({**GOOD, "a": {**GOOD["a"], "dtype": "Q4"}}, bytes(24)), "corrupt header"),
    (_safetensors(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", bytes(24)), "recursion limit"),
    (_safetensors(GOOD, bytes(24) + b"extra"), "bytes appended"),
    (_safetensors(GOOD, bytes(20)), "truncated"),
])
def test_lying_headers_are_refused_naming_the_file(tmp_path, content, words):
    """Header checks of the safetensors package (size limit, typed shapes and offsets, contiguous data, bounded
    nesting), reported as our error with the file's path."""
    path = tmp_path / "lying.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as err:
        Checkpoint(path)
    assert str(path) in str(err.value)


def test_write_safetensors_is_read_back_by_the_safetensors_package(tmp_path):
    from safetensors.torch import load_file

    from vidsynth.checkpoints import write_safetensors

    state = {"a": torch.randn(3, 4), "ids": torch.arange(5), "bf": torch.randn(7).bfloat16(), "none": torch.zeros(0, 3),
             "u16": torch.tensor([1, 65535], dtype=torch.uint16), "view": torch.randn(4, 4).t()}  # not contiguous
    path = tmp_path / "written.safetensors"
    write_safetensors(state, path)
    back = load_file(str(path))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                               for k, v in state.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["written.safetensors"]  # no temporary of its own
