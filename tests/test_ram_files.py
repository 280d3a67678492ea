"""ram and ramplus_tl through files: epsilon by filter rules, the same bytes at any budget, workers and backend,
RAM+'s counting pass, and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.config import resolve
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_sce import within_ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write

# around the synthetic experts' median |delta| (~1.3e-3), so entries are changed by none, one or several experts
EPSILON = [{"filter": "mlp", "value": 0.0015}, {"value": 0.001}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=31, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, None], **SHAPE)


def models_config(fam: dict, method: str = "ramplus_tl", **params) -> dict:
    return {"merge_method": method, "base_model": str(fam["base"]),
            "models": [{"model": str(e)} for e in fam["experts"]],
            "parameters": {"epsilon": EPSILON, **params}}


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict, method: str) -> None:
    """Each tensor is merge_tensors' bytes with the epsilon its name resolves to, and within a bf16 ulp of the
    float64 oracle (mergekit's ram / ramplus_tl)."""
    extra = {"r": 0.4, "alpha": 0.5} if method == "ramplus_tl" else {}
    fusemerge.run(write(tmp_path, models_config(fam, method, **extra), "ram.yml"), tmp_path / "out", device="cpu")
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    experts = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(base)
    lone = 0
    for name, tensor in merged.items():
        eps = resolve(EPSILON, name, SHAPE["layers"])
        inputs = [e[name] for e in experts]
        expect = fusemerge.merge_tensors(base[name], inputs, method, epsilon=eps, **extra)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        terms = base[name].double().abs() + sum((x.double() - base[name].double()).abs() for x in inputs)
        plus = (0.4, 0.5) if method == "ramplus_tl" else None
        assert within_ulp(tensor, oracle.ram(base[name], inputs, eps, plus), torch.bfloat16, terms), name
        changed = sum(((x.float() - base[name].float()).abs() > eps).int() for x in inputs)
        lone += int((changed == 1).sum())
    assert lone > 1000  # the lone-change rule is exercised, not only the mean


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    """At a budget whose chunks are shorter than the larger tensors, RAM+'s counts and its merge read them in
    chunks: the same bytes as one worker at the default budget."""
    cfg = write(tmp_path, models_config(fam), "ram.yml")
    plan = merge_twice(tmp_path, cfg, "64KiB", backend)
    big = [t for t in plan.tensors if plan.kept_bytes(t) > plan.resident_bytes]
    assert big and all(plan.reads(t) == 2 for t in big)  # the counts, then the merge
    plain = fusemerge.build_plan(write(tmp_path, models_config(fam, "ram"), "plain.yml"), device="cpu",
                                 max_memory="64KiB", workers=2)
    assert all(plain.reads(t) == 1 for t in plain.tensors)  # ram needs no statistics


def test_parameters_are_checked(tmp_path: Path, fam: dict) -> None:
    assert_problem_named(tmp_path, models_config(fam, "ram"), lambda d: d["parameters"].update(r=0.3), "r")
    assert_problem_named(tmp_path, models_config(fam), lambda d: d["parameters"].update(alpha=-1), "alpha")
    assert_problem_named(tmp_path, models_config(fam),
                         lambda d: d["models"][0].update(parameters={"epsilon": 0.1}), "epsilon")
    assert_problem_named(tmp_path, models_config(fam),
                         lambda d: d["models"][1].update(parameters={"weight": 0.5}), "weight")
