"""load_config: mergekit YAML semantics, every input problem at once, and per-tensor parameter resolution."""

from __future__ import annotations

import copy
import doctest
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fusemerge.config import (
    MergeConfig,
    gradient_t,
    infer_num_layers,
    interpolate,
    layer_index,
    load_config,
    resolve,
)
from fusemerge.errors import InputError
from fusemerge.methods import METHODS

# slerp and nearswap: their own messages (test_slerp_files.py, test_nearswap_files.py)
DELTA_METHODS = [name for name, m in METHODS.items() if m.needs_base and not m.is_slerp and not m.is_nearswap]
MLP = "model.layers.{}.mlp.down_proj.weight"
ATTN = "model.layers.{}.self_attn.q_proj.weight"


def cfg(method: str = "ties", base: str | None = "base", models: Any = None, **top: Any) -> dict[str, Any]:
    """A config dict; models default to two experts without parameters."""
    out: dict[str, Any] = {"merge_method": method}
    if base is not None:
        out["base_model"] = base
    out["models"] = [{"model": "e1"}, {"model": "e2"}] if models is None else models
    out.update(top)
    return out


def problems(source: Any) -> list[str]:
    with pytest.raises(InputError) as info:
        load_config(source)
    assert info.value.exit_code == 2
    return info.value.problems


def one_problem(source: Any) -> str:
    found = problems(source)
    assert len(found) == 1, found
    return found[0]


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Reading the file


