"""The README's code blocks run as written: Python blocks top to bottom, and every `optim4rl`
command line in its shell blocks parses (the quick start's main job is also run, shortened)."""

import re
import shlex
from pathlib import Path

import pytest

from optim4rl import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    if not README.exists():
        pytest.skip("installed from a wheel: no README.md beside the package")
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_blocks_run_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks("python") if "optim4rl.torch" not in b]
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})


def test_pytorch_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks("python") if "optim4rl.torch" in b]
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "optim4rl":
                    commands.append(words[1:])
    return commands


def test_shell_commands_parse():
    commands = _commands()
    assert commands
    for argv in commands:
        cli.build_parser().parse_args(argv)


def test_quick_start_main_job_runs(tmp_path, capsys):
    argv = _commands()[0]
    assert argv[0] == "train"
    assert cli.main([*argv, "--steps", "2560", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "learning_curve.png").exists()
    assert "mean score" in capsys.readouterr().out
