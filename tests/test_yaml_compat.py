"""mergekit-style configs on model layouts mergekit users meet: layers past the declared stack, deeper fine-tunes,
tied and untied models in one frankenmerge, Hub ids, no-op parameters, gradients that cancel.

Each case was found by running fusemerge and mergekit 0.1.5 side by side (2026-12-01); what fusemerge does is
written beside it in docs/mergekit.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import fusemerge
from fusemerge.errors import InputError
from fusemerge.planner import _is_pre_weight
from fusemerge.synthetic import make_llama_family

SHAPE = dict(hidden=16, intermediate=40, layers=3, vocab=53)


def _fam(root: Path, **kw) -> dict:
    return make_llama_family(root, n_experts=2, seed=4, **{**SHAPE, **kw})


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _problems(cfg_path: Path) -> list[str]:
    with pytest.raises(InputError) as e:
        fusemerge.build_plan(cfg_path, device="cpu")
    return e.value.problems


def _declare(fam: dict, **keys) -> None:
    """Set `keys` in every model's config.json."""
    for d in [fam["base"], *fam["experts"]]:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(keys)
        (d / "config.json").write_text(json.dumps(cfg))


def test_a_gradient_on_a_layer_past_the_declared_stack_is_an_input_error(tmp_path) -> None:
    """A multi-token-prediction layer stored as layers.N after N declared layers (GLM-4.5, DeepSeek-V3)."""
    fam = _fam(tmp_path / "m")
    _declare(fam, num_hidden_layers=2)
    models = [{"model": str(fam["experts"][0]), "parameters": {"weight": 0.5, "density": [0.3, 0.9]}},
              {"model": str(fam["experts"][1]), "parameters": {"weight": 0.5, "density": 0.5}}]
    cfg = {"merge_method": "ties", "base_model": str(fam["base"]), "models": models}
    problems = _problems(_write(tmp_path / "g.yml", cfg))
    assert problems and all(p.startswith("models[0].parameters.density: tensor 'model.layers.2.") for p in problems)
    assert "past the model's 2 layers" in problems[0] and "filter rule" in problems[0]
    assert len(problems) == 1 and "(the same for 8 other tensors: 'model.layers.2." in problems[0], problems
    # the fix the message gives: a value of their own for the extra layer, the gradient for the others
    models[0]["parameters"]["density"] = [{"filter": "layers.2.", "value": 0.5}, {"value": [0.3, 0.9]}]
    out = tmp_path / "out"
    fusemerge.run(_write(tmp_path / "g2.yml", cfg), out, device="cpu")
    assert "model.layers.2.mlp.up_proj.weight" in load_file(out / "model.safetensors")


def test_a_deeper_fine_tune_is_refused_not_truncated(tmp_path) -> None:
    base = _fam(tmp_path / "a")
    deep = _fam(tmp_path / "b", layers=4)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base["base"]),
           "models": [{"model": str(deep["experts"][0]), "parameters": {"weight": 1.0}}]}
    problems = _problems(_write(tmp_path / "d.yml", cfg))
    assert len(problems) == 1, problems
    assert "it has 4 layers" in problems[0] and "3; models: merges models with one layer stack" in problems[0]
    assert "'model.layers.3." in problems[0]


def test_a_tied_first_slice_and_an_untied_last_one_keep_the_last_ones_head(tmp_path) -> None:
    tied = _fam(tmp_path / "t", tie_embeddings=True)
    untied = _fam(tmp_path / "u")
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tied["experts"][0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(untied["experts"][1]), "layer_range": [1, 3]}]}]}
    out = tmp_path / "out"
    fusemerge.run(_write(tmp_path / "s.yml", cfg), out, device="cpu")
    merged = load_file(out / "model.safetensors")
    head = load_file(untied["experts"][1] / "model.safetensors")["lm_head.weight"]
    assert merged["lm_head.weight"].equal(head)
    assert merged["model.embed_tokens.weight"].equal(
        load_file(tied["experts"][0] / "model.safetensors")["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_the_last_slices_extra_sources_are_named_in_a_warning(tmp_path) -> None:
    fam = _fam(tmp_path / "f")
    base, (e1, e2) = str(fam["base"]), [str(e) for e in fam["experts"]]
    cfg = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 0.5}, "slices": [
        {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": e1, "layer_range": [0, 2]}]},
        {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": e1, "layer_range": [2, 3]},
                     {"model": e2, "layer_range": [2, 3]}]}]}
    plan = fusemerge.build_plan(_write(tmp_path / "s.yml", cfg), device="cpu")
    notes = [w for w in plan.warnings if "final norm, lm_head" in w]
    assert len(notes) == 1 and notes[0].startswith("slices[1]:") and notes[0].endswith(f"not {e2}"), plan.warnings