def test_a_key_with_a_line_break_stays_on_one_line() -> None:
    """Found by tests/test_fuzz.py: a YAML key holding "\r" or "\n" is shown escaped, one problem per line."""
    found = one_problem(cfg(tokenizer={"\r": 1, "source": "base"}))
    assert "tokenizer.\\r:" in found and "\r" not in found
    found = problems(cfg(models=[{"model": "e1", "parameters": {"a\nb": 1}}]))
    assert found and all("\n" not in p for p in found)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    assert one_problem(path) == f"{path}: no such file"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    assert "is a directory" in one_problem(str(tmp_path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes("merge_method: ties # caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in one_problem(path)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "merge_method: ties\nbase_model: b\nmodels: [\n  {model: a}\nparameters: {x: 1}\n")
    assert one_problem(path) == (f"{path}: line 5, column 1: YAML syntax error: expected ',' or ']', but got "
                                 "'<scalar>' (while parsing a flow sequence that starts on line 3)")
    path2 = write(tmp_path, "merge_method: ties\nbase_model: b\n  models: x\n", "bad2.yml")
    assert one_problem(path2).startswith(f"{path2}: line 3, column ")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert one_problem(path) == f"{path}: the file is empty"


@pytest.mark.parametrize("text", ["- model: a\n- model: b\n", "ties\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert "the top level must be a mapping" in one_problem(write(tmp_path, text))


def test_duplicate_keys_are_errors_with_lines(tmp_path: Path) -> None:
    text = (
        "merge_method: ties\n"
        "base_model: b\n"
        "models:\n"
        "  - model: e1\n"
        "    parameters:\n"
        "      density: 0.5\n"
        "      density: 0.7\n"
        "merge_method: dare_ties\n"
    )
    found = problems(write(tmp_path, text))
    assert any("line 7: duplicate key 'density' (first set on line 6)" in p for p in found), found
    assert any("line 8: duplicate key 'merge_method' (first set on line 1)" in p for p in found), found
    assert len(found) == 2


def test_duplicate_keys_reported_with_other_problems(tmp_path: Path) -> None:
    text = "merge_method: ties\nbase_model: b\nbase_model: c\nmodels:\n  - model: e1\n    parameters: {density: 3}\n"
    found = problems(write(tmp_path, text))
    assert any("duplicate key 'base_model'" in p for p in found)
    assert any("models[0].parameters.density: 3 is outside (0, 1]" in p for p in found)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = (
        "common: &c {weight: 0.25, density: 0.5}\n"
        "merge_method: ties\nbase_model: b\n"
        "models:\n  - model: e1\n    parameters:\n      <<: *c\n      density: 0.75\n"
    )
    config = load_config(write(tmp_path, text))  # `common` is not a config key (a note), the merge key is fine
    assert config.param("weight", MLP.format(0), 0) == 0.25 and config.param("density", MLP.format(0), 0) == 0.75
    assert len(config.notes) == 1 and "common: unknown top-level key, ignored (as mergekit ignores it)" in \
        config.notes[0]


def test_exponent_floats_without_dot_are_numbers(tmp_path: Path) -> None:
    text = ("merge_method: ties\nbase_model: b\nmodels:\n"
            "  - model: e1\n    parameters: {density: 5e-1, weight: 2.5e1}\n"  # YAML 1.1 reads both as strings
            "parameters: {lambda: 1e-3}\n")
    config = load_config(write(tmp_path, text))
    assert config.param("density", MLP.format(0), 0) == 0.5
    assert config.param("weight", MLP.format(0), 0) == 25.0
    assert config.param("lambda", MLP.format(0)) == 0.001


def test_path_and_str_sources_agree(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(cfg(parameters={"lambda": 0.8})))
    from_path, from_str = load_config(path), load_config(str(path))
    assert from_path == from_str == load_config(cfg(parameters={"lambda": 0.8}))
    assert from_path.source_path == path
    assert from_path.raw == cfg(parameters={"lambda": 0.8})
    assert load_config(cfg()).source_path is None
    assert from_path.label == str(path) and load_config(cfg()).label == "config"


def test_problem_lines_start_with_the_file_and_name_the_key(tmp_path: Path) -> None:
    text = yaml.safe_dump(cfg(models=[{"model": "e1"}, {"model": "e2", "parameters": {"density": 1.5}}]))
    path = write(tmp_path, text)
    assert one_problem(path) == f"{path}: models[1].parameters.density: 1.5 is outside (0, 1]"
    assert one_problem(yaml.safe_load(text)) == "config: models[1].parameters.density: 1.5 is outside (0, 1]"


# --------------------------------------------------------------------------------------------------
# Top-level keys, method, models


def test_unknown_top_level_key_with_suggestion() -> None:
    message = one_problem(cfg(dtpye="bfloat16"))
    assert message.startswith("config: dtpye: unknown top-level key (did you mean 'dtype'?)")


def test_modules_are_not_supported() -> None:
    data = cfg()
    data["modules"] = {"text": {"models": [{"model": "a"}]}}
    assert one_problem(data) == ("config: modules: modules: configs are not supported yet; "
                                 "list whole models under models:")


def test_models_and_slices_together_are_refused() -> None:
    data = cfg()
    data["slices"] = [{"sources": [{"model": "base", "layer_range": [0, 4]}, {"model": "e1", "layer_range": [0, 4]}]}]
    assert one_problem(data) == ("config: slices: give models: or slices:, not both "
                                 "(mergekit takes exactly one of them)")


def test_name_and_chat_template_are_kept() -> None:
    config = load_config(cfg(name="my-merge", chat_template="chatml"))
    assert (config.name, config.chat_template) == ("my-merge", "chatml")
    assert one_problem(cfg(chat_template=3)) == "config: chat_template: must be a string, not 3"


def test_merge_method_missing() -> None:
    data = cfg()
    del data["merge_method"]
    message = one_problem(data)
    assert message.startswith("config: merge_method: missing; one of linear, task_arithmetic")


def test_unknown_merge_method_lists_known_ones() -> None:
    message = one_problem(cfg(method="tie"))
    assert "unknown method 'tie' (did you mean 'ties'?)" in message
    for name in METHODS:
        assert name in message


def test_values_still_checked_when_the_method_is_unknown() -> None:
    found = problems(cfg(method="tie", models=[{"model": "e1", "parameters": {"density": [0.5, 1.5], "foo": 1}}],
                         parameters={"gamma": -1}))
    assert [p.split(": ")[1] for p in found] == ["merge_method", "models[0].parameters.density[1]", "parameters.gamma"]


def test_mergekit_only_method_says_so() -> None:
    problem = one_problem(cfg(method="arcee_fusion"))
    assert "'arcee_fusion' is a mergekit method fusemerge does not support yet" in problem
    assert "must be a method name, not a list" in one_problem(cfg(method=["ties"]))


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_base_model_required_for_delta_methods(method: str) -> None:
    message = one_problem(cfg(method=method, base=None))
    assert message.startswith(f"config: base_model: missing; {method} merges differences")


def test_linear_needs_no_base() -> None:
    config = load_config(cfg(method="linear", base=None))
    assert config.base_model is None
    assert [m.model for m in config.models] == ["e1", "e2"]


@pytest.mark.parametrize(
    ("models", "key", "fragment"),
    [
        ("__missing__", "models", "missing"),
        (None, "models", "missing"),
        ([], "models", "is empty"),
        ({"model": "a"}, "models", "must be a list"),
        (["e1"], "models[0]", "must be a mapping with `model: PATH`"),
        ([{"parameters": {"weight": 1}}], "models[0]", "a mapping without model:"),
        ([{"model": 7}], "models[0].model", "must be a model directory path, not 7"),
        ([{"model": ""}], "models[0].model", "must be a model directory path"),
        ([{"model": "e1", "paramters": {}}], "models[0].paramters", "unknown key (did you mean 'parameters'?)"),
        ([{"model": "e1", "parameters": [0.5]}], "models[0].parameters", "must be a mapping of parameter names"),
        ([{"model": "e1"}, {"model": "./e1"}], "models[1].model", "'./e1' is listed twice (also models[0])"),
        ([{"model": "e1+adapters/lora"}], "models[0].model", "MODEL+LORA syntax (model 'e1', LoRA 'adapters/lora')"),
    ],
)
def test_models_problems(models: Any, key: str, fragment: str) -> None:
    data = cfg()
    data["models"] = models
    if models == "__missing__":
        del data["models"]
    message = one_problem(data)
    assert message.startswith(f"config: {key}: "), message
    assert fragment in message


def test_lora_syntax_rejected_for_base_too() -> None:
    assert one_problem(cfg(base="b+lora")).startswith("config: base_model: 'b+lora' is mergekit's MODEL+LORA syntax")


def test_only_base_listed_leaves_no_experts() -> None:
    message = one_problem(cfg(models=[{"model": "base"}]))
    assert message == "config: models: lists only the base model; ties needs at least one other model"


def test_all_problems_at_once() -> None:
    data = {
        "merge_method": "ties",
        "models": [
            {"model": "e1", "parameters": {"density": 0, "lambda": 2.0}},
            {"model": "e2", "parameters": {"weight": "heavy", "gamma": 0.1}},
            "e3",
        ],
        "parameters": {"normalize": "yes"},
        "dtype": "float64",
        "tokenizer_source": "union",
        "base_modle": 1,
    }
    found = problems(data)
    keys = [p.split(": ")[1] for p in found]
    assert sorted(keys) == sorted([
        "base_modle", "base_model", "models[2]", "dtype", "tokenizer_source",
        "models[0].parameters.density", "models[0].parameters.lambda",
        "models[1].parameters.weight", "models[1].parameters.gamma", "parameters.normalize",
    ]), found


# --------------------------------------------------------------------------------------------------
# Parameter names and values


@pytest.mark.parametrize("where", ["top", "model", "slice", "source"])
def test_keys_mergekit_ignores_are_ignored_with_a_note_and_near_misses_refused(where: str) -> None:
    """mergekit's pydantic models drop unknown keys (its examples/mega.yml sets `out_path:`; public configs set a
    source's `revision:`); fusemerge notes them, and refuses a misspelt known key, which mergekit would drop."""
    def place(data: dict, key: str) -> dict:
        if where == "top":
            data[key] = "x"
        elif where == "model":
            data["models"][0][key] = "x"
        else:
            data = {"merge_method": "passthrough",
                    "slices": [{"sources": [{"model": "e1", "layer_range": [0, 2]}]}]}
            (data["slices"][0] if where == "slice" else data["slices"][0]["sources"][0])[key] = "x"
        return data

    config = load_config(place(cfg(), "out_path"))
    (note,) = config.notes
    assert "out_path: unknown " in note and "ignored (as mergekit ignores it)" in note
    near = {"top": "base_modle", "model": "paramters", "slice": "source", "source": "layer_rang"}[where]
    (line,) = problems(place(cfg(), near))
    assert f"{near}: unknown " in line and "(did you mean" in line


def test_a_merge_parameter_out_of_place_is_refused() -> None:
    data = cfg()
    data["models"][0]["weight"] = 0.5  # meant under parameters: (mergekit would drop it and merge with weight 1)
    (line,) = problems(data)
    assert line.startswith("config: models[0].weight: unknown key; a merge parameter such as 'weight' goes under "
                           "parameters:"), line


def test_unknown_parameter_per_model_and_global() -> None:
    found = problems(cfg(models=[{"model": "e1", "parameters": {"densty": 0.5}}], parameters={"lamda": 1}))
    assert found[0].startswith(
        "config: models[0].parameters.densty: unknown parameter for ties (did you mean 'density'?)")
    assert found[1].startswith("config: parameters.lamda: unknown parameter for ties (did you mean 'lambda'?)")
    assert "it takes weight, density, lambda, normalize" in found[1]


@pytest.mark.parametrize(
    ("method", "name"),
    [("ties", "gamma"), ("task_arithmetic", "rescale"), ("linear", "density"), ("linear", "lambda"),
     ("task_arithmetic", "density"), ("dare_linear", "gamma"), ("linear", "rescale"), ("ties", "epsilon")],
)
def test_parameter_not_taken_by_method(method: str, name: str) -> None:
    message = one_problem(cfg(method=method, parameters={name: 0.5}))
    assert message.startswith(f"config: parameters.{name}: unknown parameter for {method}")


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_a_trims_rescale_is_true_or_false(method: str) -> None:
    """mergekit's rescale of a trim is a bool (DARE's `inverse` is DARE's alone)."""
    assert load_config(cfg(method=method, parameters={"rescale": True})).param("rescale", "w") is True
    message = one_problem(cfg(method=method, parameters={"rescale": "inverse"}))
    assert message.startswith("config: parameters.rescale: "), message


@pytest.mark.parametrize(("method", "name", "value"),
                         [("ties", "lambda", 0.5), ("ties", "normalize", False), ("dare_ties", "rescale", False),
                          ("linear", "normalize", True), ("ties", "int8_mask", True)])
def test_whole_merge_parameters_rejected_per_model(method: str, name: str, value: Any) -> None:
    message = one_problem(cfg(method=method, models=[{"model": "e1", "parameters": {name: value}}]))
    assert message == (f"config: models[0].parameters.{name}: {name} applies to the whole merge, not one model; "
                       "set it under the top-level parameters:")


def test_per_model_parameters_may_be_set_globally() -> None:
    config = load_config(cfg(method="breadcrumbs", parameters={"weight": 0.25, "density": 0.5, "gamma": 0.125}))
    assert [config.param(n, MLP.format(0), 1) for n in ("weight", "density", "gamma")] == [0.25, 0.5, 0.125]


@pytest.mark.parametrize(
    ("params", "key", "fragment"),
    [
        ({"weight": "heavy"}, "weight", "must be a number, not the string 'heavy'"),
        ({"weight": True}, "weight", "must be a number, not a bool"),
        ({"weight": None}, "weight", "must be a number, not null"),
        ({"lambda": float("nan")}, "lambda", "must be a finite number"),
        ({"lambda": float("-inf")}, "lambda", "must be a finite number"),
        ({"normalize": "yes"}, "normalize", "must be true or false, not the string 'yes'"),
        ({"normalize": 1}, "normalize", "must be true or false, not 1"),
        ({"density": 0}, "density", "0 is outside (0, 1]"),
        ({"density": -0.5}, "density", "-0.5 is outside (0, 1]"),
        ({"density": 1.0001}, "density", "1.0001 is outside (0, 1]"),
        ({"int8_mask": "on"}, "int8_mask", "must be true or false"),
    ],
)
def test_bad_values(params: dict[str, Any], key: str, fragment: str) -> None:
    message = one_problem(cfg(parameters=params))
    assert message.startswith(f"config: parameters.{key}: {fragment}"), message


@pytest.mark.parametrize("value", [2, "Inverse", "l1", None])
def test_rescale_values_rejected(value: Any) -> None:
    message = one_problem(cfg(method="dare_linear", parameters={"rescale": value}))
    assert message.startswith("config: parameters.rescale: must be true, false or 'inverse'")


@pytest.mark.parametrize("value", [True, False, "inverse"])
def test_rescale_values_accepted(value: Any) -> None:
    assert load_config(cfg(method="dare_ties", parameters={"rescale": value})).param("rescale", "x") == value


@pytest.mark.parametrize(("gamma", "ok"), [(0.0, True), (1.0, True), (-0.01, False), (1.5, False)])
def test_gamma_range(gamma: float, ok: bool) -> None:
    data = cfg(method="breadcrumbs", parameters={"gamma": gamma})  # density defaults to 1: no sum check
    if ok:
        assert load_config(data).param("gamma", "x", 0) == gamma
    else:
        assert one_problem(data) == f"config: parameters.gamma: {gamma!r} is outside [0, 1]"


def test_density_one_is_allowed() -> None:
    assert load_config(cfg(parameters={"density": 1})).param("density", "x", 0) == 1.0


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ([0.5, 1.2], "density[1]", "1.2 is outside (0, 1]"),
        ([0.5, [0.2, 0.3]], "density[1]", "lists do not nest"),
        ([{"filter": "mlp", "value": 0}], "density[0].value", "0 is outside (0, 1]"),
        ({"filter": "mlp", "value": 2}, "density.value", "2 is outside (0, 1]"),
        ([{"filter": "mlp", "value": [0.2, -1]}], "density[0].value[1]", "-1 is outside (0, 1]"),
        ([{"value": [0.2, "x"]}], "density[0].value[1]", "must be a number"),
        ([{"filter": "mlp", "value": 0.5}, {"value": 3}], "density[1].value", "3 is outside (0, 1]"),
        ([{"filters": "mlp", "value": 0.5}], "density[0].filters", "unknown key (did you mean 'filter'?)"),
        ([{"filter": "mlp"}], "density[0]", "a rule needs value:"),
        ([{"filter": 3, "value": 0.5}], "density[0].filter", "must be a substring of tensor names, not 3"),
        ([{"value": {"filter": "a", "value": 0.5}}], "density[0].value", "rules do not nest"),
        ([{"value": [{"filter": "a", "value": 0.5}]}], "density[0].value", "rules do not nest"),
        ([{"value": []}], "density[0].value", "is an empty list"),
        ([0.5, {"filter": "mlp", "value": 0.5}], "density", "mixes plain values and {filter, value} rules"),
        ([], "density", "is an empty list"),
    ],
)
def test_every_scalar_in_gradients_and_rules_is_checked(value: Any, key: str, fragment: str) -> None:
    message = one_problem(cfg(models=[{"model": "e1", "parameters": {"density": value}}]))
    assert message.startswith(f"config: models[0].parameters.{key}: "), message
    assert fragment in message


def test_bool_gradient_rules_checked() -> None:
    message = one_problem(cfg(parameters={"normalize": [{"filter": "mlp", "value": [True, "no"]}]}))
    assert message == "config: parameters.normalize[0].value[1]: must be true or false, not the string 'no'"


# --------------------------------------------------------------------------------------------------
# trim_scope, int8_mask, breadcrumbs, weight sums


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_trim_scope(method: str) -> None:
    assert load_config(cfg(method=method)).trim_scope == "tensor"
    config = load_config(cfg(method=method, parameters={"trim_scope": "global"}))
    assert config.trim_scope == "global"
    assert config.param("trim_scope", "x") == "global"
    assert load_config(cfg(method=method, parameters={"trim_scope": "tensor"})).trim_scope == "tensor"


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties", "dare_linear"])
def test_trim_scope_only_for_trimming_methods(method: str) -> None:
    message = one_problem(cfg(method=method, parameters={"trim_scope": "global"}))
    assert message.startswith("config: parameters.trim_scope: only methods that trim by magnitude")
    assert message.endswith(f"{method} does not")


@pytest.mark.parametrize("value", ["layer", ["tensor", "global"], True])
def test_trim_scope_bad_value(value: Any) -> None:
    assert one_problem(cfg(parameters={"trim_scope": value})).startswith(
        "config: parameters.trim_scope: must be 'tensor' or 'global'")


def test_trim_scope_is_global_only() -> None:
    message = one_problem(cfg(models=[{"model": "e1", "parameters": {"trim_scope": "global"}}]))
    assert message.startswith("config: models[0].parameters.trim_scope: trim_scope applies to the whole merge")


def test_int8_mask_accepted_as_mergekit_noop() -> None:
    config = load_config(cfg(method="dare_ties", parameters={"int8_mask": True}))
    assert config.parameters["int8_mask"] is True
    # linear ignores it in mergekit too (docs/mergekit.md: accepted, changes nothing)
    assert load_config(cfg(method="linear", parameters={"int8_mask": True})).parameters["int8_mask"] is True


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_density_plus_gamma_above_one_is_mergekits_shrunk_outlier_drop(method: str) -> None:
    """mergekit 0.1.5 merges these (sparsify.py: n_bot = max(0, n - target_n - n_top)); so does fusemerge, as
    its gradients always did: select.trim_counts keeps floor(density * n) entries."""
    models = [{"model": "e1", "parameters": {"density": 0.5}},
              {"model": "e2", "parameters": {"density": 0.9, "gamma": 0.2}}]
    assert load_config(cfg(method=method, models=models)).param("gamma", "w", 1) == 0.2
    load_config(cfg(method="breadcrumbs", parameters={"density": 0.995}))  # with the default gamma 0.01
    from fusemerge.kernels.select import trim_counts

    assert trim_counts("breadcrumbs", 1000, 0.9, 0.2) == (1000, 100)  # keep 900: the 100 largest dropped


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_weights_summing_to_zero_with_normalize(method: str) -> None:
    models = [{"model": "e1", "parameters": {"weight": 1.5}}, {"model": "e2", "parameters": {"weight": -1.5}}]
    message = one_problem(cfg(method=method, base=None if method == "linear" else "base", models=models,
                              parameters={"normalize": True}))
    assert "the weights add up to 0 and normalize is true" in message
    # where they come from: each model's (it said "models[].parameters.weight", a key no config holds)
    assert ": models[0].parameters.weight, models[1].parameters.weight: " in message
    assert message.endswith("(weights [1.5, -1.5])")
    # without normalize, or with sign consensus (D = 0 -> 1), the same weights are fine
    load_config(cfg(method="task_arithmetic", models=models))
    load_config(cfg(method="ties", models=models))


# --------------------------------------------------------------------------------------------------
# dtypes and tokenizer


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("float32", "float32"), ("fp32", "float32"), ("float", "float32"), ("FP32", "float32"),
     ("float16", "float16"), ("fp16", "float16"), ("half", "float16"),
     ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("torch.bfloat16", "bfloat16")],
)
def test_dtype_aliases(given: str, canonical: str) -> None:
    config = load_config(cfg(dtype=given, out_dtype=given))
    assert (config.dtype, config.out_dtype) == (canonical, canonical)


@pytest.mark.parametrize("value", ["float64", "int8", "fp8", 16, True])
def test_bad_dtypes(value: Any) -> None:
    found = problems(cfg(dtype=value, out_dtype=value))
    assert [p.split(": ")[1] for p in found] == ["dtype", "out_dtype"]
    assert "is not a supported dtype; use float32, float16 or bfloat16" in found[0]


def test_output_dtype_prefers_out_dtype() -> None:
    assert load_config(cfg(dtype="bf16", out_dtype="fp16")).output_dtype == "float16"
    assert load_config(cfg(dtype="bf16")).output_dtype == "bfloat16"
    assert load_config(cfg()).output_dtype is None


def test_tokenizer_source_values() -> None:
    assert load_config(cfg(tokenizer_source="base")).tokenizer_source == "base"
    assert load_config(cfg(tokenizer_source="e2")).tokenizer_source == "e2"
    assert load_config(cfg(tokenizer={"source": "base"})).tokenizer_source == "base"
    assert load_config(cfg()).tokenizer_source is None


@pytest.mark.parametrize(
    ("top", "key", "fragment"),
    [
        ({"tokenizer_source": "union"}, "tokenizer_source", "'union' (building a merged vocabulary) is not supported"),
        ({"tokenizer": {}}, "tokenizer.source", "'union'"),
        ({"tokenizer": {"source": "union"}}, "tokenizer.source", "'union'"),
        ({"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}, "tokenizer.pad_to_multiple_of",
         "is not supported yet"),
        ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "tokenizer", "not both"),
        ({"tokenizer": "base"}, "tokenizer", "must be a mapping"),
        ({"tokenizer_source": 3}, "tokenizer_source", "must be 'base' or a model path"),
        ({"tokenizer_source": "m+lora"}, "tokenizer_source", "MODEL+LORA"),
    ],
)
def test_tokenizer_problems(top: dict[str, Any], key: str, fragment: str) -> None:
    message = one_problem(cfg(**top))
    assert message.startswith(f"config: {key}: "), message
    assert fragment in message


def test_tokenizer_source_base_needs_a_base() -> None:
    assert one_problem(cfg(method="linear", base=None, tokenizer_source="base")) == (
        "config: tokenizer_source: 'base' needs a base_model:")


# --------------------------------------------------------------------------------------------------
# The base model and paths


def test_base_listed_under_models_is_not_an_expert() -> None:
    models = [{"model": "e1", "parameters": {"weight": 0.25}}, {"model": "./base", "parameters": {"weight": 9.0}},
              {"model": "e2", "parameters": {"weight": 0.75}}]
    config = load_config(cfg(models=models))
    assert [m.model for m in config.models] == ["e1", "e2"]
    assert [m.model for m in config.listed_models] == ["e1", "./base", "e2"]
    assert config.base_model is not None and config.base_model.model == "base"
    assert config.base_model.parameters == {"weight": 9.0}
    assert [config.param("weight", MLP.format(0), i) for i in range(2)] == [0.25, 0.75]


def test_linear_averages_the_listed_base() -> None:
    models = [{"model": "e1", "parameters": {"weight": 0.25}}, {"model": "base", "parameters": {"weight": 0.5}}]
    config = load_config(cfg(method="linear", models=models))
    assert [m.model for m in config.models] == ["e1", "base"]
    assert [config.param("weight", "x", i) for i in range(2)] == [0.25, 0.5]


def test_linear_appends_an_unlisted_base_last() -> None:
    config = load_config(cfg(method="linear", models=[{"model": "e1", "parameters": {"weight": 3}}],
                             parameters={"weight": 0.5}))
    assert [m.model for m in config.models] == ["e1", "base"]
    assert [m.model for m in config.listed_models] == ["e1"]
    assert [config.param("weight", "x", i) for i in range(2)] == [3.0, 0.5]  # the base falls back to global


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "configs"
    work = tmp_path / "work"
    config_dir.mkdir()
    work.mkdir()
    path = write(config_dir, yaml.safe_dump(cfg(base="models/base", models=[{"model": "../e1"}])))
    monkeypatch.chdir(work)
    config = load_config(path)
    assert config.base_model is not None and config.base_model.path == work / "models" / "base"
    assert config.models[0].path == tmp_path / "e1"
    assert config.models[0].model == "../e1"


def test_home_is_expanded_and_absolute_paths_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(cfg(base="~/b", models=[{"model": "/abs/e1"}]))
    assert config.base_model is not None and config.base_model.path == tmp_path / "b"
    assert config.models[0].path == Path("/abs/e1")


# --------------------------------------------------------------------------------------------------
# Resolution: gradients


def test_layer_index_patterns() -> None:
    assert layer_index("model.layers.17.mlp.up_proj.weight") == 17
    assert layer_index("transformer.h.5.attn.c_attn.weight") == 5
    assert layer_index("vision.blocks.2.attn.qkv.weight") == 2
    assert layer_index("layers.3.attention.wq.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.layers_extra.3.weight") is None
    assert layer_index("model.norm.weight") is None


def test_infer_num_layers() -> None:
    names = [MLP.format(i) for i in (0, 4, 2)] + ["lm_head.weight"]
    assert infer_num_layers(names) == 5
    assert infer_num_layers(names, {"num_hidden_layers": 12}) == 12
    assert infer_num_layers(names, {"num_hidden_layers": None}) == 5
    assert infer_num_layers(["lm_head.weight"]) is None


@pytest.mark.parametrize(("layer", "expected"), [(0, 0.1), (1, 0.3), (2, 0.5), (3, 0.7), (4, 0.9)])
def test_gradient_three_points_five_layers(layer: int, expected: float) -> None:
    assert resolve([0.1, 0.5, 0.9], MLP.format(layer), 5) == pytest.approx(expected, rel=1e-12, abs=0)


def test_gradient_endpoints_exact_and_between_points() -> None:
    values = [0.13, 0.71, 0.29]
    assert resolve(values, MLP.format(0), 4) == 0.13
    assert resolve(values, MLP.format(3), 4) == 0.29
    # layer 1 of 4: t = 1/3, between point 0 and 1 at 2/3 of the way
    assert resolve(values, MLP.format(1), 4) == pytest.approx(0.13 / 3 + 0.71 * 2 / 3, rel=1e-12)
    # layer 2 of 4: t = 2/3, between point 1 and 2 at 1/3 of the way
    assert resolve(values, MLP.format(2), 4) == pytest.approx(0.71 * 2 / 3 + 0.29 / 3, rel=1e-12)


def test_gradient_more_points_than_layers() -> None:
    # 2 layers, 5 points: only the two ends are ever reached
    assert [resolve([0.5, 0.0, 0.0, 0.0, 0.75], ATTN.format(i), 2) for i in (0, 1)] == [0.5, 0.75]


def test_one_point_gradient_is_constant() -> None:
    assert {resolve([0.42], MLP.format(i), 7) for i in range(7)} == {0.42}
    assert resolve([0.42], "lm_head.weight", None) == 0.42


def test_single_layer_model_uses_t_one_as_mergekit() -> None:
    # mergekit/plan.py plan_slice: `t = 1` when the slice (here the whole model) has one layer.
    assert gradient_t(MLP.format(0), 1) == 1.0
    assert resolve([0.2, 0.8], MLP.format(0), 1) == 0.8


def test_tensors_outside_the_layer_stack_use_t_zero() -> None:
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert resolve([0.35, 0.9], name, 10) == 0.35


def test_gradient_needs_layer_count_and_a_valid_layer() -> None:
    with pytest.raises(InputError, match="needs the number of layers"):
        resolve([0.1, 0.2], MLP.format(3), None)
    with pytest.raises(InputError, match="layer 8 is past the model's 8 layers .* filter rule"):
        resolve([0.1, 0.2], MLP.format(8), 8)
    assert resolve([{"filter": "layers.8.", "value": 0.5}, {"value": [0.1, 0.2]}], MLP.format(8), 8) == 0.5
    assert resolve(0.3, MLP.format(3), None) == 0.3  # scalars need no layer count


def test_gradient_of_ints_gives_floats_and_bools_select() -> None:
    value = resolve([1, 3], MLP.format(1), 3)
    assert value == 2.0 and type(value) is float
    assert [resolve([True, False], MLP.format(i), 3) for i in range(3)] == [True, True, False]
    assert interpolate(["inverse", True, False], 0.5) is True
    assert type(resolve(2, "x")) is float and resolve(False, "x") is False


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=1, max_size=6),
    st.integers(min_value=1, max_value=80),
    st.data(),
)
def test_gradient_properties(values: list[float], num_layers: int, data: st.DataObject) -> None:
    layer = data.draw(st.integers(min_value=0, max_value=num_layers - 1))
    got = resolve(values, MLP.format(layer), num_layers)
    assert min(values) - 1e-9 <= got <= max(values) + 1e-9
    assert resolve(values, MLP.format(num_layers - 1), num_layers) == values[-1]
    if num_layers > 1:
        assert resolve(values, MLP.format(0), num_layers) == values[0]
    # between its two neighbouring points (a one-layer model sits at t = 1, as in mergekit)
    t = layer / (num_layers - 1) if num_layers > 1 else 1.0
    scaled = t * (len(values) - 1)
    lo, hi = values[int(scaled)], values[min(len(values) - 1, int(scaled) + 1)]
    assert min(lo, hi) - 1e-9 <= got <= max(lo, hi) + 1e-9


