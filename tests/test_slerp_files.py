"""slerp through files: `models:` and `slices:` configs, gradients of t, chunking, and the config's checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

import fusemerge
from fusemerge.config import resolve
from fusemerge.errors import InputError
from fusemerge.synthetic import make_llama_family
from tests import oracle
from tests.kernels.test_reference import ulp
from tests.test_merge_e2e import SHAPE, load_model

T_RULES = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=2, seed=4, shard_bytes=9000,
                             expert_shard_bytes=[14000, None], **SHAPE)


def write(tmp_path: Path, data: dict, name: str = "slerp.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def plan_problems(tmp_path: Path, data: dict) -> list[str]:
    """The problems `build_plan` names for the config `data`, which it must refuse."""
    with pytest.raises(InputError) as e:
        fusemerge.build_plan(write(tmp_path, data), device="cpu")
    return e.value.problems


def assert_problem_named(tmp_path: Path, data: dict, change, fragment: str) -> None:
    """`change(data)` makes a config that build_plan refuses, with a problem that contains `fragment`."""
    change(data)
    problems = plan_problems(tmp_path, data)
    assert any(fragment in p for p in problems), problems


def merge_twice(tmp_path: Path, cfg: Path, max_memory: str, backend: str = "auto"):
    """`cfg` merged with one worker and again with `backend`, `max_memory` and two workers: the same bytes. Returns
    the second run's CPU plan, for the caller to check how it reads the tensors. backend="triton" runs on the GPU
    where there is one (no interpreter there), else on CPU through the interpreter."""
    fusemerge.run(cfg, tmp_path / "a", device="cpu", workers=1)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    fusemerge.run(cfg, tmp_path / "b", device=device, backend=backend, max_memory=max_memory, workers=2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    return fusemerge.build_plan(cfg, device="cpu", max_memory=max_memory, workers=2)


def models_config(fam: dict, t: object = None, **extra) -> dict:
    return {"merge_method": "slerp", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["base"])}, {"model": str(fam["experts"][0])}],
            "parameters": {"t": T_RULES if t is None else t}, **extra}


def test_models_config_merges_each_tensor_as_merge_tensors_does(tmp_path: Path, fam: dict) -> None:
    fusemerge.run(write(tmp_path, models_config(fam)), tmp_path / "out", device="cpu")
    merged, base, other = (load_model(p) for p in (tmp_path / "out", fam["base"], fam["experts"][0]))
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        t = resolve(T_RULES, name, SHAPE["layers"])
        expect = fusemerge.merge_tensors(base[name], [other[name]], "slerp", t=t)
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
        f64 = torch.from_numpy(oracle.slerp(base[name], other[name], t)).reshape(tensor.shape)
        assert bool(((tensor.double() - f64).abs() <= ulp(f64, torch.bfloat16)).all()), name
    assert not torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


def test_output_bytes_do_not_depend_on_memory_budget_or_workers(tmp_path: Path, fam: dict) -> None:
    cfg = write(tmp_path, models_config(fam))
    plan = merge_twice(tmp_path, cfg, "64KiB")
    assert plan.chunk_elems < SHAPE["hidden"] * SHAPE["intermediate"]  # every tensor chunked
    assert any(plan.reads(t) == 3 for t in plan.tensors)  # not kept: max |x|, the sums, then the merge


def test_plan_lists_the_base_and_the_other_model(tmp_path: Path, fam: dict) -> None:
    plan = fusemerge.build_plan(write(tmp_path, models_config(fam, t=0.4)), device="cpu")
    assert [m.path for m in plan.models] == [fam["base"], fam["experts"][0]]
    assert all(t.base is None and len(t.inputs) == 2 and t.t == 0.4 for t in plan.tensors)
    summary = plan.summary()
    assert "method        slerp" in summary and "models        " in summary


def assert_listing_the_base_changes_nothing(tmp_path: Path, data: dict) -> None:
    """`data` lists the base first under models:; without it there, the merge writes the same bytes."""
    fusemerge.run(write(tmp_path, data, "listed.yml"), tmp_path / "a", device="cpu")
    data = {**data, "models": data["models"][1:]}
    fusemerge.run(write(tmp_path, data, "unlisted.yml"), tmp_path / "b", device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_base_need_not_be_listed(tmp_path: Path, fam: dict) -> None:
    assert_listing_the_base_changes_nothing(tmp_path, models_config(fam, t=0.3))


def test_slices_read_t_at_the_position_in_the_slice(tmp_path: Path, fam: dict) -> None:
    base, e1, e2 = str(fam["base"]), str(fam["experts"][0]), str(fam["experts"][1])
    data = {"merge_method": "slerp", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": e1, "layer_range": [1, 3]}],
         "parameters": {"t": [0.2, 0.9]}},
        {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": e2, "layer_range": [0, 1]}]}],
        "parameters": {"t": 0.35}}
    fusemerge.run(write(tmp_path, data), tmp_path / "out", device="cpu")
    merged = load_model(tmp_path / "out")
    mb, m1, m2 = (load_model(p) for p in (fam["base"], fam["experts"][0], fam["experts"][1]))
    name = "model.layers.{}.mlp.down_proj.weight"
    cases = [(0, mb[name.format(0)], m1[name.format(1)], 0.2), (1, mb[name.format(1)], m1[name.format(2)], 0.9),
             (2, mb[name.format(2)], m2[name.format(0)], 0.35)]
    for layer, a, b, t in cases:
        expect = fusemerge.merge_tensors(a, [b], "slerp", t=t)
        assert torch.equal(merged[name.format(layer)].view(torch.int16), expect.view(torch.int16)), layer
    # embeddings from the first slice at t = 0 (its gradient's start), the final norm from the last slice
    emb = "model.embed_tokens.weight"
    expect = fusemerge.merge_tensors(mb[emb], [m1[emb]], "slerp", t=0.2)
    assert torch.equal(merged[emb].view(torch.int16), expect.view(torch.int16))
    norm = "model.norm.weight"
    expect = fusemerge.merge_tensors(mb[norm], [m2[norm]], "slerp", t=0.35)
    assert torch.equal(merged[norm].view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.pop("parameters"), "parameters.t: missing; slerp needs t (0 is the base model, 1 the other"),
    (lambda d: d.pop("base_model"), "base_model: missing; slerp interpolates from a base model to one other"),
    (lambda d: d["models"].append({"model": "/elsewhere/e2"}), "slerp interpolates the base model and one other "
                                                                 "model, not 2"),
    (lambda d: d["models"][1].update(parameters={"t": 0.5}), "models[1].parameters.t: t applies to the whole merge"),
    (lambda d: d["parameters"].update(weight=0.5), "parameters.weight: unknown parameter for slerp"),
    (lambda d: d["parameters"].update(t="0.5"), "parameters.t: must be a number"),
])
def test_config_problems_are_named(tmp_path: Path, fam: dict, change, fragment: str) -> None:
    data = models_config(fam, t=0.5)
    assert_problem_named(tmp_path, data, change, fragment)


def test_slices_take_the_base_and_one_other_model(tmp_path: Path, fam: dict) -> None:
    base, e1, e2 = str(fam["base"]), str(fam["experts"][0]), str(fam["experts"][1])
    data = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 3]}, {"model": e1, "layer_range": [0, 3]},
                     {"model": e2, "layer_range": [0, 3]}]}]}
    problems = plan_problems(tmp_path, data)
    assert any("slices[0].sources: slerp interpolates the base model and one other model per slice, not 2 (as in"
               in p for p in problems), problems


def test_t_rules_that_leave_a_tensor_out_are_refused_in_plan(tmp_path: Path, fam: dict) -> None:
    data = models_config(fam, t=[{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.3}])
    problems = plan_problems(tmp_path, data)
    assert any("tensor 'model.norm.weight': t has no value here" in p for p in problems), problems


def test_an_untied_base_listed_after_a_tied_model_keeps_its_head(tmp_path: Path) -> None:
    """Found in review: the non-layer names came from the first source only, so with a tied model first the
    untied base's lm_head.weight was never planned, and the output (config.json: untied) loaded a random head.
    mergekit writes slerp(base lm_head, the other's tied embedding)."""
    untied = make_llama_family(tmp_path / "u", n_experts=1, seed=1, **SHAPE)
    tied = make_llama_family(tmp_path / "t", n_experts=1, seed=1, tie_embeddings=True, **SHAPE)
    base, other = str(untied["base"]), str(tied["experts"][0])
    data = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": other, "layer_range": [0, 3]}, {"model": base, "layer_range": [0, 3]}]}]}
    fusemerge.run(write(tmp_path, data), tmp_path / "out", device="cpu")
    merged, mb, mo = (load_model(p) for p in (tmp_path / "out", untied["base"], tied["experts"][0]))
    assert "lm_head.weight" not in mo
    expect = fusemerge.merge_tensors(mb["lm_head.weight"], [mo["model.embed_tokens.weight"]], "slerp", t=0.5)
    assert torch.equal(merged["lm_head.weight"].view(torch.int16), expect.view(torch.int16))


def test_chunks_are_sized_for_the_two_inputs(tmp_path: Path, fam: dict) -> None:
    """Found in review: a models: config sized its chunks for three inputs (the base counted twice)."""
    base, other = str(fam["base"]), str(fam["experts"][0])
    a = fusemerge.build_plan(write(tmp_path, models_config(fam, t=0.5), "m.yml"), device="cpu", max_memory="1MiB")
    sliced = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 3]}, {"model": other, "layer_range": [0, 3]}]}]}
    b = fusemerge.build_plan(write(tmp_path, sliced, "s.yml"), device="cpu", max_memory="1MiB")
    assert a.chunk_elems == b.chunk_elems


