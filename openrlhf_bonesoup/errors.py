"""User errors: the one exception type the CLI and the launchers print as one line (exit 2, no traceback),
and the argparse parser that raises it. Standard library only, so the lightest processes (Ray workers,
vLLM's) can raise it without importing numpy."""

from __future__ import annotations

import argparse


class BoneSoupError(ValueError):
    """Bad user input (preference, beta, matrix, checkpoint...): one line, shown without a traceback."""


class Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; we promise one line, under the sub-command's name.
    def error(self, message: str):  # type: ignore[override]
        error = BoneSoupError(message)
        error.prog = self.prog
        raise error
