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


def test_blending_reproduces_a_prediction_shared_by_all_windows():
    frames, length, overlap = 48, 16, 4
    windows = context_windows(frames, length, overlap)
    w = window_weights(length, overlap)
    signal = torch.randn(frames)
    total, weight = torch.zeros(frames), torch.zeros(frames)
    for idx in windows:
        total[idx] += signal[idx] * w
        weight[idx] += w
    assert torch.allclose(total / weight, signal, atol=1e-6)
