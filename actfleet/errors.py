"""Errors that end a command with a one-line message and a documented exit code.

Exit codes (README "Exit codes"):
  0  success (converged, repaired, verified, nothing to do)
  1  the operation failed (API error after retries, terraform failure, verify found problems)
  2  bad input: configuration, command-line usage, missing or corrupt model/dataset files
  3  a prerequisite is missing (terraform, node, npm, a Python extra)
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING_PREREQ = 3


class ActfleetError(Exception):
    """An expected failure: the CLI prints `actfleet: <message>` on stderr and exits with `exit_code`."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ActfleetError):
    """A configuration value is wrong. The message names the key, the value and what is allowed."""

    exit_code = EXIT_BAD_INPUT


class InputError(ActfleetError):
    """A model directory, dataset or other input file is missing or corrupt."""

    exit_code = EXIT_BAD_INPUT


class PrerequisiteError(ActfleetError):
    """A program or package the command needs is not installed."""

    exit_code = EXIT_MISSING_PREREQ
