"""della and della_linear through files: per-model density and epsilon (gradients and filter rules), chunks of
whole rows at any budget, workers and backends, and the config's checks of density +/- epsilon."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.config import resolve
from fusemerge.errors import InputError
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model
from tests.test_slerp_files import assert_problem_named, merge_twice, write

DENSITY = [0.3, 0.7]  # a gradient over the layers
EPSILON = [{"filter": "mlp", "value": 0.25}, {"value": 0.1}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=2, seed=12, shard_bytes=9000,
                             expert_shard_bytes=[14000, None], **SHAPE)


def models_config(fam: dict, method: str = "della", **extra) -> dict:
    return {"merge_method": method, "base_model": str(fam["base"]),
            "models": [{"model": str(fam["experts"][0]), "parameters": {"weight": 0.6, "density": DENSITY,
                                                                        "epsilon": EPSILON}},
                       {"model": str(fam["experts"][1]), "parameters": {"weight": 1.3, "density": 0.5}}],
            "parameters": {"epsilon": 0.2}, **extra}


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict, method: str) -> None:
    """Each tensor is merge_tensors' bytes with the parameters its name resolves to, and within a bf16 ulp of the
    float64 oracle (mergekit's della_magprune with DARE's stream as its draws); the seed keys the draws."""
    fusemerge.run(write(tmp_path, models_config(fam, method), "della.yml"), tmp_path / "out", device="cpu", seed=4)
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    experts = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        density = [resolve(DENSITY, name, SHAPE["layers"]), 0.5]
        epsilon = [resolve(EPSILON, name, SHAPE["layers"]), 0.2]
        inputs = [e[name] for e in experts]
        kw = dict(weight=[0.6, 1.3], density=density, epsilon=epsilon, name=name, seed=4)
        expect = fusemerge.merge_tensors(base[name], inputs, method, **kw)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.merge(base[name], inputs, method, **kw)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name
    other = fusemerge.merge_tensors(base[name], inputs, method, **{**kw, "seed": 5})
    assert not torch.equal(other, merged[name])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_bytes_do_not_depend_on_budget_workers_or_backend(tmp_path: Path, fam: dict, backend: str) -> None:
    """At a budget whose chunks hold a few rows, the L1 statistics pass and the merge split every tensor into
    whole rows: the same bytes as one worker at the default budget."""
    cfg = write(tmp_path, models_config(fam), "della.yml")
    plan = merge_twice(tmp_path, cfg, "96KiB", backend)
    assert plan.chunk_elems < max(t.numel for t in plan.tensors)
    assert all(t.chunk(plan.chunk_elems) % t.shape[-1] == 0 for t in plan.tensors if len(t.shape) == 2)
    assert any(plan.reads(t) == 3 for t in plan.tensors)  # the L1 rescale's two passes, then the merge


def test_budget_too_small_for_a_row_is_refused(tmp_path: Path) -> None:
    """A row must fit one chunk: a budget whose chunks are shorter than down_proj's rows of 400 is refused, naming
    the tensor and the option; a budget whose chunks hold one merges."""
    wide = make_llama_family(tmp_path / "wide", n_experts=2, seed=3, hidden=16, intermediate=400, layers=1, vocab=64)
    cfg = write(tmp_path, models_config(wide), "della.yml")
    with pytest.raises(InputError, match=r"ranks the 400 entries of each row of tensor 'model\.layers\.0\.mlp\."
                                         r"down_proj\.weight' \(shape \[16, 400\]\) together") as e:
        fusemerge.build_plan(cfg, device="cpu", max_memory="64KiB", workers=2)
    assert "raise max_memory" in str(e.value)
    plan = fusemerge.build_plan(cfg, device="cpu", max_memory="96KiB", workers=2)
    assert 400 <= plan.chunk_elems < 800


def test_density_and_epsilon_are_checked(tmp_path: Path, fam: dict) -> None:
    """density +/- epsilon outside (0, 1): refused by the config where they are plain numbers (naming where each
    comes from), and per tensor where a gradient resolves to such a pair."""
    assert_problem_named(tmp_path, models_config(fam), lambda d: d["models"][1]["parameters"].update(density=0.1),
                         "models[1].parameters.density, parameters.epsilon: density 0.1 and epsilon 0.2")
    assert_problem_named(tmp_path, models_config(fam), lambda d: d["parameters"].update(epsilon=1.5),
                         "parameters.epsilon: 1.5 is outside")
    assert_problem_named(tmp_path, models_config(fam),
                         lambda d: d["models"][0]["parameters"].update(density=[0.9, 0.5], epsilon=0.15),
                         "model 0's density 0.9 and epsilon 0.15")
    data = models_config(fam)  # density 1 drops nothing: any epsilon goes
    data["models"][1]["parameters"]["density"] = 1.0
    data["parameters"]["epsilon"] = 0.9
    data["models"][0]["parameters"].update(density=0.5, epsilon=0.3)
    assert fusemerge.build_plan(write(tmp_path, data, "ok.yml"), device="cpu").method.name == "della"


def test_the_seed_is_part_of_a_resumed_or_partitioned_merge(tmp_path: Path, fam: dict) -> None:
    """DELLA's masks depend on the seed, as DARE's: the journal of a resumable run and the identity the parts of a
    partitioned merge share both record it, so a resume or a part run with another --seed is told apart."""
    from fusemerge.partition import merge_identity
    from fusemerge.streaming.journal import fingerprint

    cfg = write(tmp_path, models_config(fam), "della.yml")
    one, two = (fusemerge.build_plan(cfg, device="cpu", seed=s) for s in (1, 2))
    assert fingerprint(one)["seed"] == 1 and fingerprint(two)["seed"] == 2
    assert merge_identity(one)["seed"] == 1 and merge_identity(one) != merge_identity(two)
