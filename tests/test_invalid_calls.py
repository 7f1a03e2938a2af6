"""Wrong calls across the public surface are refused with our error type, before any compute, and the message says
what is wrong and what to do instead.

One table: each row is a call, the error type it must raise (CLI rows: the exit status) and a pattern the message
must match, chosen to contain the fix (the valid range, the option to use, the command to run). Pipeline rows also
check that the UNet never ran.
"""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_models import tiny_sd15
from vidsynth import SDVideoPipeline, download
from vidsynth.cli import main as cli_main
from vidsynth.errors import CheckpointError, ConfigError, VidsynthError
from vidsynth.manager import ModelManager
from vidsynth.train import load_config
from vidsynth.video_io import save_video

FRAMES = np.zeros((2, 16, 16, 3), dtype=np.uint8)


class UNetSpy:
    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


@pytest.fixture(scope="module")
def models():
    return tiny_sd15("v2")


@pytest.fixture
def ctx(models, tmp_path, monkeypatch, capsys):
    pipe = models.pipeline()
    spy = UNetSpy(pipe.unet)
    pipe.unet = spy
    manager = ModelManager(torch_dtype=torch.float32, device="cpu")
    manager.models.update(unet=models.unet, vae=models.vae, text_encoder=models.text_encoders[0],
                          motion_modules=models.motion)
    manager.family = "sd15"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(download, "presets", lambda: download.parse_presets(
        {"presets": {"tiny": {"about": "x", "files": [{"path": "t/m.bin", "HuggingFace": "o/t"}]}}}))

    def run(**kwargs):
        args = dict(prompt="a fox", num_frames=8, num_inference_steps=2, height=64, width=64, progress_bar=False)
        return pipe(**(args | kwargs))

    def cli(*argv):
        try:
            code = cli_main(list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code
        return SimpleNamespace(code=code, message=capsys.readouterr().err)

    return SimpleNamespace(run=run, spy=spy, manager=manager, tmp=tmp_path, blocker=blocker, cli=cli)


def sdxl_kohya_lora(tmp):
    from safetensors.torch import save_file
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    path = tmp / "sdxl_style.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 2048), f"{stem}.lora_up.weight": torch.zeros(640, 4)}, path)
    return path


def yaml_config(tmp, text):
    path = tmp / "train.yaml"
    path.write_text(text)
    return path


LATENT = (1, 4, 8, 8, 8)
ROWS = [
    # ---- pipeline
    ("prompt list where one is expected", lambda c: c.run(prompt=["a fox", "a cat"], negative_prompt=["x"] * 3),
     ConfigError, r"negative_prompt.*(same|one|length|each)"),
    ("prompt not text", lambda c: c.run(prompt=42), ConfigError, r"prompt.*(str|text)"),
    ("NaN cfg", lambda c: c.run(cfg_scale=math.nan), ConfigError, r"cfg_scale.*finite"),
    ("infinite cfg", lambda c: c.run(cfg_scale=math.inf), ConfigError, r"cfg_scale.*finite"),
    ("height not a multiple of 8", lambda c: c.run(height=60), ConfigError, r"multiples of 8"),
    ("absurd width", lambda c: c.run(width=1 << 20), ConfigError, r"width.*(at most|too large|below)"),
    ("zero frames", lambda c: c.run(num_frames=0), ConfigError, r"num_frames.*(positive|at least 1|>= 1)"),
    ("negative frames", lambda c: c.run(num_frames=-4), ConfigError, r"num_frames.*(positive|at least 1|>= 1)"),
    ("fractional frames", lambda c: c.run(num_frames=2.5), ConfigError, r"num_frames.*integer"),
    ("zero steps", lambda c: c.run(num_inference_steps=0), ConfigError, r"steps must be an integer from 1"),
    ("negative steps", lambda c: c.run(num_inference_steps=-2), ConfigError, r"steps must be an integer from 1"),
    ("unknown sampler", lambda c: c.run(sampler="heun3"), ConfigError, r"choose one of .*ddim"),
    ("latents of the wrong shape", lambda c: c.run(latents=torch.zeros(1, 4, 3, 8, 8)), ConfigError,
     r"latents must have shape .*= \(1, 4, 8, 8, 8\)"),
    ("latents of an integer dtype", lambda c: c.run(latents=torch.zeros(LATENT, dtype=torch.int64)), ConfigError,
     r"latents.*float"),
    ("latents on a device with no data", lambda c: c.run(latents=torch.zeros(LATENT, device="meta")), ConfigError,
     r"latents must hold finite values on a real device"),
    ("latents with NaN", lambda c: c.run(latents=torch.full(LATENT, math.nan)), ConfigError, r"latents.*NaN"),
    ("context length above the module's", lambda c: c.run(num_frames=40, context_length=64), ConfigError,
     r"context_length.*(32|native)"),
    ("overlap as long as the window", lambda c: c.run(num_frames=40, context_length=16, context_overlap=16),
     ConfigError, r"context_overlap"),
    ("strength outside (0, 1]", lambda c: c.run(input_frames=FRAMES, denoising_strength=1.5), ConfigError,
     r"denoising_strength.*\(0, 1\]"),
    ("strength zero", lambda c: c.run(input_frames=FRAMES, denoising_strength=0.0), ConfigError,
     r"denoising_strength.*\(0, 1\]"),
    ("unknown keyword", lambda c: c.run(strenght=0.5), ConfigError, r"unexpected argument"),
    ("bad output type", lambda c: c.run(output_type="mp4"), ConfigError, r"output_type.*(pil|np|latent)"),
    # ---- ModelManager
    ("LoRA for the other family", lambda c: c.manager.load_lora(sdxl_kohya_lora(c.tmp)), CheckpointError,
     r"sdxl_style.safetensors.*(SD 1.5 vs SDXL|load the matching base)"),
    ("missing model file", lambda c: c.manager.load_models([c.tmp / "absent.safetensors"]), CheckpointError,
     r"absent.safetensors: no such file.*(check|download)"),
    ("torch_dtype not a dtype", lambda c: ModelManager(torch_dtype="half", device="cpu"), ConfigError,
     r"torch_dtype.*torch\.float16"),
    ("unknown LoRA for set_lora_alpha", lambda c: c.manager.set_lora_alpha("nope", 0.5), ConfigError,
     r"no loaded LoRA 'nope'; loaded"),
    ("pipeline from an empty manager",
     lambda c: SDVideoPipeline.from_model_manager(ModelManager(torch_dtype=torch.float32, device="cpu")), ConfigError,
     r"load a sd15 single-file checkpoint"),
    # ---- save_video
    ("unknown video extension", lambda c: save_video(FRAMES, c.tmp / "out.xyz"), ConfigError, r"use .*\.mp4"),
    ("folder cannot be made", lambda c: save_video(FRAMES, c.blocker / "sub" / "out.mp4"), VidsynthError,
     r"cannot create the folder .*choose a writable location"),
    ("zero fps", lambda c: save_video(FRAMES, c.tmp / "o.mp4", fps=0), ConfigError, r"fps must be a positive"),
    ("quality out of range", lambda c: save_video(FRAMES, c.tmp / "o.mp4", quality=11), ConfigError,
     r"between 0 .* and 10"),
    ("no frames", lambda c: save_video([], c.tmp / "o.mp4"), ConfigError, r"non-empty"),
    # ---- download
    ("unknown preset", lambda c: download.download_models(["tiny_v9"], c.tmp), ConfigError,
     r"tiny_v9.*(did you mean|tiny)"),
    ("unknown source", lambda c: download.download_models(["tiny"], c.tmp, sources=["Dropbox"]), ConfigError,
     r"use some of"),
    # ---- train
    ("unknown training key", lambda c: load_config(yaml_config(c.tmp, "learning_rat: 1e-4\n")), ConfigError,
     r"learning_rat"),
    ("training config missing", lambda c: load_config(c.tmp / "none.yaml"), ConfigError, r"does not exist"),
    # ---- CLI (exit status 2 and the message on stderr)
    ("CLI: inspect a missing file", lambda c: c.cli("inspect", str(c.tmp / "absent.ckpt")), 2, r"no such file"),
    ("CLI: unknown preset", lambda c: c.cli("download", "tiny_v9"), 2, r"tiny_v9.*did you mean tiny"),
    ("CLI: size that is not WxH", lambda c: c.cli("generate", "--prompt", "x", "--size", "big"), 2,
     r"512x512"),
    ("CLI: unknown training stage", lambda c: c.cli("train", "everything", "--config", "x.yaml"), 2,
     r"domain-adapter"),
]


@pytest.mark.parametrize("call,error,message", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_invalid_call_is_refused_saying_what_to_do(ctx, call, error, message):
    if isinstance(error, int):
        result = call(ctx)
        assert result.code == error, result
        assert re.search(message, result.message), result.message
        return
    with pytest.raises(error, match=message):
        call(ctx)
    assert ctx.spy.calls == 0  # refused before any denoising


def test_the_table_covers_every_surface():
    surfaces = {"pipeline": 0, "ModelManager": 0, "save_video": 0, "download": 0, "train": 0, "CLI": 0}
    section = None
    for name, call, *_ in ROWS:
        code = call.__code__.co_names
        section = ("CLI" if name.startswith("CLI") else "save_video" if "save_video" in code else
                   "download" if "download" in code else "train" if "load_config" in code else
                   "ModelManager" if {"manager", "ModelManager"} & set(code) else "pipeline")
        surfaces[section] += 1
    assert len(ROWS) >= 25 and all(surfaces.values()), surfaces