@pytest.mark.parametrize(("data", "want"), [
    # no per-model parameters at all: say so, not "it takes " and nothing
    (lambda d: d["models"][1].update(parameters={"weight": 0.5}),
     "models[1].parameters.weight: unknown parameter for slerp; slerp takes no per-model parameters (set t under "
     "parameters:)"),
    # beyond float32: one line from the config, no numpy warning, not one per tensor
    (lambda d: d["parameters"].update(t=1e39), "parameters.t: 1e+39 is beyond float32's range (the merge computes in "
                                               "float32)"),
])
def test_one_clear_line(tmp_path: Path, fam: dict, data, want: str) -> None:
    cfg = models_config(fam, t=0.5)
    data(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as e:
            fusemerge.build_plan(write(tmp_path, cfg), device="cpu")
    assert e.value.problems == [f"{tmp_path / 'slerp.yml'}: {want}"], e.value.problems


def test_a_slice_without_t_is_named_once(tmp_path: Path, fam: dict) -> None:
    base, other = str(fam["base"]), str(fam["experts"][0])
    data = {"merge_method": "slerp", "base_model": base, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": other, "layer_range": [0, 2]}],
         "parameters": {"t": 0.3}},
        {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": other, "layer_range": [2, 3]}]}]}
    with pytest.raises(InputError) as e:
        fusemerge.build_plan(write(tmp_path, data), device="cpu")
    assert len(e.value.problems) == 1 and "slices[1]: t is missing here and under the top-level parameters:" in \
        e.value.problems[0], e.value.problems


def test_merge_tensors_reports_a_list_t_once() -> None:
    a, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(a, [b], "slerp", t=[0.5])
    assert e.value.problems == ["merge_tensors: t: [0.5]; expected one value for the whole merge"]
