"""Messages name options as the caller spells them: `--max-memory` on the command line, `max_memory` through the
Python API (fusemerge/options.py); `run(plan=...)` refuses the options the plan already fixes; `seed` must be an
integer on every path."""

from __future__ import annotations

from pathlib import Path

import pytest

import fusemerge
from fusemerge import options
from fusemerge.errors import InputError
from tests.cli_helpers import invoke, make_cli_family


@pytest.fixture()
def fam(tmp_path: Path) -> dict:
    return make_cli_family(tmp_path)


def test_the_same_problem_in_each_spelling(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = invoke("run", fam["config"], out, "--device", "tpu", "--workers", "0", "--partition", "5/2")
    assert r.exit_code == 2
    for cli in ("--device tpu: expected", "--workers 0: must be", "--partition 5/2: I must be"):
        assert cli in r.stderr, (cli, r.stderr)
    r = invoke("run", fam["config"], out)
    assert r.exit_code == 2 and "pass --overwrite to replace it" in r.stderr, r.stderr
    with pytest.raises(InputError) as e:
        fusemerge.run(fam["config"], out, device="tpu", workers=0, partition="5/2")
    text = "\n".join(e.value.problems)
    for api in ("device='tpu': expected", "workers=0: must be", "partition='5/2': I must be"):
        assert api in text, (api, text)
    assert "--" not in text.replace(str(out), "")
    with pytest.raises(InputError, match="pass overwrite=True to replace it"):
        fusemerge.run(fam["config"], out)


def test_the_command_line_spelling_ends_with_its_command(fam: dict) -> None:
    assert invoke("plan", fam["config"], "--max-memory", "0").exit_code == 2
    assert not options._cli
    with pytest.raises(InputError, match=r"^max_memory: invalid size"):
        fusemerge.build_plan(fam["config"], max_memory="0")
    assert options.opt("resume") == "resume=True" and options.opt("seed", 3) == "seed=3"
    with options.spelled_for_cli():
        assert options.opt("resume") == "--resume" and options.opt("seed", 3) == "--seed 3"
        assert options.run_command("out", ("partition", "1/2"), ("resume", True)) == \
            "`fusemerge run CONFIG out --partition 1/2 --resume`"
    assert options.run_command("out", ("partition", "1/2")) == "`fusemerge.run(config, 'out', partition='1/2')`"
    assert options.finalize_command("out") == "`fusemerge.finalize('out')`"


def test_run_with_a_plan_refuses_the_plans_options(fam: dict, tmp_path: Path) -> None:
    """They were dropped without a word: seed=7 with plan= merged with the plan's seed 0."""
    plan = fusemerge.build_plan(fam["config"], device="cpu")
    with pytest.raises(InputError, match=r"run: seed, max_memory given with plan=|run: max_memory, seed given"):
        fusemerge.run(fam["config"], tmp_path / "out", plan=plan, seed=7, max_memory="1GiB")
    assert not (tmp_path / "out").exists()
    result = fusemerge.run(fam["config"], tmp_path / "out", plan=plan, device="auto")  # the defaults: fine
    assert result.plan is plan and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("seed", ["1", 1.5, True, None])
def test_a_seed_that_is_not_an_integer_is_refused(fam: dict, seed) -> None:
    """1.5 or "1" keyed other DARE masks than 1 would; True is not a seed."""
    with pytest.raises(InputError, match=r"seed=.*: expected an integer"):
        fusemerge.build_plan(fam["config"], seed=seed)


def test_run_takes_max_pinned_memory(fam: dict, tmp_path: Path) -> None:
    """As build_plan and `run --max-pinned-memory` do (a TypeError before)."""
    with pytest.raises(InputError, match=r"^max_pinned_memory: invalid size"):
        fusemerge.run(fam["config"], tmp_path / "out", max_pinned_memory="lots")
