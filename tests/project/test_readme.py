"""README's two set-up commands are the contract with a new user; CI must run the same one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    assert first_block, "README.md must start with a bash block holding the two set-up commands"
    assert text.index(first_block.group(0)) < text.index("\n## "), "the set-up block must come before any section"
    return [line.strip() for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    for cmd in commands:
        # A bare torch requirement resolves to a multi-GB CUDA build; pin the CPU file first.
        assert "torch==2.13.0" in cmd
    assert "diffmix " in install_and_run
    assert "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    test_command = _setup_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run must run README's test command verbatim: {test_command!r}"
