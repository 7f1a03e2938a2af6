"""motion_scale over time: floats stay floats, lists are per frame, keyframe dicts move linearly (last value held)."""
from __future__ import annotations

import pytest
import torch

from vidsynth.errors import ConfigError
from vidsynth.pipelines.motion_schedule import motion_scale_schedule


def test_forms():
    assert motion_scale_schedule(1.2, 8) == 1.2 and isinstance(motion_scale_schedule(1, 8), float)
    assert torch.equal(motion_scale_schedule([0.5] * 4, 4), torch.full((4,), 0.5))
    got = motion_scale_schedule({0: 1.0, 4: 2.0}, 8)
    assert torch.allclose(got, torch.tensor([1.0, 1.25, 1.5, 1.75, 2.0, 2.0, 2.0, 2.0]))
    got = motion_scale_schedule({0: 0.0, 2: 1.0, 6: 0.0}, 7)
    assert torch.allclose(got, torch.tensor([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("value, match", [([1.0] * 3, "one value per frame"), ({2: 1.0}, "frame 0"),
                                          ({0: 1.0, 8: 1.0}, "beyond"), ({0: "x"}, "values must be"),
                                          ("fast", "must be a number")])
def test_bad_schedules(value, match):
    with pytest.raises(ConfigError, match=match):
        motion_scale_schedule(value, 8)
