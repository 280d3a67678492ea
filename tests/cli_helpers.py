"""What the command-line tests share: a tiny base + 2 experts with a TIES config, and a click runner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from fusemerge.cli import main
from fusemerge.synthetic import make_llama_family, write_config_yaml

SHAPE = dict(hidden=16, intermediate=40, layers=2, vocab=53)


def make_cli_family(root: Path) -> dict:
    """`make_llama_family` at SHAPE under root/models, plus root/ties.yml as fam["config"]."""
    fam = make_llama_family(root / "models", n_experts=2, seed=1, **SHAPE)
    fam["config"] = root / "ties.yml"
    write_config_yaml(fam["config"], "ties", fam["base"], fam["experts"], density=0.5)
    return fam


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])
