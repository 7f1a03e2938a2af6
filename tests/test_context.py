"""Context windows: coverage, placement and cross-fade weights."""
import pytest
import torch

from vidsynth.pipelines.context import context_windows, window_weights


@pytest.mark.parametrize("frames,length,overlap", [(48, 16, 4), (17, 16, 4), (80, 16, 4), (100, 16, 8), (33, 8, 0)])
def test_windows_cover_every_frame_in_order(frames, length, overlap):
    windows = context_windows(frames, length, overlap)
    assert all(len(w) == length and w == list(range(w[0], w[0] + length)) for w in windows)
    assert windows[0][0] == 0 and windows[-1][-1] == frames - 1
    covered = sorted({i for w in windows for i in w})
    assert covered == list(range(frames))
    starts = [w[0] for w in windows]
    assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))


def test_short_video_is_one_window():
    assert context_windows(12, 16, 4) == [list(range(12))]


def test_closed_loop_wraps_the_end_onto_the_start():
    windows = context_windows(48, 16, 4, closed_loop=True)
    assert len(windows) == 4  # 48 frames / stride 12
    assert windows[-1] == [36 + i for i in range(12)] + [0, 1, 2, 3]
    counts = torch.zeros(48)
    for w in windows:
        counts[w] += 1
    assert (counts >= 1).all() and counts[:4].eq(2).all()  # the first frames are shared with the last window


def test_weights_cross_fade_in_the_overlap():
    w = window_weights(16, 4)
    assert torch.allclose(w[:4], torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert torch.equal(w[4:12], torch.ones(8)) and torch.allclose(w[12:], w[:4].flip(0))
    # in a 4-frame overlap the weights of the outgoing and incoming windows sum to 1: a linear cross-fade
    assert torch.allclose(w[12:] + w[:4], torch.ones(4))


class WindowMarker:
    """A UNet stand-in whose every output frame is the index of the call (= the window) that produced it, so the
    denoiser's blended result shows which windows reached each frame, and with what weight."""

    def __init__(self):
        self.windows = []

    def __call__(self, x, t, context, y=None, *, num_frames, **kwargs):
        self.windows.append(num_frames)
        return torch.full_like(x, float(len(self.windows) - 1))


def blended(num_frames: int, closed_loop: bool = False) -> torch.Tensor:
    """The pipeline's WindowedDenoiser output per frame (16-frame windows, overlap 4, no CFG)."""
    from types import SimpleNamespace

    from vidsynth.pipelines.conditioning import Conditioning
    from vidsynth.pipelines.denoiser import WindowedDenoiser

    pipe = SimpleNamespace(unet=WindowMarker(), motion_modules=None, dtype=torch.float32, device=torch.device("cpu"))
    cond = Conditioning(context=torch.zeros(1, 3, 8))
    eps = WindowedDenoiser(pipe, cond, cfg_scale=1.0, num_frames=num_frames, context_length=16, context_overlap=4,
                           closed_loop=closed_loop, motion_scale=1.0)
    out = eps(torch.randn(1, 4, num_frames, 2, 2), torch.tensor(500.0))
    assert pipe.unet.windows == [16] * len(eps.windows)
    assert (out == out[:, :1, :, :1, :1]).all()  # one value per frame: the windows' outputs were not mixed up
    return out[0, 0, :, 0, 0]


def test_denoiser_cross_fades_windows_linearly_in_their_overlap():
    """28 frames: window 0 covers 0-15, window 1 covers 12-27. Alone, a window's prediction passes unchanged;
    in the 4 shared frames the result ramps from window 0 to window 1 by fifths (the linear cross-fade)."""
    out = blended(28)
    expected = torch.tensor([0.0] * 12 + [0.2, 0.4, 0.6, 0.8] + [1.0] * 12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_closed_loop_blends_the_last_window_into_the_first_frames():
    """48 frames in a loop: windows start at 0, 12, 24, 36 and the last wraps onto frames 0-3."""
    out = blended(48, closed_loop=True)
    ramp = torch.tensor([0.2, 0.4, 0.6, 0.8])
    torch.testing.assert_close(out[:4], 3 * (1 - ramp))  # window 3's tail fading out into window 0
    for k in range(3):
        torch.testing.assert_close(out[12 * k + 4:12 * k + 12], torch.full((8,), float(k)))
        torch.testing.assert_close(out[12 * k + 12:12 * k + 16], k + ramp)