# --------------------------------------------------------------------------------------------------
# Resolution: filters and fallback


def test_filters_first_match_wins() -> None:
    rules = [{"filter": "mlp", "value": 0.2}, {"filter": "down_proj", "value": 0.9}, {"value": 0.6}]
    assert resolve(rules, MLP.format(0)) == 0.2  # both mlp and down_proj match: the first wins
    assert resolve(rules, "model.layers.0.self_attn.o_proj.weight") == 0.6  # the rule without filter
    assert resolve([{"filter": "*", "value": 0.4}], "lm_head.weight") == 0.4  # mergekit's match-all


def test_filter_without_match_gives_default() -> None:
    rules = [{"filter": "mlp", "value": 0.2}]
    assert resolve(rules, ATTN.format(0)) is None
    assert resolve(rules, ATTN.format(0), default=0.55) == 0.55
    assert resolve({"filter": "self_attn", "value": 0.3}, ATTN.format(0)) == 0.3  # a single rule, no list


def test_gradient_inside_a_filter_value() -> None:
    rules = [{"filter": "self_attn", "value": [0.0, 0.8]}, {"value": [1.0, 0.5, 0.25]}]
    assert resolve(rules, ATTN.format(2), 9) == pytest.approx(0.2, rel=1e-12)
    assert resolve(rules, MLP.format(6), 9) == pytest.approx(0.375, rel=1e-12)
    assert resolve(rules, "lm_head.weight", 9) == 1.0