@pytest.mark.parametrize("name,pre", [
    ("model.embed_tokens.weight", True), ("transformer.wte.weight", True), ("gpt_neox.embed_in.weight", True),
    ("transformer.word_embeddings.weight", True), ("transformer.word_embeddings_layernorm.weight", True),
    ("model.tok_embeddings.weight", True), ("embed_out.weight", False), ("lm_head.weight", False),
    ("model.norm.weight", False),
])
def test_pre_weights_follow_mergekits_architecture_files(name, pre) -> None:
    assert _is_pre_weight(name) is pre


def test_a_hub_id_says_fusemerge_downloads_nothing(tmp_path, monkeypatch) -> None:
    fam = _fam(tmp_path / "models" / "f")
    monkeypatch.chdir(tmp_path)
    cfg = {"merge_method": "task_arithmetic", "base_model": "mistralai/Mistral-7B-v0.1",
           "models": [{"model": f"{fam['experts'][0]}@main", "parameters": {"weight": 1.0}}]}
    problems = _problems(_write(tmp_path / "h.yml", cfg))
    text = "\n".join(problems)
    assert "if it is a Hugging Face Hub id" in text and "huggingface-cli download mistralai/Mistral-7B-v0.1" in text
    assert f"{os.path.basename(fam['experts'][0])!r} at a revision is mergekit's `path@revision`" in text


def test_int8_mask_is_accepted_by_every_method(tmp_path) -> None:
    fam = _fam(tmp_path / "f")
    for method in ("linear", "task_arithmetic", "ties"):
        cfg = {"merge_method": method, "base_model": str(fam["base"]), "parameters": {"int8_mask": True},
               "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in fam["experts"]]}
        fusemerge.build_plan(_write(tmp_path / f"{method}.yml", cfg), device="cpu")


def test_weights_that_cancel_on_many_tensors_are_one_line(tmp_path) -> None:
    fam = _fam(tmp_path / "f")
    cfg = {"merge_method": "linear", "models": [
        {"model": str(fam["experts"][0]), "parameters": {"weight": [1, 0]}},
        {"model": str(fam["experts"][1]), "parameters": {"weight": [-1, 0]}}]}
    problems = _problems(_write(tmp_path / "z.yml", cfg))
    assert len(problems) == 1, problems
    assert "add up to 0" in problems[0] and "other tensors: '" in problems[0] and "normalize: false" in problems[0]


def test_a_tied_model_that_also_stores_its_head_stays_tied(tmp_path) -> None:
    """Some trainers save lm_head.weight beside tied embeddings: the output keeps the config's tying."""
    fam = _fam(tmp_path / "f")
    _declare(fam, tie_word_embeddings=True)
    cfg = {"merge_method": "dare_ties", "base_model": str(fam["base"]),
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in fam["experts"]]}
    out = tmp_path / "out"
    fusemerge.run(_write(tmp_path / "t.yml", cfg), out, device="cpu")
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_another_stacks_extra_layers_are_ignored_not_called_deeper(tmp_path) -> None:
    """A vision tower's layers.5 in a fine-tune of a 3-layer text model is not a deeper text stack."""
    from safetensors.torch import save_file

    fam = _fam(tmp_path / "f")
    shard = fam["experts"][0] / "model.safetensors"
    tensors = load_file(shard)
    tensors["vision_tower.encoder.layers.5.mlp.fc1.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(shard))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
           "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in fam["experts"]]}
    plan = fusemerge.build_plan(_write(tmp_path / "v.yml", cfg), device="cpu")
    assert any("1 tensor(s) not in" in w and "vision_tower" in w for w in plan.warnings), plan.warnings
