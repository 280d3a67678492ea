"""How a message names an option: as the command line spells it (`--max-memory 2GiB`, `--overwrite`) while a
`fusemerge` command runs, as the Python API does (`max_memory='2GiB'`, `overwrite=True`) everywhere else.

The command line sets the spelling for the command it runs (`spelled_for_cli`); it is one flag for the process,
so the messages of worker threads and forked worker processes follow it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_cli = False
_UNSET = object()
FLAGS = frozenset({"overwrite", "resume", "allow_nonfinite", "copy_tokenizer"})  # on / off, no value


@contextmanager
def spelled_for_cli() -> Iterator[None]:
    """Within the block, messages name options as the command line does."""
    global _cli
    before, _cli = _cli, True
    try:
        yield
    finally:
        _cli = before


def opt(name: str, value: object = _UNSET) -> str:
    """Option `name` (the API's keyword) as the caller spells it: with `value`, `--max-memory 2GiB` or
    `max_memory='2GiB'`; a flag, `--overwrite` or `overwrite=True`; else the bare name."""
    if _cli:
        return opt_name(name) + ("" if value is _UNSET else f" {value}")
    if name in FLAGS and value is _UNSET:
        return f"{name}=True"
    return name if value is _UNSET else f"{name}={value!r}"


def opt_name(name: str) -> str:
    """Option `name` itself, as the caller spells it: `--copy-tokenizer` or `copy_tokenizer`."""
    return f"--{name.replace('_', '-')}" if _cli else name


def run_command(out_dir: str | os.PathLike, *options: tuple[str, object]) -> str:
    """The command that merges into `out_dir` with `options` ((name, value) pairs; a flag's value is True),
    quoted: `` `fusemerge run CONFIG out --partition 1/2` `` or
    `` `fusemerge.run(config, 'out', partition='1/2')` ``."""
    if _cli:
        flags = "".join(f" {opt(n) if v is True else opt(n, v)}" for n, v in options)
        return f"`fusemerge run CONFIG {out_dir}{flags}`"
    keywords = "".join(f", {n}={v!r}" for n, v in options)
    return f"`fusemerge.run(config, {str(out_dir)!r}{keywords})`"


def finalize_command(out_dir: str | os.PathLike) -> str:
    """`` `fusemerge finalize out` `` or `` `fusemerge.finalize('out')` ``."""
    return f"`fusemerge finalize {out_dir}`" if _cli else f"`fusemerge.finalize({str(out_dir)!r})`"
