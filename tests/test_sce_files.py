"""sce through files: select_topk by filter rules, the same bytes at any budget, workers and backend, the reads a
tensor not held whole takes, and the config's checks."""

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

TOPK = [{"filter": "mlp", "value": 0.3}, {"value": 0.8}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=21, shard_bytes=9000,
                             expert_shard_bytes=[14000, None, None], **SHAPE)


def models_config(fam: dict, topk: object = None) -> dict:
    return {"merge_method": "sce", "base_model": str(fam["base"]),
            "models": [{"model": str(e)} for e in fam["experts"]],
            "parameters": {"select_topk": TOPK if topk is None else topk}}


def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict) -> None:
    """Each tensor is merge_tensors' bytes with the select_topk its name resolves to, and within a bf16 ulp of the
    float64 oracle (mergekit's sce, ties in the variance by index)."""
    fusemerge.run(write(tmp_path, models_config(fam), "sce.yml"), tmp_path / "out", device="cpu")
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    experts = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        topk = resolve(TOPK, name, SHAPE["layers"])
        inputs = [e[name] for e in experts]
        expect = fusemerge.merge_tensors(base[name], inputs, "sce", select_topk=topk)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        assert within_ulp(tensor, oracle.sce(base[name], inputs, topk), torch.bfloat16, base[name]), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    """At a budget whose chunks are shorter than the larger tensors, the count, selection, sums and merge passes
    read them in chunks: the same bytes as one worker at the default budget."""
    cfg = write(tmp_path, models_config(fam), "sce.yml")
    plan = merge_twice(tmp_path, cfg, "64KiB", backend)
    assert plan.chunk_elems < max(t.numel for t in plan.tensors)
    big = [t for t in plan.tensors if plan.kept_bytes(t) > plan.resident_bytes]
    assert big and all(plan.reads(t) == 3 + plan.radix_passes for t in big)  # count, selection, sums, merge


def test_select_topk_is_checked_and_weight_refused(tmp_path: Path, fam: dict) -> None:
    assert_problem_named(tmp_path, models_config(fam, 1.5), lambda d: None, "parameters.select_topk: 1.5 is outside")
    assert_problem_named(tmp_path, models_config(fam, 0.5),
                         lambda d: d["models"][0].update(parameters={"weight": 0.7}), "weight")
    data = models_config(fam, 0.5)
    del data["base_model"]
    assert_problem_named(tmp_path, data, lambda d: None, "base_model")
