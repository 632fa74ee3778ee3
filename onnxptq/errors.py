"""Errors that reach the user as one line and an exit code, never as a traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUDGET = 1
EXIT_BAD_INPUT = 2


class OnnxptqError(Exception):
    """Base of the errors the CLI prints as ``error: <message>`` and exits with ``exit_code``."""

    exit_code = EXIT_BAD_INPUT


class InputError(OnnxptqError):
    """Bad input (file, model, data, option): the message says what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT


class BudgetError(OnnxptqError):
    """The compiled model missed a quality budget the user set (it is still written)."""

    exit_code = EXIT_BUDGET
