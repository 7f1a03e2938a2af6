"""DiffSynth-Studio 1.1.9's AnimateDiff example programs, run with only the import renamed and CPU-sized numbers, on
full-size random files in the real layouts at the paths the programs use (their ``download_models`` call finds the
files in place and does not touch the network).

The programs are kept as DiffSynth ships them (examples/video_synthesis/sd_text_to_video.py, sdxl_text_to_video.py,
examples/Diffutoon/sd_toon_shading.py); each substitution below is asserted, so a drifted copy fails loudly.
Costly: the SD 1.5 files are loaded from float16 random weights into bfloat16 (this CPU's fast dtype; ~2 GB),
SDXL's into ~7 GB.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidsynth import save_video
from vidsynth.video_io import video_info

SD_TEXT_TO_VIDEO = '''from diffsynth import ModelManager, SDImagePipeline, SDVideoPipeline, save_video, download_models
import torch


# Download models (automatically)
# `models/stable_diffusion/dreamshaper_8.safetensors`: [link](https://civitai.com/api/download/models/128713?type=Model&format=SafeTensor&size=pruned&fp=fp16)
# `models/AnimateDiff/mm_sd_v15_v2.ckpt`: [link](https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt)
download_models(["DreamShaper_8", "AnimateDiff_v2"])

# Load models
model_manager = ModelManager(torch_dtype=torch.float16, device="cuda")
model_manager.load_models([
    "models/stable_diffusion/dreamshaper_8.safetensors",
    "models/AnimateDiff/mm_sd_v15_v2.ckpt",
])

# Text -> Image
pipe_image = SDImagePipeline.from_model_manager(model_manager)
torch.manual_seed(0)
image = pipe_image(
    prompt = "lightning storm, sea",
    negative_prompt = "",
    cfg_scale=7.5,
    num_inference_steps=30, height=512, width=768,
)

# Text + Image -> Video (6GB VRAM is enough!)
pipe = SDVideoPipeline.from_model_manager(model_manager)
output_video = pipe(
    prompt = "lightning storm, sea",
    negative_prompt = "",
    cfg_scale=7.5,
    num_frames=64,
    num_inference_steps=10, height=512, width=768,
    animatediff_batch_size=16, animatediff_stride=1, input_frames=[image]*64, denoising_strength=0.9,
)

# Save images and video
save_video(output_video, "output_video.mp4", fps=30)
'''

SDXL_TEXT_TO_VIDEO = '''from diffsynth import ModelManager, SDXLVideoPipeline, save_video, download_models
import torch


# Download models (automatically)
# `models/stable_diffusion_xl/sd_xl_base_1.0.safetensors`: [link](https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors)
# `models/AnimateDiff/mm_sdxl_v10_beta.ckpt`: [link](https://huggingface.co/guoyww/animatediff/resolve/main/mm_sdxl_v10_beta.ckpt)
download_models(["StableDiffusionXL_v1", "AnimateDiff_xl_beta"])

model_manager = ModelManager(torch_dtype=torch.float16, device="cuda")
model_manager.load_models([
    "models/stable_diffusion_xl/sd_xl_base_1.0.safetensors",
    "models/AnimateDiff/mm_sdxl_v10_beta.ckpt"
])
pipe = SDXLVideoPipeline.from_model_manager(model_manager)

prompt = "A panda standing on a surfboard in the ocean in sunset, 4k, high resolution.Realistic, Cinematic, high resolution"
negative_prompt = ""

torch.manual_seed(0)
video = pipe(
    prompt=prompt,
    negative_prompt=negative_prompt,
    cfg_scale=8.5,
    height=1024, width=1024, num_frames=16,
    num_inference_steps=100,
)
save_video(video, "output_video.mp4", fps=16)
'''

SD_TOON_SHADING = '''from diffsynth import ModelManager, SDVideoPipeline, ControlNetConfigUnit, VideoData, save_video, download_models
import torch


# Download models (automatically)
# `models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors`: [link](https://civitai.com/api/download/models/266360?type=Model&format=SafeTensor&size=pruned&fp=fp16)
# `models/AnimateDiff/mm_sd_v15_v2.ckpt`: [link](https://huggingface.co/guoyww/animatediff/resolve/main/mm_sd_v15_v2.ckpt)
# `models/ControlNet/control_v11p_sd15_lineart.pth`: [link](https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_lineart.pth)
# `models/ControlNet/control_v11f1e_sd15_tile.pth`: [link](https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11f1e_sd15_tile.pth)
# `models/Annotators/sk_model.pth`: [link](https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model.pth)
# `models/Annotators/sk_model2.pth`: [link](https://huggingface.co/lllyasviel/Annotators/resolve/main/sk_model2.pth)
# `models/textual_inversion/verybadimagenegative_v1.3.pt`: [link](https://civitai.com/api/download/models/25820?type=Model&format=PickleTensor&size=full&fp=fp16)
download_models([
    "Flat2DAnimerge_v45Sharp",
    "AnimateDiff_v2",
    "ControlNet_v11p_sd15_lineart",
    "ControlNet_v11f1e_sd15_tile",
    "TextualInversion_VeryBadImageNegative_v1.3"
])

# Load models
model_manager = ModelManager(torch_dtype=torch.float16, device="cuda")
model_manager.load_textual_inversions("models/textual_inversion")
model_manager.load_models([
    "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors",
    "models/AnimateDiff/mm_sd_v15_v2.ckpt",
    "models/ControlNet/control_v11p_sd15_lineart.pth",
    "models/ControlNet/control_v11f1e_sd15_tile.pth",
])
pipe = SDVideoPipeline.from_model_manager(
    model_manager,
    [
        ControlNetConfigUnit(
            processor_id="lineart",
            model_path="models/ControlNet/control_v11p_sd15_lineart.pth",
            scale=0.5
        ),
        ControlNetConfigUnit(
            processor_id="tile",
            model_path="models/ControlNet/control_v11f1e_sd15_tile.pth",
            scale=0.5
        )
    ]
)

# Load video (we only use 60 frames for quick testing)
# The original video is here: https://www.bilibili.com/video/BV19w411A7YJ/
video = VideoData(
    video_file="data/examples/bilibili/BV19w411A7YJ.mp4",
    height=1024, width=1024)
input_video = [video[i] for i in range(40*60, 41*60)]

# Toon shading (20G VRAM)
torch.manual_seed(0)
output_video = pipe(
    prompt="best quality, perfect anime illustration, light, a girl is dancing, smile, solo",
    negative_prompt="verybadimagenegative_v1.3",
    cfg_scale=3, clip_skip=2,
    controlnet_frames=input_video, num_frames=len(input_video),
    num_inference_steps=10, height=1024, width=1024,
    animatediff_batch_size=32, animatediff_stride=16,
    vram_limit_level=0,
)

# Save video
save_video(output_video, "output_video.mp4", fps=60)
'''

CPU = {'from diffsynth import': 'from vidsynth import',
       'torch_dtype=torch.float16, device="cuda"': 'torch_dtype=torch.bfloat16, device="cpu"'}


def cpu_sized(program: str, changes: dict[str, str]) -> str:
    for old, new in {**CPU, **changes}.items():
        assert old in program, f"the example no longer contains {old!r}"
        program = program.replace(old, new)
    return program


def place(root: Path, files: dict[str, Path]) -> None:
    for relative, target in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).symlink_to(target)


def run(program: str, root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    exec(compile(program, "diffsynth_example.py", "exec"), {})
    return video_info(root / "output_video.mp4")


def test_sd_text_to_video(full_checkpoint, tmp_path, monkeypatch):
    place(tmp_path, {"models/stable_diffusion/dreamshaper_8.safetensors":
                     full_checkpoint("v1-5-pruned-emaonly.safetensors", dtype="float16"),
                     "models/AnimateDiff/mm_sd_v15_v2.ckpt": full_checkpoint("mm_sd_v15_v2.ckpt", dtype="float16")})
    program = cpu_sized(SD_TEXT_TO_VIDEO, {
        "num_inference_steps=30, height=512, width=768": "num_inference_steps=2, height=64, width=96",
        "num_frames=64,\n    num_inference_steps=10, height=512, width=768":
            "num_frames=6,\n    num_inference_steps=3, height=64, width=96",
        "input_frames=[image]*64": "input_frames=[image]*6"})
    info = run(program, tmp_path, monkeypatch)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (6, 96, 64, 30)


def test_sdxl_text_to_video(full_checkpoint, tmp_path, monkeypatch):
    place(tmp_path, {"models/stable_diffusion_xl/sd_xl_base_1.0.safetensors":
                     full_checkpoint("sd_xl_base_1.0.safetensors", dtype="float16"),
                     "models/AnimateDiff/mm_sdxl_v10_beta.ckpt":
                     full_checkpoint("mm_sdxl_v10_beta.ckpt", dtype="float16")})
    program = cpu_sized(SDXL_TEXT_TO_VIDEO, {"height=1024, width=1024, num_frames=16,\n    num_inference_steps=100":
                                             "height=64, width=64, num_frames=3,\n    num_inference_steps=2"})
    info = run(program, tmp_path, monkeypatch)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (3, 64, 64, 16)


def test_sd_toon_shading(full_checkpoint, tmp_path, monkeypatch):
    place(tmp_path, {
        "models/stable_diffusion/flat2DAnimerge_v45Sharp.safetensors":
            full_checkpoint("v1-5-pruned-emaonly.safetensors", dtype="float16"),
        "models/AnimateDiff/mm_sd_v15_v2.ckpt": full_checkpoint("mm_sd_v15_v2.ckpt", dtype="float16"),
        "models/ControlNet/control_v11p_sd15_lineart.pth":
            full_checkpoint("control_v11p_sd15_lineart.pth", dtype="float16"),
        "models/ControlNet/control_v11f1e_sd15_tile.pth":
            full_checkpoint("control_v11f1e_sd15_tile.pth", dtype="float16"),
        "models/Annotators/sk_model.pth": full_checkpoint("sk_model.pth"),
        "models/Annotators/sk_model2.pth": full_checkpoint("sk_model2.pth"),
        "models/textual_inversion/verybadimagenegative_v1.3.pt": full_checkpoint("verybadimagenegative_v1.3.pt"),
    })
    rng = np.random.default_rng(0)
    clip = np.stack([np.roll(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), 3 * i, axis=1) for i in range(10)])
    save_video(clip, tmp_path / "data/examples/bilibili/BV19w411A7YJ.mp4", fps=30)
    program = cpu_sized(SD_TOON_SHADING, {
        "height=1024, width=1024)": "height=64, width=64)",
        "range(40*60, 41*60)": "range(2, 8)",
        "num_inference_steps=10, height=1024, width=1024": "num_inference_steps=2, height=64, width=64",
        "animatediff_batch_size=32, animatediff_stride=16": "animatediff_batch_size=4, animatediff_stride=2"})
    info = run(program, tmp_path, monkeypatch)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (6, 64, 64, 60)
