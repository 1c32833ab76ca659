"""Every command's ``--help`` (and its subcommands') is plain text: no reStructuredText markup from the
docstrings the descriptions come from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMANDS = [
    [str(BIN / "lstm-client")],
    *([str(BIN / "lstm-client"), sub] for sub in ("chat", "generate", "classify", "sessions")),
    [str(BIN / "lstm-train")],
    *([str(BIN / "lstm-train"), sub] for sub in ("charlm", "sentiment", "compact")),
    [str(BIN / "lstm-export")],
    [str(BIN / "lstm-server")],
    [sys.executable, "-m", "lstm_server.healthcheck"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(Path(part).name for part in command))
def test_help_has_no_rst_markup(command: list[str]) -> None:
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "``" not in done.stdout
