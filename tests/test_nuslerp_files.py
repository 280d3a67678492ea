"""nuslerp through files: with and without a base_model, `slices:`, chunking, and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.errors import InputError
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=8, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, 5000], **SHAPE)


def models_config(fam: dict, base: bool = True, **extra) -> dict:
    data = {"merge_method": "nuslerp",
            "models": [{"model": str(fam["experts"][0]), "parameters": {"weight": [0.3, 1.0]}},
                       {"model": str(fam["experts"][2]), "parameters": {"weight": 0.8}}], **extra}
    if base:
        data["base_model"] = str(fam["base"])
    return data


@pytest.mark.parametrize("base", [True, False])
def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict, base: bool) -> None:
    fusemerge.run(write(tmp_path, models_config(fam, base)), tmp_path / "out", device="cpu")
    merged, mb = load_model(tmp_path / "out"), load_model(fam["base"])
    x0, x1 = load_model(fam["experts"][0]), load_model(fam["experts"][2])
    layers = 1 + max(int(n.split(".")[2]) for n in mb if ".layers." in n)
    assert set(merged) == set(mb)
    for name, tensor in merged.items():
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        w = (0.3 + 0.7 * layer / (layers - 1), 0.8)  # the gradient, interpolated by layer
        b = mb[name] if base else None
        expect = fusemerge.merge_tensors(b, [x0[name], x1[name]], "nuslerp", weight=list(w))
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.nuslerp(x0[name], x1[name], w, b)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name


@pytest.mark.parametrize("base", [True, False])
def test_output_bytes_do_not_depend_on_memory_budget_or_workers(tmp_path: Path, fam: dict, base: bool) -> None:
    cfg = write(tmp_path, models_config(fam, base, parameters={"nuslerp_flatten": True}))
    plan = merge_twice(tmp_path, cfg, "96KiB")
    assert any(plan.reads(t) == 3 for t in plan.tensors)  # max |v|, the sums, the merge
    roomy = fusemerge.build_plan(cfg, device="cpu")
    assert all(roomy.reads(t) == 1 for t in roomy.tensors)  # each tensor kept between its passes: read once
    assert [m.path for m in plan.models] == [fam["experts"][0], fam["experts"][2]]
    assert all((t.base is not None) == base and len(t.inputs) == 2 for t in plan.tensors)


def test_slices_take_the_base_wherever_it_is_listed(tmp_path: Path, fam: dict) -> None:
    base, e1, e2, e3 = (str(p) for p in (fam["base"], *fam["experts"]))
    data = {"merge_method": "nuslerp", "base_model": base, "slices": [
        {"sources": [{"model": e1, "layer_range": [0, 3], "parameters": {"weight": 2.0}},
                     {"model": base, "layer_range": [0, 3]}, {"model": e3, "layer_range": [0, 3]}]}]}
    fusemerge.run(write(tmp_path, data), tmp_path / "out", device="cpu")
    merged, mb, m1, m3 = (load_model(p) for p in (tmp_path / "out", fam["base"], fam["experts"][0],
                                                  fam["experts"][2]))
    for name in ("model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expect = fusemerge.merge_tensors(mb[name], [m1[name], m3[name]], "nuslerp", weight=[2.0, 1.0])
        assert torch.equal(merged[name].view(torch.int16), expect.view(torch.int16)), name
    del e2


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d["models"].pop(), "models: nuslerp interpolates exactly two models (besides the base_model, if "
                                  "given), not 1 (as in mergekit)"),
    (lambda d: d.update(parameters={"nuslerp_flatten": "rows"}), "parameters.nuslerp_flatten"),
    (lambda d: d.update(parameters={"t": 0.5}), "parameters.t: unknown parameter for nuslerp"),
    (lambda d: d["models"][1].update(parameters={"nuslerp_row_wise": False}),
     "models[1].parameters.nuslerp_row_wise: nuslerp_row_wise applies to the whole merge"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    data = models_config(fam)
    assert_problem_named(tmp_path, data, change, fragment)


def test_merge_tensors_takes_nuslerps_flags() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(500, generator=g)
    m1, m2 = (b + 0.01 * torch.randn(500, generator=g) for _ in range(2))
    plain = fusemerge.merge_tensors(b, [m1, m2], "nuslerp")
    assert torch.equal(fusemerge.merge_tensors(b, [m1, m2], "nuslerp", nuslerp_flatten=True,
                                               nuslerp_row_wise=True), plain)  # row_wise: mergekit's no-op here
    # a 1-D tensor is one row: one arc per row is the whole tensor's arc, bit for bit
    assert torch.equal(fusemerge.merge_tensors(b, [m1, m2], "nuslerp", nuslerp_flatten=False), plain)
    # and one arc per column of a 1-D tensor is its one vector too
    assert torch.equal(fusemerge.merge_tensors(b, [m1, m2], "nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True),
                       plain)
    with pytest.raises(InputError, match=r"experts\[0, 1\] are the same tensor; nuslerp takes each model once"):
        fusemerge.merge_tensors(None, [m1, m1], "nuslerp")


@pytest.mark.parametrize("base", [True, False])
def test_one_arc_per_row_through_files(tmp_path: Path, fam: dict, base: bool) -> None:
    """nuslerp_flatten: false: each tensor is merge_tensors' bytes (weights a gradient over the layers); the same
    bytes at a budget whose chunks hold a few rows and with two workers; one read (no statistics pass)."""
    from fusemerge.config import resolve

    cfg = write(tmp_path, models_config(fam, base, parameters={"nuslerp_flatten": False}))
    plan = merge_twice(tmp_path, cfg, "96KiB")
    assert all(plan.reads(t) == 1 for t in plan.tensors)
    assert plan.chunk_elems < max(t.numel for t in plan.tensors)
    assert all(t.chunk(plan.chunk_elems) % t.shape[-1] == 0 for t in plan.tensors if len(t.shape) == 2)
    merged = load_model(tmp_path / "a")
    mb = load_model(fam["base"])
    m1, m3 = load_model(fam["experts"][0]), load_model(fam["experts"][2])
    for name, tensor in merged.items():
        w0 = resolve([0.3, 1.0], name, SHAPE["layers"])
        expect = fusemerge.merge_tensors(mb[name] if base else None, [m1[name], m3[name]], "nuslerp",
                                         weight=[w0, 0.8], nuslerp_flatten=False)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name


def test_one_arc_per_column_through_files(tmp_path: Path, fam: dict) -> None:
    """nuslerp_flatten: false with nuslerp_row_wise: true: each column's sums run over every chunk (a statistics pass,
    three reads of a tensor not held whole); each tensor is merge_tensors' bytes, and the same at a budget whose
    chunks hold a few rows with two workers."""
    from fusemerge.config import resolve

    cfg = write(tmp_path, models_config(fam, parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}))
    plan = merge_twice(tmp_path, cfg, "96KiB")
    big = [t for t in plan.tensors if plan.kept_bytes(t) > plan.resident_bytes]
    assert big and all(plan.reads(t) == 3 for t in big)
    merged, mb = load_model(tmp_path / "a"), load_model(fam["base"])
    m1, m3 = load_model(fam["experts"][0]), load_model(fam["experts"][2])
    for name, tensor in merged.items():
        w0 = resolve([0.3, 1.0], name, SHAPE["layers"])
        expect = fusemerge.merge_tensors(mb[name], [m1[name], m3[name]], "nuslerp", weight=[w0, 0.8],
                                         nuslerp_flatten=False, nuslerp_row_wise=True)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