def test_param_falls_back_model_then_global_then_default() -> None:
    models = [
        {"model": "e1", "parameters": {"density": 0.3, "weight": [{"filter": "mlp", "value": 2.0}]}},
        {"model": "e2"},
    ]
    config = load_config(cfg(models=models, parameters={"density": [{"filter": "self_attn", "value": 0.7}],
                                                        "weight": 0.5}))
    assert config.param("density", MLP.format(0), 0) == 0.3  # per model
    assert config.param("density", ATTN.format(0), 1) == 0.7  # global rule
    assert config.param("density", MLP.format(0), 1) == 1.0  # global rule does not match: default
    assert config.param("weight", MLP.format(0), 0) == 2.0  # per-model rule matches
    assert config.param("weight", ATTN.format(0), 0) == 0.5  # per-model rule does not match: global
    assert config.param("weight", ATTN.format(0), 1) == 0.5
    assert config.param("weight", ATTN.format(0), None) == 0.5  # no model: the global value


def test_param_per_tensor_gradient_with_layer_count() -> None:
    config = load_config(cfg(parameters={"lambda": [1.0, 2.0]}))
    assert config.param("lambda", MLP.format(4), None, num_layers=5) == 2.0
    assert config.param("lambda", MLP.format(1), num_layers=5) == 1.25


