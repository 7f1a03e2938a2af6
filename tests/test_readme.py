"""The README's snippets stay valid: the training YAML loads, the Python compiles, the commands exist."""
import re
import shlex
from pathlib import Path

from vidsynth.cli import build_parser
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
    parser = build_parser()
    for block in blocks("bash"):
        for line in block.splitlines():
            for command in re.findall(r"vidsynth (.+?)(?:\s+#.*)?$", line):
                parser.parse_args(shlex.split(command))
