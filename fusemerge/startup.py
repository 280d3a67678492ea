"""Ctrl-C (and SIGTERM) during the `fusemerge` command's start-up: exit 130 (143) with one line, at once.

From the process's first line of fusemerge code until the command's own work begins (fusemerge/cli.py's
`_handle_errors`, once torch is imported), these signals end the process from their handler, with
`fusemerge: error: interrupted` (or `terminated (SIGTERM)`), instead of raising KeyboardInterrupt wherever the
interpreter happens to be. Raised there, it escaped as a traceback and a death by SIGINT (status -2) while the
command line was imported, aborted the process inside torch's import (pybind11: "terminate called after throwing an
instance of 'pybind11::error_already_set'", status -6), or, caught, still ended `python -m fusemerge` by SIGINT
(fusemerge/cli.py's `forget_caught_interrupt`). Nothing has been read or written yet, so there is nothing to keep:
no cleanup is skipped by exiting at once. This module imports nothing but the standard library's signal and os.
"""

from __future__ import annotations

import os
import signal
import sys

# what the command says and exits with when stopped by each signal (fusemerge/cli.py's `_handle_errors` too)
STOPPED = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}
_replaced: dict = {}  # signal -> the handler it gets back when start-up ends
_state = {"begun": False}


def _exit_at_once(signum, frame) -> None:
    how, code = STOPPED[signum]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or absent stream: nothing to flush
            pass
    os.write(2, f"fusemerge: error: {how}\n".encode())
    os._exit(code)


def begin() -> None:
    """Ctrl-C and SIGTERM exit at once from now until `end()`; once per process, from its main thread."""
    if _state["begun"]:
        return
    _state["begun"] = True
    for signum in STOPPED:
        # SIGINT ignored (a background job of a non-interactive shell, nohup) stays ignored
        if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
            continue
        _replaced[signum] = signal.signal(signum, _exit_at_once)


def after(signum: int, handler) -> None:
    """What `signum` gets when start-up ends (in place of the handler `begin()` replaced)."""
    if signum in _replaced:
        _replaced[signum] = handler
    else:
        signal.signal(signum, handler)


def active() -> bool:
    return bool(_replaced)


def end() -> None:
    """The command's work begins: the signals get their handlers back (Ctrl-C raises KeyboardInterrupt again)."""
    while _replaced:
        signum, handler = _replaced.popitem()
        signal.signal(signum, handler)
