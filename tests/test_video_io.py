"""Video files: each format round-trips (read back independently with PyAV / Pillow), inputs of every kind, and a
failed save leaves the folder exactly as it was."""
from __future__ import annotations

import tempfile
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vidsynth.errors import ConfigError, VidsynthError
from vidsynth.video_io import frames_to_pil, load_video, save_video, video_info

LOSSY_MEAN_ABS_ERROR = 4.0  # of 255, on smooth content; measured: mp4 2.6, webm 3.1, gif 2.3, webp 2.6
FORMATS = ["clip.mp4", "clip.webm", "clip.gif", "clip.webp", "clip_frames/"]


def moving_gradient(frames: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """(f, h, w, 3) float in [0, 1]: smooth content (4 levels a pixel at any size) that shifts each frame, so frames
    differ and codecs do well."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([np.stack([(x + 5 * i) % 64 / 64, y % 64 / 64, np.full_like(x, i / frames)], -1)
                     for i in range(frames)])


def as_uint8(frames: np.ndarray) -> np.ndarray:
    return (frames * 255 + 0.5).astype(np.uint8)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float64)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def read_back_independently(path: Path) -> tuple[int, int, int, float, list[Image.Image]]:
    """(frames, width, height, fps, images) using PyAV or Pillow directly, not vidsynth."""
    if path.is_dir():
        files = sorted(path.iterdir())
        assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(len(files))]
        images = [Image.open(f) for f in files]
        return len(files), *images[0].size, float(images[0].info["fps"]), images
    if path.suffix in (".gif", ".webp"):
        with Image.open(path) as im:
            images, durations = [], []
            for index in range(im.n_frames):
                im.seek(index)
                im.load()
                durations.append(im.info["duration"])
                images.append(im.convert("RGB"))
            return im.n_frames, *im.size, 1000 * len(durations) / sum(durations), images
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == {".mp4": "h264", ".webm": "vp9"}[path.suffix]
        assert stream.codec_context.format.name == "yuv420p"
        assert stream.codec_context.colorspace == stream.codec_context.color_primaries == 6  # tagged BT.601 (SMPTE 170M)
        images = [frame.to_image() for frame in container.decode(stream)]
        return len(images), stream.codec_context.width, stream.codec_context.height, float(stream.average_rate), images


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_of_pil_frames(tmp_path, name):
    video = moving_gradient()
    images = [Image.fromarray(frame) for frame in as_uint8(video)]
    path = save_video(images, tmp_path / name, fps=12.5)

    frames, width, height, fps, read = read_back_independently(path)
    assert (frames, width, height) == (6, 64, 48)
    assert fps == pytest.approx(12.5, rel=1e-3)
    error = np.abs(pixels(read) - as_uint8(video)).mean()
    assert error == 0 if name.endswith("/") else error < LOSSY_MEAN_ABS_ERROR
    assert video_info(path) == pytest.approx({"frames": 6, "width": 64, "height": 48, "fps": 12.5}, rel=1e-3)
    loaded = load_video(path)
    assert len(loaded) == 6 and loaded[0].size == (64, 48) and loaded[0].mode == "RGB"
    assert np.array_equal(pixels(loaded), pixels(read))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_gif_frame_times_average_to_fps_and_loop_flags(tmp_path):
    video = as_uint8(moving_gradient(frames=8))
    looping = save_video(video, tmp_path / "loop.gif")  # 16 fps = 62.5 ms, gif stores whole centiseconds
    once = save_video(video, tmp_path / "once.gif", loop=False)
    with Image.open(looping) as im:
        assert im.info["loop"] == 0
        durations = [(im.seek(i), im.info["duration"])[1] for i in range(im.n_frames)]
    assert set(durations) == {60, 70} and sum(durations) == 500
    with Image.open(once) as im:
        assert "loop" not in im.info  # no loop extension: played once
    for loop, count in [(True, 0), (False, 1)]:  # webp counts plays, 0 = forever
        with Image.open(save_video(video, tmp_path / f"{loop}.webp", loop=loop)) as im:
            assert im.info["loop"] == count


def test_odd_size_mp4_is_padded_with_edge_pixels(tmp_path):
    video = as_uint8(moving_gradient(frames=4, height=17, width=33))
    path = save_video(video, tmp_path / "odd.mp4")
    frames, width, height, fps, read = read_back_independently(path)
    assert (frames, width, height, fps) == (4, 34, 18, 16.0)
    got = pixels(read)
    assert np.abs(got[:, :17, :33] - video).mean() < LOSSY_MEAN_ABS_ERROR
    assert np.abs(got[:, :17, 33] - video[:, :, 32]).mean() < 2 * LOSSY_MEAN_ABS_ERROR  # padding repeats the edge
    assert np.abs(got[:, 17, :33] - video[:, 16, :]).mean() < 2 * LOSSY_MEAN_ABS_ERROR


def test_numpy_and_tensor_inputs_give_the_same_pixels(tmp_path):
    video = moving_gradient(frames=3, height=16, width=24)
    expected = as_uint8(video)
    inputs = {"uint8": expected, "float": video, "tensor_fchw": torch.from_numpy(video).permute(0, 3, 1, 2),
              "tensor_uint8": torch.from_numpy(expected).permute(0, 3, 1, 2), "tensor_fhwc": torch.from_numpy(video),
              "float64_overshoot": np.clip(video.astype(np.float64) * 1.004 - 0.002, -0.002, 1.002)}
    for name, frames in inputs.items():
        got = pixels(load_video(save_video(frames, tmp_path / name)))
        assert np.abs(got - expected).max() <= (1 if name == "float64_overshoot" else 0), name
    mp4 = save_video(torch.from_numpy(video).permute(0, 3, 1, 2), tmp_path / "tensor.mp4")
    assert np.abs(pixels(load_video(mp4)) - expected).mean() < LOSSY_MEAN_ABS_ERROR


def test_frames_to_pil_maps_minus_one_one_to_bytes():
    x = torch.tensor([-1.0, -1.5, 0.0, 1.0, 2.0, 0.5]).view(1, 3, 1, 2).repeat(2, 1, 1, 1)
    images = frames_to_pil(x.to(torch.bfloat16))
    assert len(images) == 2 and images[0].size == (2, 1) and images[0].mode == "RGB"
    assert np.asarray(images[1]).tolist() == [[[0, 128, 255], [0, 255, 191]]]  # clamped, (x + 1) * 127.5 rounded
    with pytest.raises(ConfigError, match="frames, 3, height, width"):
        frames_to_pil(torch.zeros(3, 4, 4))


def test_quality_trades_size_for_fidelity(tmp_path):
    video = as_uint8(moving_gradient(frames=4))
    best, small = save_video(video, tmp_path / "best.mp4", quality=10), save_video(video, tmp_path / "small.mp4", quality=3)
    errors = [np.abs(pixels(load_video(p)) - video).mean() for p in (best, small)]
    assert best.stat().st_size > small.stat().st_size and errors[0] < errors[1]
    with pytest.raises(ConfigError, match="quality"):
        save_video(video, tmp_path / "bad.mp4", quality=11)


@pytest.mark.parametrize("frames, message", [
    ([], "non-empty sequence of PIL images"),
    ([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))], "same size"),
    (np.zeros((2, 8, 8), np.uint8), r"\(frames, height, width, 3\)"),
    (np.full((2, 8, 8, 3), -1.0), "frames_to_pil"),
    (np.full((2, 8, 8, 3), np.nan), r"\[0, 1\]"),
])
def test_bad_frames_are_config_errors(tmp_path, frames, message):
    with pytest.raises(ConfigError, match=message):
        save_video(frames, tmp_path / "new" / "v.mp4")
    assert listing(tmp_path) == []


def test_unknown_extension_and_bad_fps(tmp_path):
    video = as_uint8(moving_gradient(frames=2))
    with pytest.raises(ConfigError, match=r"'\.avi'.*'\.mp4', '\.webm', '\.gif', '\.webp'.*PNG"):
        save_video(video, tmp_path / "new" / "v.avi")
    with pytest.raises(ConfigError, match="fps"):
        save_video(video, tmp_path / "v.mp4", fps=0)
    assert listing(tmp_path) == []


def test_unwritable_paths_name_the_path_and_leave_nothing(tmp_path, monkeypatch):
    video = as_uint8(moving_gradient(frames=2))
    (tmp_path / "taken.mp4").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = listing(tmp_path)
    for target, message in [(tmp_path / "taken.mp4", "existing folder"), (tmp_path / "a_file" / "v.gif", "a_file"),
                            (tmp_path / "a_file", "existing file")]:
        with pytest.raises(VidsynthError, match=message) as caught:
            save_video(video, target)
        assert str(target) in str(caught.value) or "a_file" in str(caught.value)
    # a read-only folder (simulated: root ignores permission bits); the folders created for it are removed again
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(VidsynthError, match="Permission denied") as caught:
        save_video(video, tmp_path / "new" / "deeper" / "v.mp4")
    assert str(tmp_path / "new" / "deeper" / "v.mp4") in str(caught.value)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", FORMATS)
def test_failure_mid_write_keeps_the_previous_output_and_leaves_nothing_else(tmp_path, monkeypatch, name):
    video = as_uint8(moving_gradient())
    previous = save_video(video[:2], tmp_path / name)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = []

    def failing(real, fail_at: int, after: bool = False):
        def wrapped(*args, **kwargs):
            calls.append(1)
            result = real(*args, **kwargs) if after or len(calls) < fail_at else None
            if len(calls) == fail_at:
                raise OSError("simulated: disk full")
            return result
        return wrapped

    if name.endswith((".mp4", ".webm")):  # the encoder gets two frames, then fails
        monkeypatch.setattr(av, "VideoFrame", types.SimpleNamespace(from_ndarray=failing(av.VideoFrame.from_ndarray, 3)))
    elif name.endswith("/"):  # two PNG frames are written, the third fails
        monkeypatch.setattr(Image.Image, "save", failing(Image.Image.save, 3))
    else:  # Pillow writes the whole temporary file, then the save fails before it is renamed
        monkeypatch.setattr(Image.Image, "save", failing(Image.Image.save, 1, after=True))
    with pytest.raises(OSError, match="disk full"):
        save_video(video, tmp_path / name)
    assert len(calls) == (1 if name.endswith((".gif", ".webp")) else 3)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert listing(tmp_path) == sorted(str(p.relative_to(tmp_path)) for p in [*before, *([previous] * previous.is_dir())])


def test_png_folder_replaces_only_its_own_frames(tmp_path):
    video = as_uint8(moving_gradient(frames=5, height=8, width=8))
    folder = save_video(video, tmp_path / "frames")
    save_video(video[:2], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["frame_00000.png", "frame_00001.png"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(VidsynthError, match="holds other files"):
        save_video(video, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["frame_00000.png", "frame_00001.png", "notes.txt"]
    assert listing(tmp_path) == ["frames", *(f"frames/{n}" for n in ["frame_00000.png", "frame_00001.png", "notes.txt"])]


def test_load_video_limits_orders_and_reports_errors(tmp_path):
    video = as_uint8(moving_gradient(frames=5, height=8, width=8))
    assert len(load_video(save_video(video, tmp_path / "v.mp4"), max_frames=3)) == 3
    assert len(load_video(save_video(video, tmp_path / "v.gif"), max_frames=2)) == 2
    folder = tmp_path / "numbered"
    folder.mkdir()
    for index in (10, 2, 1):  # natural order: 1, 2, 10
        Image.new("RGB", (4, 4), (index, 0, 0)).save(folder / f"img_{index}.png")
    assert [im.getpixel((0, 0))[0] for im in load_video(folder)] == [1, 2, 10]
    assert video_info(folder) == {"frames": 3, "width": 4, "height": 4, "fps": None}
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    for path, message in [(tmp_path / "missing.mp4", "does not exist"), (tmp_path / "broken.mp4", "cannot read video")]:
        with pytest.raises(VidsynthError, match=message):
            load_video(path)
    with pytest.raises(ConfigError, match="max_frames"):
        load_video(folder, max_frames=0)
