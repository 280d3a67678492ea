"""Errors: what the user got wrong (exit 2) versus everything else (exit 1)."""

from __future__ import annotations


class FusemergeError(Exception):
    """A failure that is not the user's input (disk full, out of memory, a bug). CLI exit code 1."""

    exit_code = 1


class InputError(FusemergeError):
    """One or more problems with the user's input. CLI exit code 2, one line per problem.

    Every problem names the file, tensor or config key it is about, so a user can fix
    all of them in one go.
    """

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def raise_if(problems: list[str]) -> None:
    """Raise an InputError carrying every problem in `problems`, if there are any."""
    if problems:
        raise InputError(problems)
