"""model_stock through files: `models:` and `slices:` configs, chunking, and the config's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusemerge
from fusemerge.errors import InputError
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=6, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, 5000], **SHAPE)


def models_config(fam: dict, **extra) -> dict:
    return {"merge_method": "model_stock", "base_model": str(fam["base"]),
            "models": [{"model": str(m)} for m in (fam["base"], *fam["experts"])], **extra}


def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict) -> None:
    fusemerge.run(write(tmp_path, models_config(fam)), tmp_path / "out", device="cpu")
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    others = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        inputs = [o[name] for o in others]
        expect = fusemerge.merge_tensors(base[name], inputs, "model_stock")
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.model_stock(base[name], inputs)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name


def test_output_bytes_do_not_depend_on_memory_budget_or_workers(tmp_path: Path, fam: dict) -> None:
    cfg = write(tmp_path, models_config(fam, parameters={"filter_wise": False}))
    plan = merge_twice(tmp_path, cfg, "96KiB")
    assert any(plan.reads(t) == 3 for t in plan.tensors)
    assert [m.path for m in plan.models] == [fam["base"], *fam["experts"]]


def test_slices_take_the_base_wherever_it_is_listed(tmp_path: Path, fam: dict) -> None:
    base, e1, e2, e3 = (str(p) for p in (fam["base"], *fam["experts"]))
    data = {"merge_method": "model_stock", "base_model": base, "slices": [
        {"sources": [{"model": e1, "layer_range": [0, 3]}, {"model": base, "layer_range": [0, 3]},
                     {"model": e3, "layer_range": [0, 3]}]}]}
    fusemerge.run(write(tmp_path, data), tmp_path / "out", device="cpu")
    merged, mb, m1, m3 = (load_model(p) for p in (tmp_path / "out", fam["base"], fam["experts"][0],
                                                  fam["experts"][2]))
    for name in ("model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expect = fusemerge.merge_tensors(mb[name], [m1[name], m3[name]], "model_stock")
        assert torch.equal(merged[name].view(torch.int16), expect.view(torch.int16)), name
    del e2


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.update(models=d["models"][:2]), "models: model_stock takes at least 2 models besides the base, "
                                                 "not 1 (as in mergekit)"),
    (lambda d: d.update(parameters={"filter_wise": "rows"}), "parameters.filter_wise"),
    (lambda d: d.update(parameters={"weight": 0.5}), "parameters.weight: unknown parameter for model_stock"),
    (lambda d: d["models"][1].update(parameters={"filter_wise": False}), "models[1].parameters.filter_wise: "
                                                                         "filter_wise applies to the whole merge"),
    (lambda d: d.pop("base_model"), "base_model: missing; model_stock merges differences from a base model"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    data = models_config(fam)
    assert_problem_named(tmp_path, data, change, fragment)


def test_a_base_tensor_the_slices_sources_lack_is_not_written(tmp_path: Path) -> None:
    """Found in review: taking the base's non-layer names (for its lm_head) must not refuse what merged before,
    a passthrough whose base_model (not a source) has a tensor its sources lack: that one is left out, warned."""
    fam = make_llama_family(tmp_path / "f", n_experts=1, seed=1, **SHAPE)
    shard = fam["base"] / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.extra_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    data = {"merge_method": "passthrough", "base_model": str(fam["base"]),
            "slices": [{"sources": [{"model": str(fam["experts"][0]), "layer_range": [0, 3]}]}]}
    plan = fusemerge.build_plan(write(tmp_path, data), device="cpu")
    assert "model.extra_proj.weight" not in {t.name for t in plan.tensors}
    assert any("tensor 'model.extra_proj.weight'" in w and "not written" in w for w in plan.warnings), plan.warnings


def test_merge_tensors_takes_filter_wise_and_each_model_once() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(500, generator=g)
    m1, m2 = (b + 0.01 * torch.randn(500, generator=g) for _ in range(2))
    assert torch.equal(fusemerge.merge_tensors(b, [m1, m2], "model_stock", filter_wise=False),
                       fusemerge.merge_tensors(b, [m1, m2], "model_stock"))
    # a 1-D tensor is one row: filter_wise gives the whole tensor's weights, bit for bit
    assert torch.equal(fusemerge.merge_tensors(b, [m1, m2], "model_stock", filter_wise=True),
                       fusemerge.merge_tensors(b, [m1, m2], "model_stock"))
    with pytest.raises(InputError, match=r"experts\[0, 1\] are the same tensor; model_stock takes each model once"):
        fusemerge.merge_tensors(b, [m1, m1, m2], "model_stock")
    fusemerge.merge_tensors(b, [b, m1, m2], "model_stock")  # the base itself among them: the base listed


def test_filter_wise_merges_each_row_as_the_oracle_does(tmp_path: Path, fam: dict) -> None:
    """filter_wise: true weighs every row by its own cosines (mergekit's per-row rule): each tensor is merge_tensors'
    bytes and within a bf16 ulp of the float64 oracle row by row; the same bytes at a budget whose chunks hold a few
    rows and with two workers; the rows' weights differ from the whole tensor's."""
    cfg = write(tmp_path, models_config(fam, parameters={"filter_wise": True}))
    plan = merge_twice(tmp_path, cfg, "96KiB")
    assert all(plan.reads(t) == 1 for t in plan.tensors)  # no statistics pass: each chunk's rows weigh themselves
    assert all(t.chunk(plan.chunk_elems) % t.shape[-1] == 0 for t in plan.tensors if len(t.shape) == 2)
    merged, base = load_model(tmp_path / "a"), load_model(fam["base"])
    others = [load_model(p) for p in fam["experts"]]
    differ = 0
    for name, tensor in merged.items():
        inputs = [o[name] for o in others]
        expect = fusemerge.merge_tensors(base[name], inputs, "model_stock", filter_wise=True)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.model_stock_rows(base[name], inputs)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name
        whole = fusemerge.merge_tensors(base[name], inputs, "model_stock")
        differ += int((whole != tensor).sum())
    assert differ > 1000


def test_filter_wise_refuses_a_budget_too_small_for_a_row(tmp_path: Path) -> None:
    wide = make_llama_family(tmp_path / "wide", n_experts=2, seed=3, hidden=16, intermediate=400, layers=1, vocab=64)
    cfg = write(tmp_path, models_config(wide, parameters={"filter_wise": True}))
    with pytest.raises(InputError, match=r"too small for model_stock: it weighs the 400 entries of each row of "
                                         r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight'"):
        fusemerge.build_plan(cfg, device="cpu", max_memory="64KiB", workers=2)
