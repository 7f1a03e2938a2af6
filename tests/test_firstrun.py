"""One command to a first video: preset names for --base / --motion, the default models downloaded on first use
(from a local stand-in for Hugging Face serving tiny random files), one clear error when offline, `python -m
vidsynth`, and the README's two set-up commands in a fresh virtual environment."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import huggingface_hub.constants
import pytest

from fake_hub import ModelHub, preset_table
from tiny_files import write_tiny_files
from vidsynth import download
from vidsynth.cli import main
from vidsynth.errors import ConfigError
from vidsynth.video_io import video_info

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "32x32", "--frames", "2", "--steps", "1", "--device", "cpu"]  # keeps a CPU render to seconds
SD_PATH, MM_PATH = "stable_diffusion/v1-5-pruned-emaonly.safetensors", "AnimateDiff/mm_sd_v15_v2.ckpt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def hub(tiny, tmp_path, monkeypatch):
    """The shipped presets' names and paths, their files served by a local hub (the shipped table's sizes and
    hashes are those of the real files, so a test table stands in through VIDSYNTH_PRESETS)."""
    server = ModelHub({("test/sd15", "v1-5-pruned-emaonly.safetensors"): tiny["base"].read_bytes(),
                       ("test/animatediff", "mm_sd_v15_v2.ckpt"): tiny["motion"].read_bytes()})
    table = preset_table(tmp_path / "presets.yaml", {
        "sd-v1-5": (["StableDiffusion_v15"], SD_PATH, "test/sd15", "v1-5-pruned-emaonly.safetensors"),
        "animatediff-v2": (["AnimateDiff_v2"], MM_PATH, "test/animatediff", "mm_sd_v15_v2.ckpt")})
    env = {"HF_ENDPOINT": server.url, "VIDSYNTH_PRESETS": str(table), "HF_HOME": str(tmp_path / "hf_home"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VIDSYNTH_MODELS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    yield server
    server.close()


def test_generate_without_model_arguments_downloads_sd15_and_v2_once(hub, tiny, tmp_path, capsys):
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--prompt", "a red fox running in the snow", "-o", str(out), *SMALL]) == 0
    models = tmp_path / "models"
    assert (models / SD_PATH).read_bytes() == tiny["base"].read_bytes()
    assert (models / MM_PATH).read_bytes() == tiny["motion"].read_bytes()
    assert video_info(out)["frames"] == 2
    served = len(hub.requests)
    assert served >= 2 and str(out) in capsys.readouterr().out
    assert main(["generate", "--prompt", "again", "-o", str(tmp_path / "again.gif"), *SMALL]) == 0
    assert len(hub.requests) == served  # in place: nothing fetched a second time


def test_preset_names_and_files_mix(hub, tiny, tmp_path):
    out = tmp_path / "mixed.gif"
    assert main(["generate", "--base", "StableDiffusion_v15", "--motion", str(tiny["motion"]), "--prompt", "p",
                 "-o", str(out), *SMALL]) == 0
    assert (tmp_path / "models" / SD_PATH).is_file() and not (tmp_path / "models" / MM_PATH).exists()
    # a base file without --motion takes the motion module of its family
    assert main(["generate", "--base", str(tiny["base"]), "--prompt", "p", "-o", str(out), *SMALL]) == 0
    assert (tmp_path / "models" / MM_PATH).is_file()
    with pytest.raises(ConfigError, match="did you mean the preset animatediff-v2"):
        download.locate_models(["animatediff-v3x"], tmp_path / "models")
    with pytest.raises(ConfigError, match="no such file"):
        download.locate_models(["missing.safetensors"], tmp_path / "models")


def test_offline_with_nothing_in_place_is_one_error_naming_files_and_command(hub, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    start = time.monotonic()
    assert main(["generate", "--prompt", "p", "-o", str(tmp_path / "x.mp4"), *SMALL]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert err.count("vidsynth: error:") == 1 and "Traceback" not in err
    assert str((tmp_path / "models" / SD_PATH).resolve()) in err and str((tmp_path / "models" / MM_PATH).resolve()) in err
    assert f"vidsynth download sd-v1-5 animatediff-v2 --models-dir models" in err
    assert f"{dead}/test/sd15/resolve/main/v1-5-pruned-emaonly.safetensors" in err
    assert not (tmp_path / "x.mp4").exists()


def test_python_dash_m_vidsynth_is_the_command():
    run = subprocess.run([sys.executable, "-m", "vidsynth", "download", "--list"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "AnimateDiff_v2" in run.stdout and "StableDiffusion_v15" in run.stdout


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, re.S)]
    return [block for block in blocks if block.startswith("pip install")]  # the set-up commands


def test_readme_setup_commands_in_a_fresh_venv(hub, tmp_path):
    """The README's two commands, as written, in a new virtual environment on a copy of the project. The venv sees
    this environment's installed packages (a .pth line, like --system-site-packages) and pip is kept off the network
    (PIP_NO_INDEX), so `pip install` only installs vidsynth; the models come from the local hub. Two appended options
    shrink the render (`--size 32x32 --frames 2 --steps 1`) and the test run is one test file, not the whole suite
    from inside itself."""
    first, second = readme_commands()
    assert re.fullmatch(r'pip install -e \. && vidsynth generate --prompt "[^"]+" -o fox\.mp4', first), first
    assert second.startswith("pip install torch==") and second.endswith("python -m pytest -q"), second
    project = tmp_path / "vidsynth"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "src", "tests"):
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, project / name, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                                        if source.is_dir() else {}))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    (purelib / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for old in [*purelib.glob("setuptools*"), *purelib.glob("_distutils_hack"), *purelib.glob("distutils-*.pth")]:
        # ensurepip's setuptools is older than pyproject's build requirement: the outer one (>= 77) builds instead,
        # as pip's isolated build would fetch one
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir),
           "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "VIDSYNTH_SHARED": str(Path(os.environ.get("VIDSYNTH_SHARED", REPO.parent / "shared")))}
    env.pop("PYTHONPATH", None)

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                              timeout=900)

    run = sh(f"{first} {shlex.join(SMALL)}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert video_info(project / "fox.mp4")["frames"] == 2
    assert (project / "models" / SD_PATH).is_file() and (project / "models" / MM_PATH).is_file()
    located = sh("python -c 'import vidsynth; print(vidsynth.__file__)'").stdout
    assert located.startswith(str(project / "src")), located  # the fresh install, not the outer one
    run = sh(second.replace("python -m pytest -q", "python -m pytest -q -p no:cacheprovider tests/test_readme.py"))
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
