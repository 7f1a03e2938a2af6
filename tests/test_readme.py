"""The README's snippets stay valid: the training YAML loads, the Python compiles (the SDXL example runs in
test_sdxl_example.py, the LoRA one here on tiny files), the commands exist."""
import re
import shlex
from pathlib import Path

import torch

from vidsynth.cli import parse_args
from vidsynth.train.config import load_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_training_yaml_loads(tmp_path):
    (yaml_text,) = blocks("yaml")
    path = tmp_path / "zoom_in.yaml"
    path.write_text(yaml_text)
    config = load_config(path)
    assert config.max_steps == 2000 and config.learning_rate == 1e-4 and config.rank == 64


def test_python_snippets_compile():
    for code in blocks("python"):
        compile(code, "README.md", "exec")


def test_shell_commands_parse():
    for block in blocks("bash"):
        for line in block.splitlines():
            for command in re.findall(r"vidsynth (.+?)(?:\s+#.*)?$", line):
                parse_args(shlex.split(command))


def test_lora_snippet_runs_on_tiny_files(tmp_path, monkeypatch):
    from tiny_files import write_lora_files, write_tiny_files
    from vidsynth.manager import ModelManager

    (snippet,) = [code for code in blocks("python") if "load_lora" in code]
    tiny = write_tiny_files(tmp_path / "tiny")
    write_lora_files(tmp_path / "models" / "AnimateDiff")
    monkeypatch.chdir(tmp_path)
    manager = ModelManager(torch_dtype=torch.float32, device="cpu", file_path_list=[tiny["base"], tiny["motion"]])
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 7, 64)
    h = torch.randn(2 * 4, 32, 4, 4)
    site = manager.motion_modules.site("down_blocks.0.motion_modules.0")
    with torch.no_grad():
        unet_base, motion_base = manager.unet(x, t, context), site(h, 4)
        namespace = {"model_manager": manager}
        exec(snippet, namespace)
        zoom, pan, adapter = (namespace[name] for name in ("zoom", "pan", "adapter"))
        assert manager.loras == [zoom, adapter] and pan not in manager.loras
        assert (zoom.kind, zoom.alpha, adapter.kind, adapter.alpha) == ("motion_lora", 0.8, "domain_adapter", 1.0)
        assert not torch.allclose(manager.unet(x, t, context), unet_base, atol=1e-4)  # the adapter is on
        assert not torch.allclose(site(h, 4), motion_base, atol=1e-4)  # ZoomIn is on
        manager.set_lora_alpha(adapter, 0.0)
        manager.set_lora_alpha(zoom, 0.0)
        assert torch.equal(manager.unet(x, t, context), unet_base) and torch.equal(site(h, 4), motion_base)
