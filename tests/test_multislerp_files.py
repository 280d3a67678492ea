"""multislerp through files: with and without a base_model, weights by gradients, `slices:`, chunking, workers and
backends, and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.config import resolve
from fusemerge.synthetic import make_llama_family
from tests.kernels.test_multislerp import mergekits
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write

WEIGHTS = [1.0, [0.2, 2.0], 0.5]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=9, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, 5000], **SHAPE)


def models_config(fam: dict, base: bool = True, **extra) -> dict:
    data = {"merge_method": "multislerp",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(fam["experts"], WEIGHTS,
                                                                                      strict=True)], **extra}
    if base:
        data["base_model"] = str(fam["base"])
    return data


@pytest.mark.parametrize("base", [True, False])
def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict, base: bool) -> None:
    fusemerge.run(write(tmp_path, models_config(fam, base), "multislerp.yml"), tmp_path / "out", device="cpu")
    merged, mb = load_model(tmp_path / "out"), load_model(fam["base"])
    xs = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(mb)
    for name, tensor in merged.items():
        w = [float(resolve(v, name, SHAPE["layers"])) for v in WEIGHTS]
        b = mb[name] if base else None
        expect = fusemerge.merge_tensors(b, [x[name] for x in xs], "multislerp", weight=w)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = mergekits([x[name] for x in xs], w, b).reshape(tensor.shape)
        # + 1e-9: with a base, base + sum w_i d_i rounds twice in float32, which shows where the result is near 0
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16) + 1e-9).all()), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    cfg = write(tmp_path, models_config(fam, parameters={"normalize_weights": False, "eps": 1e-6}), "multislerp.yml")
    plan = merge_twice(tmp_path, cfg, "96KiB", backend)
    assert any(plan.reads(t) == 3 for t in plan.tensors)  # max |v|, the sums, the merge
    assert [m.path for m in plan.models] == list(fam["experts"])
    assert all(t.base is not None and len(t.inputs) == 3 and t.eps == 1e-6 and not t.normalize
               for t in plan.tensors)


def test_settings_by_rules_that_leave_a_tensor_out_take_the_defaults(tmp_path: Path, fam: dict) -> None:
    data = models_config(fam, parameters={"eps": [{"filter": "mlp", "value": 1e-3}],
                                          "normalize_weights": [{"filter": "self_attn", "value": False}]})
    plan = fusemerge.build_plan(write(tmp_path, data, "rules.yml"), device="cpu")
    by_name = {t.name: t for t in plan.tensors}
    mlp, attn = by_name["model.layers.1.mlp.up_proj.weight"], by_name["model.layers.1.self_attn.q_proj.weight"]
    assert (mlp.eps, mlp.normalize) == (1e-3, True) and (attn.eps, attn.normalize) == (1e-8, False)


def test_the_base_listed_is_the_base(tmp_path: Path, fam: dict) -> None:
    data = models_config(fam)
    data["models"].insert(1, {"model": str(fam["base"])})
    fusemerge.run(write(tmp_path, data, "listed.yml"), tmp_path / "a", device="cpu")
    fusemerge.run(write(tmp_path, models_config(fam), "unlisted.yml"), tmp_path / "b", device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_slices_interpolate_each_slices_sources(tmp_path: Path, fam: dict) -> None:
    e1, e2, e3 = (str(p) for p in fam["experts"])
    data = {"merge_method": "multislerp", "slices": [
        {"sources": [{"model": e1, "layer_range": [0, 2], "parameters": {"weight": 2.0}},
                     {"model": e3, "layer_range": [1, 3]}, {"model": e2, "layer_range": [0, 2]}]}]}
    fusemerge.run(write(tmp_path, data, "multislerp.yml"), tmp_path / "out", device="cpu")
    merged, m1, m2, m3 = (load_model(p) for p in (tmp_path / "out", *fam["experts"]))
    inputs = [m1["model.layers.1.mlp.up_proj.weight"], m3["model.layers.2.mlp.up_proj.weight"],
              m2["model.layers.1.mlp.up_proj.weight"]]
    expect = fusemerge.merge_tensors(None, inputs, "multislerp", weight=[2.0, 1.0, 1.0])
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"].view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: [d["models"][i]["parameters"].update(weight=w) for i, w in ((0, -1.0), (1, 0.5))],
     "the weights resolve to [-1.0, 0.5, 0.5], which add up to 0, and normalize_weights is true"),
    (lambda d: d.update(parameters={"eps": -1.0}), "parameters.eps: -1.0 is outside [0, inf)"),
    (lambda d: d.update(parameters={"normalize_weights": "yes"}),
     "parameters.normalize_weights: must be true or false"),
    (lambda d: d.update(parameters={"density": 0.5}), "parameters.density: unknown parameter for multislerp"),
    (lambda d: d["models"][1].update(parameters={"eps": 0.1}), "models[1].parameters.eps: eps applies to the whole "
                                                               "merge"),
    (lambda d: d.update(models=[]), "models: is empty; list the models to merge"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    assert_problem_named(tmp_path, models_config(fam), change, fragment)