def test_param_unknown_name() -> None:
    with pytest.raises(KeyError, match="ties has no parameter 'gamma'"):
        load_config(cfg()).param("gamma", "x", 0)


# Defaults from METHODS.md's table and mergekit (merge_methods/registry.py, generalized_task_arithmetic.py).
DEFAULTS = [
    ("linear", {"weight": 1.0, "normalize": True}),
    ("task_arithmetic", {"weight": 1.0, "lambda": 1.0, "normalize": False}),
    ("ties", {"weight": 1.0, "lambda": 1.0, "normalize": True, "density": 1.0}),
    ("dare_ties", {"weight": 1.0, "lambda": 1.0, "normalize": False, "rescale": True, "density": 1.0}),
    ("dare_linear", {"weight": 1.0, "lambda": 1.0, "normalize": False, "rescale": True, "density": 1.0}),
    ("breadcrumbs", {"weight": 1.0, "lambda": 1.0, "normalize": False, "density": 1.0, "gamma": 0.01}),
    ("breadcrumbs_ties", {"weight": 1.0, "lambda": 1.0, "density": 1.0, "gamma": 0.01}),
]


@pytest.mark.parametrize(("method", "expected"), DEFAULTS)
def test_defaults_per_method(method: str, expected: dict[str, Any]) -> None:
    config = load_config(cfg(method=method, base=None if method == "linear" else "base"))
    for name, value in expected.items():
        got = config.param(name, MLP.format(3), 0, num_layers=8)
        assert got == value and type(got) is type(value), (name, got)
    assert config.trim_scope == "tensor"


