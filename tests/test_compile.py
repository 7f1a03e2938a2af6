"""pipe.compile(): torch.compile of the UNet blocks with the motion modules inside (and of the VAE decoder).

The suite compiles with the aot_eager backend: it captures the graphs as inductor does (dynamo, then AOT autograd's
functionalization, which is where in-place ops such as our residual adds could go wrong) without spending minutes
in C++ code generation on a small CPU. The compiled video must be as close to a float64 run as the eager float32
video is, come from one graph per part (no graph break) and need no recompile across steps, windows and seeds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tiny_models import tiny_sd15

CALL = dict(prompt="a fox", negative_prompt="", num_frames=12, context_length=8, context_overlap=4, cfg_scale=7.5,
            num_inference_steps=2, height=64, width=64, progress_bar=False, output_type="pt")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_pipeline_is_as_exact_as_eager_in_one_graph_without_recompiles(fresh_dynamo):
    models = tiny_sd15("v2")
    exact = copy.deepcopy(models)
    for part in (exact.unet, exact.vae, *exact.text_encoders, exact.motion):
        part.double()
    with torch.no_grad():
        reference = [exact.pipeline()(**CALL, seed=seed).float() for seed in (1, 2)]
        eager_error = max((models.pipeline()(**CALL, seed=seed) - ref).abs().max().item()
                          for seed, ref in zip((1, 2), reference))
        pipe = models.pipeline().compile(vae=True, backend="aot_eager", fullgraph=True)  # a graph break raises
        first = pipe(**CALL, seed=1)
        assert fresh_dynamo["stats"]["unique_graphs"] == 2  # the UNet's blocks and the decoder (one 12-frame batch)
        with torch.compiler.set_stance("fail_on_recompile"):  # 2 steps x 2 windows again, other noise
            second = pipe(**CALL, seed=2)
    compiled_error = max((got - ref).abs().max().item() for got, ref in zip((first, second), reference))
    # this tiny random UNet amplifies rounding (GroupNorms over a few values at 2x2): eager float32 is 3.7e-4 off
    # float64 on the [0, 1] frame scale, the compiled graphs 2.9e-4
    assert eager_error < 1e-3 and compiled_error < 2 * eager_error
    assert (first - second).abs().max().item() > 1e-2  # the seeds do change the video


def test_compile_again_starts_from_the_original_blocks():
    pipe = tiny_sd15("v2").pipeline().compile(backend="eager").compile(backend="eager")
    assert pipe.unet.compiled_blocks._torchdynamo_orig_callable.__func__ is type(pipe.unet).run_blocks


def test_generate_compile_flag_compiles_once_per_base_model(tmp_path, monkeypatch, fresh_dynamo):
    """`vidsynth generate --compile` (and ModelSession(compile=True)): the video of the eager command, from one
    compile of the base model's UNet that later renders with other LoRAs reuse."""
    from tiny_files import write_tiny_files
    from vidsynth.cli import main
    from vidsynth.pipelines.core import VideoPipeline
    from vidsynth.render import ModelSession
    from vidsynth.video_io import load_video

    files = write_tiny_files(tmp_path / "files")
    compiled_unets = []
    compile_ = VideoPipeline.compile

    def compile_for_the_suite(pipe, **options):  # aot_eager instead of inductor's minutes of C++ builds
        compiled_unets.append(pipe.unet)
        return compile_(pipe, backend="aot_eager", **options)

    monkeypatch.setattr(VideoPipeline, "compile", compile_for_the_suite)
    args = ["generate", "--base", str(files["base"]), "--motion", str(files["motion"]), "--prompt", "a red fox",
            "--frames", "4", "--steps", "2", "--size", "64x64", "--device", "cpu", "--dtype", "float32"]
    assert main(args + ["-o", str(tmp_path / "eager")]) == 0 and not compiled_unets  # folders of PNG frames
    assert main(args + ["--compile", "-o", str(tmp_path / "compiled")]) == 0 and len(compiled_unets) == 1
    eager, compiled = (np.stack([np.asarray(f, dtype=np.float32) for f in load_video(tmp_path / name)])
                       for name in ("eager", "compiled"))
    assert eager.shape == (4, 64, 64, 3) and np.abs(eager - compiled).max() <= 1  # 8-bit: one level of rounding

    # a run-time MotionLoRA (forward hooks inside the compiled motion modules) put on after compiling
    call = dict(prompt="a red fox", num_frames=4, num_inference_steps=2, height=64, width=64, seed=3,
                progress_bar=False, output_type="pt")
    session, eager_session = ModelSession("cpu", "float32", compile=True), ModelSession("cpu", "float32")
    lora = [(files["motion_lora"], 0.5)]
    first = session.pipeline(files["base"], files["motion"])
    with torch.no_grad():
        plain = first(**call)
        pipe = session.pipeline(files["base"], files["motion"], lora)
        got, want = pipe(**call), eager_session.pipeline(files["base"], files["motion"], lora)(**call)
    # not the video without it (what stale compiled code gives), and as close to eager as this tiny model's rounding
    # allows: the LoRA moves frames by 0.19, compiled and eager are 9e-4 apart
    lora_effect, error = (want - plain).abs().max().item(), (got - want).abs().max().item()
    assert error < 2e-3 and error < 0.05 * lora_effect
    assert pipe.unet is first.unet and compiled_unets[1:] == [first.unet]  # one compile for the base model
