"""mergekit `slices:` configs and `passthrough`: config checks, the layer mapping in the plan, merged bytes.

No mergekit needed: tests/test_mergekit_parity.py compares with mergekit itself where it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fusemerge
from fusemerge.config import load_config
from fusemerge.errors import InputError
from fusemerge.planner import build_plan
from fusemerge.synthetic import make_llama_family

SHAPE = dict(hidden=16, intermediate=40, layers=4, vocab=53)
MLP = "model.layers.{}.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("slices")
    return make_llama_family(root / "models", n_experts=2, seed=3, **SHAPE)


def src(model: Path | str, start: int, end: int, **params) -> dict:
    out: dict = {"model": str(model), "layer_range": [start, end]}
    if params:
        out["parameters"] = params
    return out


def problems(data: dict) -> list[str]:
    with pytest.raises(InputError) as info:
        load_config(data)
    return info.value.problems


def tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# Config


def test_slices_config_loads_and_round_trips() -> None:
    data = {"merge_method": "ties", "base_model": "b",
            "slices": [{"sources": [src("b", 0, 2), src("e1", 1, 3, density=0.3, weight=[0.2, 0.8])],
                        "parameters": {"weight": 0.5}},
                       {"sources": [src("b", 2, 3), src("e2", 0, 1)]}],
            "parameters": {"lambda": 0.9}}
    cfg = load_config(data)
    assert [m.model for m in cfg.models] == ["e1", "e2"]  # the base is not an expert
    assert cfg.num_output_layers == 3 and cfg.listed_models == []
    assert cfg.slices[0].sources[1].layer_range == (1, 3)
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["slices"][0]["sources"][0].update(layer_range=[2, 2]), "slices[0].sources[0].layer_range: [2, 2] is "
                                                                         "empty or negative"),
    (lambda d: d["slices"][0]["sources"][0].update(layer_range=[0]), "slices[0].sources[0].layer_range: must be "
                                                                     "[start, end]"),
    (lambda d: d["slices"][0]["sources"][1].update(layer_range=[0, 3]), "same number of layers"),
    (lambda d: d["slices"][0]["sources"][1].update(model="b"), "'b' is listed twice in this slice"),
    (lambda d: d["slices"][0]["sources"].pop(0), "the base model 'b' is not among the sources"),
    (lambda d: d["slices"][0].update(base_model="x"), "slices[0].base_model: a per-slice base_model: is not "
                                                      "supported yet"),
    (lambda d: d["slices"][0]["sources"][0].update(weights=1), "slices[0].sources[0].weights: unknown key"),
    (lambda d: d["slices"][0]["sources"][1].update(parameters={"densty": 0.2}), "slices[0].sources[1].parameters."
                                                                                 "densty: unknown parameter"),
    (lambda d: d["slices"][0].update(parameters={"lambda": "x"}), "slices[0].parameters.lambda: must be a number"),
    (lambda d: d.update(parameters={"trim_scope": "global"}), "trim_scope: global is not supported with slices"),
    (lambda d: d.update(slices=[]), "slices: must be a non-empty list"),
    (lambda d: d.update(models=[{"model": "e1"}]), "give models: or slices:, not both"),
])
def test_bad_slices_name_the_key(edit, needle: str) -> None:
    data = {"merge_method": "ties", "base_model": "b", "slices": [{"sources": [src("b", 0, 2), src("e1", 0, 2)]}]}
    edit(data)
    found = problems(data)
    assert any(needle in p for p in found), found


def test_passthrough_takes_one_source_per_slice_and_one_model() -> None:
    data = {"merge_method": "passthrough", "slices": [{"sources": [src("a", 0, 2), src("b", 0, 2)]}]}
    assert any("passthrough takes exactly one source per slice, not 2" in p for p in problems(data))
    data = {"merge_method": "passthrough", "base_model": "b", "models": [{"model": "a"}]}
    assert any("passthrough copies exactly one model" in p for p in problems(data))
    assert load_config({"merge_method": "passthrough", "models": [{"model": "a", "parameters": {"scale": 0.5}}]})


def test_slice_parameters_resolve_in_mergekit_order() -> None:
    cfg = load_config({"merge_method": "task_arithmetic", "base_model": "b",
                       "slices": [{"sources": [src("b", 0, 3), src("e", 0, 3, weight=[0.0, 1.0])],
                                   "parameters": {"weight": 0.25, "lambda": [1.0, 3.0]}},
                                  {"sources": [src("b", 0, 1), src("e", 0, 1)]}],
                       "parameters": {"weight": 0.75, "lambda": 0.5}})
    first, second = cfg.slices
    e_first, e_second = first.sources[1], second.sources[1]
    # source parameters, read at t = offset / (slice length - 1)
    assert [cfg.slice_param("weight", first, e_first, MLP.format(i), t) for i, t in enumerate([0, 0.5, 1])] == \
        [0.0, 0.5, 1.0]
    assert cfg.slice_param("lambda", first, None, MLP.format(0), 0.5) == 2.0  # the slice's, over the top level's
    assert cfg.slice_param("weight", second, e_second, MLP.format(0), 1.0) == 0.75  # top level
    assert cfg.slice_param("normalize", second, None, MLP.format(0), 1.0) is False  # default


# --------------------------------------------------------------------------------------------------
# Plan: the layer mapping


def frankenmerge(fam: dict) -> dict:
    base, (e1, e2) = fam["base"], fam["experts"]
    return {"merge_method": "passthrough", "base_model": str(base),
            "slices": [{"sources": [src(e1, 0, 3)]}, {"sources": [src(e2, 1, 4)]}, {"sources": [src(base, 3, 4)]}]}


def test_passthrough_plan_maps_output_layers_to_source_layers(fam: dict) -> None:
    plan = build_plan(frankenmerge(fam), device="cpu")
    by_name = {t.name: t for t in plan.tensors}
    e1, e2, base = fam["experts"][0], fam["experts"][1], fam["base"]
    expected = {0: (e1, 0), 1: (e1, 1), 2: (e1, 2), 3: (e2, 1), 4: (e2, 2), 5: (e2, 3), 6: (base, 3)}
    for out_layer, (model, layer) in expected.items():
        (entry,) = by_name[MLP.format(out_layer)].inputs
        assert (entry.file.parent, entry.name) == (model, MLP.format(layer))
    assert not any(".layers.7." in n for n in by_name)
    assert all(t.copy_only for t in plan.tensors)
    # embeddings from the first slice's source, final norm and lm_head from the last slice's (mergekit/plan.py)
    assert by_name["model.embed_tokens.weight"].inputs[0].file.parent == e1
    assert by_name["model.norm.weight"].inputs[0].file.parent == base
    assert by_name["lm_head.weight"].inputs[0].file.parent == base
    assert plan.num_layers == 7


def test_layer_range_past_the_model_fails_in_plan(fam: dict) -> None:
    data = frankenmerge(fam)
    data["slices"][1]["sources"][0]["layer_range"] = [2, 5]
    with pytest.raises(InputError) as info:
        build_plan(data, device="cpu")
    assert any("slices[1].sources[0].layer_range: [2, 5] is past the 4 layers of" in p for p in info.value.problems)


def test_missing_tensor_in_a_source_layer_fails_in_plan(fam: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    t = tensors(fam["experts"][1])
    del t[MLP.format(2)]
    save_file(t, str(broken / "model.safetensors"))
    data = frankenmerge(fam)
    data["slices"][1]["sources"][0]["model"] = str(broken)
    with pytest.raises(InputError) as info:
        build_plan(data, device="cpu")
    assert any(f"tensor '{MLP.format(4)}': input tensor '{MLP.format(2)}' in {broken} is missing" in p
               for p in info.value.problems), info.value.problems


# --------------------------------------------------------------------------------------------------
# Merged bytes


def test_passthrough_copies_bytes_and_sets_the_layer_count(fam: dict, tmp_path: Path) -> None:
    fusemerge.run(frankenmerge(fam), tmp_path / "out", device="cpu", max_memory="4MiB")
    out = tensors(tmp_path / "out")
    e1, e2, base = (tensors(d) for d in (*fam["experts"], fam["base"]))
    assert len([n for n in out if n.endswith("mlp.up_proj.weight")]) == 7
    for name, x in out.items():
        if ".layers." not in name:
            continue
        layer = int(name.split(".")[2])
        model, src_layer = (e1, layer) if layer < 3 else (e2, layer - 2) if layer < 6 else (base, 3)
        y = model[name.replace(f".layers.{layer}.", f".layers.{src_layer}.")]
        assert torch.equal(x.view(torch.int16), y.view(torch.int16)), name
    assert torch.equal(out["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 7


def test_passthrough_scale_and_dtype_change_round_once(fam: dict, tmp_path: Path) -> None:
    e1 = fam["experts"][0]
    data = {"merge_method": "passthrough", "out_dtype": "float32",
            "slices": [{"sources": [src(e1, 1, 3, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]}]}
    fusemerge.run(data, tmp_path / "out", device="cpu")
    out, x = tensors(tmp_path / "out"), tensors(e1)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert out[name].dtype == torch.float32
    assert torch.equal(out[name], x["model.layers.1.self_attn.o_proj.weight"].float() * 0.5)
    assert torch.equal(out[MLP.format(1)], x[MLP.format(2)].float())


def test_ties_slices_merge_the_mapped_layers(fam: dict, tmp_path: Path) -> None:
    base, (e1, e2) = fam["base"], fam["experts"]
    data = {"merge_method": "ties", "base_model": str(base),
            "slices": [{"sources": [src(base, 0, 2), src(e1, 2, 4, density=0.4, weight=[0.5, 1.5]),
                                    src(e2, 1, 3, density=0.6)]}],
            "parameters": {"weight": 0.8}}
    fusemerge.run(data, tmp_path / "out", device="cpu")
    out, tb, t1, t2 = (tensors(d) for d in (tmp_path / "out", base, e1, e2))
    for layer in (0, 1):
        experts = [t1[MLP.format(layer + 2)], t2[MLP.format(layer + 1)]]
        expected = fusemerge.merge_tensors(tb[MLP.format(layer)], experts, "ties", weight=[0.5 + layer, 0.8],
                                           density=[0.4, 0.6], name=MLP.format(layer))
        assert torch.equal(out[MLP.format(layer)], expected), layer
    # non-layer tensors: the slice's sources at t = 0
    expected = fusemerge.merge_tensors(tb["lm_head.weight"], [t1["lm_head.weight"], t2["lm_head.weight"]], "ties",
                                       weight=[0.5, 0.8], density=[0.4, 0.6])
    assert torch.equal(out["lm_head.weight"], expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2
