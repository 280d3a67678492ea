"""karcher through files: `models:` (with the base averaged in, listed or not, or no base) and `slices:` configs,
max_iter by filter rules, chunking, workers and backends, and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.config import resolve
from fusemerge.synthetic import make_llama_family
from tests.kernels.test_karcher import mergekits
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write

MAX_ITER = [{"filter": "mlp", "value": 0}, {"value": 10}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=7, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, 5000], **SHAPE)


def models_config(fam: dict, base: bool = True, **extra) -> dict:
    data = {"merge_method": "karcher", "models": [{"model": str(m)} for m in fam["experts"][:2]],
            "parameters": {"max_iter": MAX_ITER}, **extra}
    if base:
        data["base_model"] = str(fam["base"])
    return data


def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict) -> None:
    """The base (not listed) is averaged in after the models, as mergekit appends it; each tensor is
    merge_tensors' bytes and within a bf16 ulp of mergekit's iteration run in float64, and the mlp tensors'
    max_iter of 0 (the normalized average, scaled) is what they were merged with."""
    fusemerge.run(write(tmp_path, models_config(fam), "karcher.yml"), tmp_path / "out", device="cpu")
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    e1, e2 = (load_model(p) for p in fam["experts"][:2])
    assert set(merged) == set(base)
    stopped_early = 0
    for name, tensor in merged.items():
        max_iter = int(resolve(MAX_ITER, name, SHAPE["layers"]))
        inputs = [e1[name], e2[name], base[name]]
        expect = fusemerge.merge_tensors(None, inputs, "karcher", max_iter=max_iter)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = mergekits(inputs, max_iter=max_iter).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name
        if max_iter == 0:
            full = fusemerge.merge_tensors(None, inputs, "karcher")
            stopped_early += int(not torch.equal(full.view(torch.int16), tensor.view(torch.int16)))
    assert stopped_early > 0


def test_listing_the_base_or_leaving_it_out(tmp_path: Path, fam: dict) -> None:
    """Listed, the base is one model among the others, once (the same bytes as appended after them, up to the
    order of the sum); with no base_model, only the listed models are averaged."""
    listed = models_config(fam)
    listed["models"] = [{"model": str(fam["base"])}, *listed["models"]]
    fusemerge.run(write(tmp_path, listed, "listed.yml"), tmp_path / "listed", device="cpu")
    fusemerge.run(write(tmp_path, models_config(fam, base=False), "nobase.yml"), tmp_path / "nobase", device="cpu")
    merged, nobase, base = (load_model(p) for p in (tmp_path / "listed", tmp_path / "nobase", fam["base"]))
    e1, e2 = (load_model(p) for p in fam["experts"][:2])
    name = "model.layers.1.self_attn.q_proj.weight"
    want = fusemerge.merge_tensors(None, [base[name], e1[name], e2[name]], "karcher")
    assert torch.equal(merged[name].view(torch.int16), want.view(torch.int16))
    want = fusemerge.merge_tensors(None, [e1[name], e2[name]], "karcher")
    assert torch.equal(nobase[name].view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    cfg = write(tmp_path, models_config(fam), "karcher.yml")
    plan = merge_twice(tmp_path, cfg, "96KiB", backend)
    assert any(plan.reads(t) == 3 for t in plan.tensors)  # the angles' two passes, then the merge
    assert [m.path for m in plan.models] == [*fam["experts"][:2], fam["base"]]


def test_slices_average_each_slices_sources(tmp_path: Path, fam: dict) -> None:
    e1, e2, e3 = (str(p) for p in fam["experts"])
    data = {"merge_method": "karcher", "slices": [
        {"sources": [{"model": e1, "layer_range": [0, 2]}, {"model": e3, "layer_range": [1, 3]}]},
        {"sources": [{"model": e2, "layer_range": [2, 3]}, {"model": e1, "layer_range": [2, 3]}]}],
        "parameters": {"tol": 1e-6}}
    fusemerge.run(write(tmp_path, data, "karcher.yml"), tmp_path / "out", device="cpu")
    merged, m1, m2, m3 = (load_model(p) for p in (tmp_path / "out", *fam["experts"]))
    pairs = {"model.layers.1.mlp.up_proj.weight": (m1["model.layers.1.mlp.up_proj.weight"],
                                                   m3["model.layers.2.mlp.up_proj.weight"]),
             "model.layers.2.self_attn.o_proj.weight": (m2["model.layers.2.self_attn.o_proj.weight"],
                                                        m1["model.layers.2.self_attn.o_proj.weight"])}
    for name, inputs in pairs.items():
        expect = fusemerge.merge_tensors(None, list(inputs), "karcher", tol=1e-6)
        assert torch.equal(merged[name].view(torch.int16), expect.view(torch.int16)), name


def test_settings_by_rules_that_leave_a_tensor_out_take_the_defaults(tmp_path: Path, fam: dict) -> None:
    data = models_config(fam, parameters={"max_iter": [{"filter": "mlp", "value": 3}],
                                          "tol": [{"filter": "self_attn", "value": 1e-3}]})
    plan = fusemerge.build_plan(write(tmp_path, data, "rules.yml"), device="cpu")
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.1.mlp.up_proj.weight"].karcher == (3, 1e-5)
    assert by_name["model.layers.1.self_attn.q_proj.weight"].karcher == (10, 1e-3)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.update(parameters={"max_iter": [1, 4]}), "parameters.max_iter: max_iter is a whole number"),
    (lambda d: d.update(parameters={"max_iter": 2.5}), "parameters.max_iter: must be a whole number, not 2.5"),
    (lambda d: d.update(parameters={"max_iter": 20000}), "parameters.max_iter: 20000 is outside [0, 10000]"),
    (lambda d: d.update(parameters={"tol": -1.0}), "parameters.tol: -1.0 is outside [0, inf)"),
    (lambda d: d.update(parameters={"weight": 0.5}), "parameters.weight: unknown parameter for karcher"),
    (lambda d: d["models"][1].update(parameters={"tol": 0.1}), "models[1].parameters.tol: tol applies to the "
                                                               "whole merge"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    data = models_config(fam)
    assert_problem_named(tmp_path, data, change, fragment)