def test_int_parameters_come_back_as_floats() -> None:
    config = load_config(cfg(models=[{"model": "e1", "parameters": {"weight": 2, "density": 1}}]))
    assert [type(config.param(n, "x", 0)) for n in ("weight", "density")] == [float, float]


# --------------------------------------------------------------------------------------------------
# to_yaml round trip


RICH = {
    "name": "round-trip",
    "merge_method": "breadcrumbs_ties",
    "base_model": "base",
    "models": [
        {"model": "base"},
        {"model": "e1", "parameters": {"weight": 0.7, "density": [0.2, 0.45, 0.3],
                                       "gamma": [{"filter": "mlp", "value": [0.01, 0.05]}, {"value": 0.02}]}},
        {"model": "1e3", "parameters": {"weight": 1}},
        {"model": "e 2", "parameters": {"density": {"filter": "self_attn", "value": 0.6}}},
    ],
    "parameters": {"lambda": 0.9, "normalize": [{"filter": "lm_head", "value": False}, {"value": True}],
                   "trim_scope": "global", "int8_mask": True},
    "dtype": "bf16",
    "out_dtype": "half",
    "tokenizer": {"source": "e1"},
    "chat_template": "{% for m in messages %}{{ m.content }}\n{% endfor %}",
}


def test_to_yaml_round_trip(tmp_path: Path) -> None:
    config = load_config(copy.deepcopy(RICH))
    text = config.to_yaml()
    again = load_config(write(tmp_path, text, "fusemerge_config.yml"))
    assert again == config
    assert again.to_yaml() == text
    assert again.tokenizer_source == "e1" and again.dtype == "bfloat16" and again.out_dtype == "float16"
    assert again.listed_models[2].model == "1e3"  # quoted, so it stays a string
    assert "density: [0.2, 0.45, 0.3]" in text  # gradients in flow style, as mergekit writes them
    assert again.param("gamma", MLP.format(7), 0, num_layers=8) == 0.05  # expert 0 is e1: the base is not one
    assert again.param("gamma", ATTN.format(7), 0, num_layers=8) == 0.02
    assert again.param("gamma", MLP.format(7), 1, num_layers=8) == 0.01


