"""Triton's interpreter, minus a repeated cost that does not change what it computes.

A kernel launch under TRITON_INTERPRET=1 patches triton.language (every builtin of tl, tl.math and tl.tensor,
found by inspect.getmembers) and restores it when the launch ends. Each call of a @triton.jit helper from inside
the kernel patches it again, though the launch already has: the builtins are by then the interpreter's wrappers,
which the second pass skips, so it only re-walks the modules. On the test suite's launches (small blocks, a few
helpers per program) that re-walk was ~40% of an interpreted launch (cProfile of
tests/streaming/test_pipeline.py::test_angle_weights_through_the_pipeline, triton 3.9).

`install()` skips a helper's patch while a launch is running that has already patched the modules the helper
sees: the first helper of a launch that sees another (Triton's own tl.sum and tl.cumsum see tl.core) is patched
as before, and the helpers after it that see the same modules are not. Where Triton's interpreter no longer has
the two names this relies on, it installs nothing and the tests run as slowly as before.
FUSEMERGE_TEST_PLAIN_INTERPRETER=1 turns it off.
"""

from __future__ import annotations

import inspect
import os


def _langs(fn, tl) -> frozenset[int]:
    """The triton.language modules visible from fn, as Triton's _patch_lang picks them."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def install() -> bool:
    """Whether the shortcut is now in place (False: turned off, or this Triton's interpreter is not the one it
    knows)."""
    if os.environ.get("FUSEMERGE_TEST_PLAIN_INTERPRETER", "0") not in ("", "0"):
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    real = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if getattr(real, "fusemerge_shortcut", False):
        return True  # installed already (the conftest, then a script that installs it too)
    if real is None or scope_type is None:
        return False
    launch: list[set[int]] = []  # the modules patched since the running launch began (empty: none running)

    def patch_lang(fn):
        langs = _langs(fn, tl)
        if launch:
            if langs <= launch[0]:
                return scope_type()  # a helper inside the launch: nothing that is not patched already
            launch[0].update(langs)
            return real(fn)
        scope = real(fn)
        launch.append(set(langs))
        restore = scope.restore

        def restore_and_end() -> None:
            try:
                restore()
            finally:
                launch.clear()

        scope.restore = restore_and_end
        return scope

    patch_lang.fusemerge_shortcut = True
    interpreter._patch_lang = patch_lang
    return True
