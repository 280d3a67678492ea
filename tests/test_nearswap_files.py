"""nearswap through files: `models:` and `slices:` configs, gradients of t, chunking and backends, the config's
checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.config import resolve
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import (
    assert_listing_the_base_changes_nothing,
    assert_problem_named,
    merge_twice,
    plan_problems,
    write,
)

# the synthetic experts' entries lie ~0.002 from the base's: these t swap some entries whole and mix others
T_RULES = [{"filter": "self_attn", "value": [0.0005, 0.004, 0.001]}, {"value": 0.002}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=2, seed=6, shard_bytes=9000,
                             expert_shard_bytes=[14000, None], **SHAPE)


def models_config(fam: dict, t: object = None, **extra) -> dict:
    return {"merge_method": "nearswap", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["base"])}, {"model": str(fam["experts"][0])}],
            "parameters": {"t": T_RULES if t is None else t}, **extra}


def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict) -> None:
    fusemerge.run(write(tmp_path, models_config(fam), "nearswap.yml"), tmp_path / "out", device="cpu")
    merged, base, other = (load_model(p) for p in (tmp_path / "out", fam["base"], fam["experts"][0]))
    assert set(merged) == set(base)
    mixed = 0
    for name, tensor in merged.items():
        t = resolve(T_RULES, name, SHAPE["layers"])
        expect = fusemerge.merge_tensors(base[name], [other[name]], "nearswap", t=t)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.nearswap(base[name], other[name], t)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name
        mixed += int(((tensor != base[name]) & (tensor != other[name])).sum())
    assert mixed > 0  # not every entry is one model's or the other's


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    cfg = write(tmp_path, models_config(fam), "nearswap.yml")
    plan = merge_twice(tmp_path, cfg, "64KiB", backend)
    assert plan.chunk_elems < SHAPE["hidden"] * SHAPE["intermediate"]
    assert all(plan.reads(t) == 1 for t in plan.tensors)  # no statistics pass: each byte read once
    assert [m.path for m in plan.models] == [fam["experts"][0]]
    assert all(t.base is not None and len(t.inputs) == 1 for t in plan.tensors)


def test_the_base_need_not_be_listed(tmp_path: Path, fam: dict) -> None:
    assert_listing_the_base_changes_nothing(tmp_path, models_config(fam, t=0.003))


def test_slices_take_t_at_the_position_in_the_slice(tmp_path: Path, fam: dict) -> None:
    base, e1, e2 = str(fam["base"]), str(fam["experts"][0]), str(fam["experts"][1])
    data = {"merge_method": "nearswap", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": e1, "layer_range": [1, 3]}],
         "parameters": {"t": [0.001, 0.005]}},
        {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": e2, "layer_range": [0, 1]}]}],
        "parameters": {"t": 0.002}}
    fusemerge.run(write(tmp_path, data, "nearswap.yml"), tmp_path / "out", device="cpu")
    merged = load_model(tmp_path / "out")
    mb, m1, m2 = (load_model(p) for p in (fam["base"], fam["experts"][0], fam["experts"][1]))
    name = "model.layers.{}.mlp.down_proj.weight"
    for layer, a, b, t in [(0, mb[name.format(0)], m1[name.format(1)], 0.001),
                           (1, mb[name.format(1)], m1[name.format(2)], 0.005),
                           (2, mb[name.format(2)], m2[name.format(0)], 0.002)]:
        expect = fusemerge.merge_tensors(a, [b], "nearswap", t=t)
        assert torch.equal(merged[name.format(layer)].view(torch.int16), expect.view(torch.int16)), layer


def test_t_rules_that_leave_a_tensor_out_are_refused_in_plan(tmp_path: Path, fam: dict) -> None:
    data = models_config(fam, t=[{"filter": "self_attn", "value": 0.001}, {"filter": "mlp", "value": 0.003}])
    problems = plan_problems(tmp_path, data)
    assert any("tensor 'model.norm.weight': t has no value here (no filter rule matches it); give nearswap's t a "
               "rule without filter:" in p for p in problems), problems


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.pop("parameters"), "parameters.t: missing; nearswap needs t (the distance within which"),
    (lambda d: d.pop("base_model"), "base_model: missing; nearswap moves a base model's entries toward one"),
    (lambda d: d["models"].append({"model": "/elsewhere/e2"}), "nearswap mixes the base model and one other "
                                                                 "model, not 2 (as in mergekit)"),
    (lambda d: d["models"][1].update(parameters={"t": 0.5}), "models[1].parameters.t: t applies to the whole merge"),
    (lambda d: d["parameters"].update(weight=0.5), "parameters.weight: unknown parameter for nearswap"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    data = models_config(fam, t=0.5)
    assert_problem_named(tmp_path, data, change, fragment)