def test_round_trip_is_not_vacuous() -> None:
    config = load_config(copy.deepcopy(RICH))
    changed = copy.deepcopy(RICH)
    changed["models"][1]["parameters"]["density"] = [0.2, 0.45, 0.31]
    assert load_config(changed) != config
    changed = copy.deepcopy(RICH)
    changed["parameters"]["trim_scope"] = "tensor"
    assert load_config(changed) != config


def test_to_yaml_of_minimal_config() -> None:
    data = yaml.safe_load(load_config(cfg(method="task_arithmetic")).to_yaml())
    assert data == {"merge_method": "task_arithmetic", "base_model": "base",
                    "models": [{"model": "e1"}, {"model": "e2"}]}


_names = st.sampled_from(["e1", "e2", "e3", "models/x", "1e5", "true", "a b"])
_unit = st.floats(min_value=0.01, max_value=1.0, allow_nan=False).map(lambda x: round(x, 4))
_weight = st.one_of(st.integers(-3, 3), st.floats(-2, 2, allow_nan=False))
_density = st.one_of(_unit, st.lists(_unit, min_size=1, max_size=4),
                     st.lists(st.fixed_dictionaries({"value": _unit},
                                                    optional={"filter": st.sampled_from(["mlp", "attn", "*"])}),
                              min_size=1, max_size=3))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(_names, st.fixed_dictionaries({}, optional={"weight": _weight, "density": _density})),
             min_size=1, max_size=4, unique_by=lambda m: m[0]),
    st.fixed_dictionaries({}, optional={"lambda": _weight, "normalize": st.booleans(), "density": _density}),
    st.sampled_from([None, "fp16", "bfloat16", "float"]),
)
def test_round_trip_property(models: list[tuple[str, dict[str, Any]]], params: dict[str, Any],
                             dtype: str | None) -> None:
    data: dict[str, Any] = {"merge_method": "ties", "base_model": "base",
                            "models": [{"model": n, "parameters": p} for n, p in models]}
    if params:
        data["parameters"] = params
    if dtype:
        data["dtype"] = dtype
    config = load_config(data)
    assert _reload(config) == config


