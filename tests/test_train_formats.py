"""The original AnimateDiff data and config formats: a WebVid-style CSV (videoid, name, page_dir) and the original
training YAML (configs/training/v1/training.yaml keys) mapped onto ours, key by key."""
from __future__ import annotations

import csv

import pytest
import torch

from test_train import moving_square, write_tiny_sd15_file
from vidsynth.cli import main as cli_main
from vidsynth.train import load_config
from vidsynth.video_io import save_video

pytestmark = pytest.mark.usefixtures("one_thread")


def webvid_folder(root):
    videos = root / "2M_val"
    videos.mkdir(parents=True)
    rows = [["videoid", "contentUrl", "duration", "page_dir", "name"]]
    for k, videoid in enumerate(("1001", "1002", "1003")):
        save_video(moving_square(3 * k, (255, 80 * k, 60)), videos / f"{videoid}.mp4", fps=8)
        rows.append([videoid, f"https://example.invalid/{videoid}.mp4", "PT00H00M10S", "001_050",
                     f"a bright square moving right, take {k}"])
    save_video(moving_square(0, (9, 9, 9)), videos / "1004.mp4", fps=8)
    rows.append(["1004", "https://example.invalid/1004.mp4", "PT00H00M10S", "001_050", ""])  # empty caption
    rows.append(["9999", "https://example.invalid/9999.mp4", "PT00H00M10S", "001_050", "never downloaded"])
    rows.append(["", "https://example.invalid/", "PT00H00M10S", "001_050", "no video id"])  # line 7
    csv_path = root / "results_2M_val.csv"
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return videos, csv_path


ORIGINAL_YAML = """\
image_finetune: false
output_dir: "{out}"
pretrained_model_path: "models/StableDiffusion/stable-diffusion-v1-5"
base: "{base}"
device: cpu
unet_additional_kwargs:
  use_motion_module              : true
  motion_module_resolutions      : [ 1,2,4,8 ]
  unet_use_cross_frame_attention : false
  unet_use_temporal_attention    : false
  motion_module_decoder_only     : false
  use_inflated_groupnorm         : true
  motion_module_mid_block        : false
  motion_module_type: Vanilla
  motion_module_kwargs:
    num_attention_heads                : 8
    num_transformer_block              : 1
    attention_block_types              : [ "Temporal_Self", "Temporal_Self" ]
    temporal_position_encoding         : true
    temporal_position_encoding_max_len : 16
    temporal_attention_dim_div         : 1
    zero_initialize                    : true
noise_scheduler_kwargs:
  num_train_timesteps: 1000
  beta_start:          0.00085
  beta_end:            0.012
  beta_schedule:       "linear"
  steps_offset:        1
  clip_sample:         false
train_data:
  csv_path:        "{csv}"
  video_folder:    "{videos}"
  sample_size:     64
  sample_stride:   1
  sample_n_frames: 8
validation_data:
  prompts: []
  num_inference_steps: 25
  guidance_scale: 8.
trainable_modules:
  - "motion_modules."
unet_checkpoint_path: ""
learning_rate:    1.e-4
train_batch_size: 1
gradient_accumulation_steps: 2
max_train_epoch:      -1
max_train_steps:      2
checkpointing_epochs: -1
checkpointing_steps:  200
validation_steps:       200
validation_steps_tuple: [2, 50]
global_seed: 42
mixed_precision_training: false
enable_xformers_memory_efficient_attention: True
is_debug: False
use_adamw8bit: False
"""


def test_original_training_yaml_with_a_webvid_csv_trains_and_says_what_it_honours(tmp_path, capsys):
    videos, csv_path = webvid_folder(tmp_path / "webvid")
    base, out = tmp_path / "tiny_sd15.safetensors", tmp_path / "run"
    write_tiny_sd15_file(base)
    path = tmp_path / "training.yaml"
    path.write_text(ORIGINAL_YAML.format(out=out, base=base, csv=csv_path, videos=videos))

    config = load_config(path)
    report = capsys.readouterr().err
    assert (config.data_root, config.captions) == (str(videos), str(csv_path))
    assert (config.frames, config.stride, config.size, config.batch_size, config.gradient_accumulation_steps) == \
        (8, 1, 64, 1, 2)
    assert (config.motion_version, config.new_motion_pe_length) == ("v3", 16)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("linear", 0.00085, 0.012)
    assert (config.max_steps, config.checkpoint_every, config.validation_every, config.seed) == (2, 200, 200, 42)
    assert (config.mixed_precision, config.caption_dropout, config.base) == ("no", 0.1, str(base))
    honoured, not_honoured = report.split("not honoured:")
    for key in ("train_data.csv_path -> captions", "train_data.sample_n_frames -> frames",
                "motion_module_kwargs.temporal_position_encoding_max_len", "trainable_modules", "max_train_epoch",
                "motion_module_kwargs.zero_initialize", "noise_scheduler_kwargs.beta_schedule -> beta_schedule"):
        assert key in honoured, key
    for key in ("pretrained_model_path", "noise_scheduler_kwargs.steps_offset", "validation_steps_tuple",
                "enable_xformers_memory_efficient_attention", "RandomHorizontalFlip"):
        assert key in not_honoured, key

    assert cli_main(["train", "motion-module", "--config", str(path)]) == 0
    assert torch.load(out / "motion_module.ckpt", weights_only=True)
    bad = (out / "bad_data.txt").read_text().splitlines()
    assert sorted(bad) == sorted([f"{(videos / '1004.mp4').resolve()}: missing caption (empty caption field)",
                                  f"{(videos / '9999').resolve()}: listed in the caption file but does not exist",
                                  f"{csv_path}: line 7: empty path (caption 'no video id')"])


def test_original_keys_that_cannot_be_honoured_are_named(tmp_path, capsys):
    path = tmp_path / "image_finetune.yaml"
    path.write_text("image_finetune: true\npretrained_model_path: sd15.safetensors\ntrainable_modules: ['.']\n"
                    "lr_scheduler: cosine\nnoise_scheduler_kwargs:\n  beta_schedule: scaled_linear\n"
                    "train_data:\n  csv_path: a.csv\n  video_folder: v\n  sample_size: 256\n")
    config = load_config(path)
    report = capsys.readouterr().err
    assert config.base == "sd15.safetensors" and config.beta_schedule == "scaled_linear" and config.size == 256
    assert "vidsynth train domain-adapter" in report
    not_honoured = report.split("not honoured:")[1]
    for key in ("image_finetune", "trainable_modules", "lr_scheduler: 'cosine'"):
        assert key in not_honoured, key