def _reload(config: MergeConfig) -> MergeConfig:
    """to_yaml -> a file -> load_config (hypothesis cannot share pytest's function-scoped tmp_path)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fusemerge_config.yml"
        path.write_text(config.to_yaml(), encoding="utf-8")
        return load_config(path)


def test_docstring_examples() -> None:
    import fusemerge.config

    assert doctest.testmod(fusemerge.config).failed == 0


def test_key_near_misses_are_case_blind_and_anchor_holders_are_not_misses() -> None:
    (line,) = problems({**cfg(), "DTYPE": "bfloat16"})
    assert "DTYPE: unknown top-level key (did you mean 'dtype'?)" in line
    config = load_config({**cfg(), "params": {"weight": 1}, "model_defaults": {}, "license": "apache-2.0"})
    assert len(config.notes) == 3
    data = cfg()
    data["models"][0]["trim_scope"] = "global"
    (line,) = problems(data)
    assert "a merge parameter such as 'trim_scope' goes under the top-level parameters:" in line
    (line,) = problems({**cfg(), "trim_scope": "global"})  # at the top level itself: the hint is not "top level"
    assert "trim_scope: unknown top-level key; a merge parameter such as 'trim_scope' goes under the top-level " \
           "parameters:" in line, line


def test_nuslerp_interpolates_the_deltas_given_a_base_and_the_models_without() -> None:
    with_base = load_config(cfg(method="nuslerp", models=[{"model": "base"}, {"model": "e1"}, {"model": "e2"}]))
    assert with_base.method.needs_base and not with_base.method.combines_models
    assert [m.model for m in with_base.models] == ["e1", "e2"]  # the listed base is not one of the two
    without = load_config(cfg(method="nuslerp", base=None))
    assert not without.method.needs_base and without.method.combines_models
    assert [m.model for m in without.models] == ["e1", "e2"]
    assert without.method.name == with_base.method.name == "nuslerp"


@pytest.mark.parametrize("base", ["base", None])
@pytest.mark.parametrize("n", [1, 3])
def test_nuslerp_takes_exactly_two_models(base: str | None, n: int) -> None:
    models = [{"model": f"e{i}"} for i in range(n)]
    assert one_problem(cfg(method="nuslerp", base=base, models=models)) == (
        f"config: models: nuslerp interpolates exactly two models (besides the base_model, if given), not {n} "
        "(as in mergekit)")


def test_nuslerp_slices_take_two_sources_besides_the_base() -> None:
    def sl(*models: str) -> dict:
        return {"sources": [{"model": m, "layer_range": [0, 2]} for m in models]}

    load_config({"merge_method": "nuslerp", "slices": [sl("e1", "e2")]})
    load_config({"merge_method": "nuslerp", "base_model": "b", "slices": [sl("e1", "b", "e2")]})
    assert one_problem({"merge_method": "nuslerp", "slices": [sl("e1", "e2", "e3")]}) == (
        "config: slices[0].sources: nuslerp interpolates exactly two models per slice (besides the base_model, "
        "if given), not 3 (as in mergekit)")
    assert "not 1" in one_problem({"merge_method": "nuslerp", "base_model": "b", "slices": [sl("b", "e1")]})


def test_nuslerp_flatten_takes_both_values_and_row_wise_is_mergekits_no_op() -> None:
    load_config(cfg(method="nuslerp", parameters={"nuslerp_flatten": False}))  # one arc per row
    load_config(cfg(method="nuslerp", parameters={"nuslerp_flatten": True, "nuslerp_row_wise": True}))
    assert "must be true or false" in one_problem(cfg(method="nuslerp", parameters={"nuslerp_flatten": "no"}))
    assert "density: unknown parameter for nuslerp" in one_problem(cfg(method="nuslerp", parameters={"density": 0.5}))
