"""Inputs a hostile or unlucky user gives the command line: float formats fusemerge does not merge, a shard
missing from a download, weights that resolve to a zero sum per tensor, a tokenizer_source with nothing in it,
config.json defaults, and option values out of range. Each is refused before anything is merged (exit 2, one
line naming the file, tensor or key), or handled as the spec says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.cli_helpers import invoke, make_cli_family
from tests.test_cli import _edit_config, assert_nothing_written, errors


@pytest.fixture()
def fam(tmp_path: Path) -> dict:
    return make_cli_family(tmp_path)


def _convert(model_dir: Path, dtype: torch.dtype) -> None:
    path = model_dir / "model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, str(path))


@pytest.mark.parametrize("dtype,code", [(torch.float64, "F64"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_float_formats_the_kernels_do_not_take_are_refused_not_copied(fam, tmp_path, dtype, code) -> None:
    for d in [fam["base"], *fam["experts"]]:
        _convert(d, dtype)
    r = invoke("run", fam["config"], tmp_path / "out")
    assert r.exit_code == 2, r.output
    (line,) = errors(r)
    assert f"tensor(s) of dtype {code} (first: '" in line and str(fam["base"]) in line, line
    assert ("scales" in line) == code.startswith("F8")
    assert_nothing_written(tmp_path / "out")
    # passthrough copies bytes: an F64 model can still be sliced and stacked
    if code == "F64":
        cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(fam["base"]),
                                                                       "layer_range": [0, 2]}]}]}
        (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
        r = invoke("run", tmp_path / "p.yml", tmp_path / "p-out", "-q")
        assert r.exit_code == 0, r.output
        assert load_file(tmp_path / "p-out" / "model.safetensors")["model.norm.weight"].dtype == torch.float64


def test_a_shard_missing_from_a_download_is_refused_by_plan_and_inspect(fam, tmp_path) -> None:
    base = fam["base"]
    tensors = load_file(base / "model.safetensors")
    names = sorted(tensors)
    (base / "model.safetensors").unlink()
    for i, part in enumerate((names[:5], names[5:10], names[10:]), start=1):
        if i != 2:  # shard 2 of 3 never arrived, and there is no index
            save_file({n: tensors[n] for n in part}, str(base / f"model-0000{i}-of-00003.safetensors"))
    for cmd in (("plan", fam["config"]), ("inspect", base)):
        r = invoke(*cmd)
        assert r.exit_code == 2, r.output
        assert any("model-00002-of-00003.safetensors missing (2 of 3 present" in e for e in errors(r)), r.stderr


def test_weights_that_add_up_to_zero_in_some_tensors_are_refused_naming_them(fam, tmp_path) -> None:
    """Scalar weights adding up to 0 are a config error; gradients do so only in some tensors."""
    def edit(c):
        c.update(merge_method="linear", parameters={"normalize": True})
        c.pop("base_model")
        c["models"][0]["parameters"] = {"weight": [1.0, 0.0]}
        c["models"][1]["parameters"] = {"weight": [-1.0, 0.0]}

    r = invoke("plan", _edit_config(fam, tmp_path, edit))
    assert r.exit_code == 2, r.output
    lines = errors(r)
    assert lines and all("which add up to 0, and normalize is true" in line for line in lines), lines
    assert any("tensor 'lm_head.weight': the weights resolve to [1.0, -1.0]" in line for line in lines)
    # one line for them all (a gradient cancels on every tensor of its layer), naming the first few
    assert len(lines) == 1 and "other tensors: 'model.embed_tokens.weight', 'model.layers.0." in lines[0], lines
    assert "more): give the models' parameters.weight values" in lines[0]


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_tokenizer_source_that_holds_no_tokenizer_is_refused(fam, tmp_path, where) -> None:
    source = tmp_path / "tok"
    if where == "empty":
        source.mkdir()
        (source / "README.md").write_text("no tokenizer here")
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c.update(tokenizer_source=str(source))))
    assert r.exit_code == 2, r.output
    (line,) = errors(r)
    assert ("no such directory" if where == "missing" else f"{source} holds no tokenizer files") in line, line


def test_config_json_gets_the_output_dtype_and_comes_from_the_first_model_that_has_one(fam, tmp_path) -> None:
    for d in [fam["base"], *fam["experts"]]:  # no torch_dtype anywhere, no dtype: in the merge config
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("torch_dtype", None)
        (d / "config.json").write_text(json.dumps(cfg))
    (fam["base"] / "config.json").unlink()
    r = invoke("run", fam["config"], tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["torch_dtype"] == "bfloat16"
    assert out == {**json.loads((fam["experts"][0] / "config.json").read_text()), "torch_dtype": "bfloat16"}
    for d in fam["experts"]:
        (d / "config.json").unlink()
    r = invoke("plan", fam["config"])
    assert r.exit_code == 0 and "no input model has a config.json" in r.output, r.output


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_are_refused(fam, workers) -> None:
    r = invoke("plan", fam["config"], "--workers", workers)
    assert r.exit_code == 2
    assert errors(r) == [f"fusemerge: error: --workers {workers}: must be a whole number of at least 1"], r.stderr


def test_out_dir_dot_is_the_current_directory(fam, tmp_path, monkeypatch) -> None:
    """An empty current directory is merged into; a non-empty one is not replaced, even with --overwrite (it
    would delete what the user works beside, and leave the shell in a deleted directory)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    r = invoke("run", fam["config"], ".", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "here" / "model.safetensors").is_file()
    monkeypatch.chdir(tmp_path / "here")  # the merge replaced the directory: its new inode
    r = invoke("run", fam["config"], ".", "--overwrite", "-q")
    assert r.exit_code == 2 and "is the current directory, which --overwrite would delete" in r.stderr, r.output
    assert (tmp_path / "here" / "model.safetensors").is_file()


def test_bench_refuses_shapes_out_of_range() -> None:
    for option, value in (("--hidden", "0"), ("--experts", "-2"), ("--density", "0")):
        r = invoke("bench", option, value)
        assert r.exit_code == 2 and "Invalid value" in r.output, (option, r.output)


def _tokenizer(n: int, swap: bool = False) -> str:
    vocab = {f"t{i}": i for i in range(n)}
    if swap:
        vocab["t10"], vocab["t11"] = 11, 10
    return json.dumps({"version": "1.0", "added_tokens": [], "model": {"type": "WordLevel", "vocab": vocab,
                                                                        "unk_token": "t0"}})


@pytest.mark.parametrize("source", ["base", "expert"])
def test_tokenizer_source_with_tokens_numbered_differently_is_refused(fam, tmp_path, source) -> None:
    """mergekit re-aligns embedding rows by token for tokenizer_source; fusemerge merges them by index, which is
    the same only when every model numbers its tokens alike."""
    rows = 53  # tests/cli_helpers.SHAPE's vocab
    for d in [fam["base"], *fam["experts"]]:
        (d / "tokenizer.json").write_text(_tokenizer(rows))
    (fam["experts"][1] / "tokenizer.json").write_text(_tokenizer(rows, swap=True))
    value = "base" if source == "base" else str(fam["experts"][0])
    path = _edit_config(fam, tmp_path, lambda c: c.update(tokenizer_source=value))
    r = invoke("plan", path)
    assert r.exit_code == 2, r.output
    (line,) = errors(r)
    assert f"{fam['experts'][1]} numbers its tokens differently" in line and "'t10': id 11 against 10" in line
    (fam["experts"][1] / "tokenizer.json").write_text(_tokenizer(rows))  # one vocabulary: planned, no warning
    r = invoke("plan", path)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    if source == "base":  # a model that only added tokens after the source's numbers them alike
        superset = json.loads(_tokenizer(rows))
        superset["added_tokens"] = [{"id": rows, "content": "<extra>"}]
        (fam["experts"][1] / "tokenizer.json").write_text(json.dumps(superset))
        assert invoke("plan", path).exit_code == 0


def test_tokenizer_source_shorter_than_the_embedding_warns_that_rows_are_kept(fam, tmp_path) -> None:
    for d in [fam["base"], *fam["experts"]]:
        (d / "tokenizer.json").write_text(_tokenizer(50))  # 53 rows: 3 of padding
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c.update(tokenizer_source="base")))
    assert r.exit_code == 0, r.output
    assert "weight' has 53 rows and the tokenizer 50 tokens: fusemerge keeps the models' rows" in r.output


def test_keys_mergekit_ignores_are_plan_warnings(fam, tmp_path) -> None:
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c.update(out_path="./merged")))
    assert r.exit_code == 0, r.output
    assert "out_path: unknown top-level key, ignored (as mergekit ignores it)" in r.output


def test_model_plus_lora_is_said_once(fam, tmp_path) -> None:
    lora = f"{fam['experts'][0]}+{tmp_path / 'adapter'}"
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c["models"][0].update(model=lora)))
    assert r.exit_code == 2
    assert [e for e in errors(r) if "LoRA" in e] and not [e for e in errors(r) if "no such file" in e], r.stderr


def test_a_tokenizer_source_under_home_is_copied(fam, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tok = tmp_path / "home" / "tok"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text((fam["base"] / "tokenizer.json").read_text() + "\n")  # the same vocabulary
    r = invoke("run", _edit_config(fam, tmp_path, lambda c: c.update(tokenizer_source="~/tok")), tmp_path / "out",
               "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tok / "tokenizer.json").read_text()


def test_passthrough_refuses_to_change_a_float_format_it_cannot_convert(fam, tmp_path) -> None:
    _convert(fam["base"], torch.float64)
    cfg = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [{"model": str(fam["base"]), "layer_range": [0, 2]}]}]}
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    r = invoke("plan", tmp_path / "p.yml")
    assert r.exit_code == 2 and any("has dtype F64: passthrough copies it as it is" in e for e in errors(r)), r.output


def test_weights_that_add_up_to_zero_in_float32_are_refused(fam, tmp_path) -> None:
    """0.1 - 0.10000000149011612 is not 0 exactly but is 0 in float32, as the kernels add it (they would divide
    by 1 instead)."""
    def edit(c):
        c.update(merge_method="task_arithmetic", parameters={"normalize": True})
        c["models"][0]["parameters"] = {"weight": 0.1}
        c["models"][1]["parameters"] = {"weight": -0.10000000149011612}  # -float32(0.1)

    r = invoke("plan", _edit_config(fam, tmp_path, edit))
    assert r.exit_code == 2 and any("the weights add up to 0" in e for e in errors(r)), r.output


def test_vocabularies_are_compared_from_vocab_json_too_and_a_skipped_comparison_is_said(fam, tmp_path) -> None:
    for d in [fam["base"], *fam["experts"]]:
        (d / "tokenizer.json").unlink()
        (d / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(53)}))
    (fam["experts"][1] / "vocab.json").write_text(json.dumps({f"t{i}": 52 - i for i in range(53)}))
    path = _edit_config(fam, tmp_path, lambda c: c.update(tokenizer_source="base"))
    r = invoke("plan", path)
    assert r.exit_code == 2 and any("numbers its tokens differently" in e for e in errors(r)), r.output
    (fam["experts"][1] / "vocab.json").unlink()
    r = invoke("plan", path)
    assert r.exit_code == 0 and "has no readable vocab.json: its vocabulary was not compared" in r.output


def test_chat_template_is_said_to_be_kept_not_applied(fam, tmp_path) -> None:
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c.update(chat_template="chatml")))
    assert r.exit_code == 0 and "chat_template: kept in fusemerge_config.yml, not written" in r.output


@pytest.mark.parametrize("names,problem", [
    (["model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"], None),  # counted from 0
    (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model-00003-of-00002.safetensors"],
     "model-00003-of-00002.safetensors is beyond its set of 2"),
])
def test_shard_sets_counted_from_zero_and_stray_shards(tmp_path, names, problem) -> None:
    from fusemerge.errors import InputError
    from fusemerge.streaming.model_index import open_model

    d = tmp_path / "m"
    d.mkdir()
    for i, name in enumerate(names):
        save_file({f"t{i}": torch.ones(2)}, str(d / name))
    if problem is None:
        assert len(open_model(d).tensors) == len(names)
    else:
        with pytest.raises(InputError, match=problem):
            open_model(d)


def test_resume_of_a_finished_merge_does_nothing_and_of_another_is_refused(fam, tmp_path) -> None:
    """A requeued job: `run --resume` into the directory a finished run of the same merge wrote is a no-op (it
    was 'exists and is not empty', exit 2); another merge there is still refused."""
    out = tmp_path / "out"
    assert invoke("run", fam["config"], out, "-q").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = invoke("run", fam["config"], out, "--resume")
    assert r.exit_code == 0 and "already holds this merge, finished; nothing to resume" in r.output, r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = _edit_config(fam, tmp_path, lambda c: c["models"][0]["parameters"].update(density=0.25))
    r = invoke("run", other, out, "--resume")
    assert r.exit_code == 2 and any("exists and is not empty" in e for e in errors(r)), r.output


def test_resume_of_a_finalized_merge_does_nothing(fam, tmp_path) -> None:
    out = tmp_path / "out"
    for i in range(2):
        assert invoke("run", fam["config"], out, "--partition", f"{i}/2", "--out-shard-size", "4KB", "-q"
                      ).exit_code == 0
    assert invoke("finalize", out, "-q").exit_code == 0
    r = invoke("run", fam["config"], out, "--resume", "--out-shard-size", "4KB")
    assert r.exit_code == 0 and "nothing to resume" in r.output, r.output


def test_a_config_that_fails_to_load_still_has_its_models_cross_checked(fam, tmp_path) -> None:
    """One run names every problem: a bad method and an expert whose tensor has another shape or is missing."""
    path = fam["experts"][1] / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if "mlp" in n)
    tensors[name] = torch.randn(3, 5, dtype=tensors[name].dtype)
    gone = next(n for n in tensors if "norm" in n)
    del tensors[gone]
    save_file(tensors, str(path))
    r = invoke("plan", _edit_config(fam, tmp_path, lambda c: c.update(merge_method="tiez")))
    assert r.exit_code == 2, r.output
    lines = errors(r)
    assert any("tiez" in e for e in lines), lines
    assert any(f"tensor '{name}': shape mismatch" in e and str(fam["experts"][1]) in e for e in lines), lines
    assert any(f"tensor '{gone}' is missing in {fam['experts'][1]}" in e for e in lines), lines
    # the same lines as when the config is good
    good = errors(invoke("plan", fam["config"]))
    assert [e for e in lines if "tiez" not in e] == good, (lines, good)


def test_layers_named_from_the_start_of_the_name_are_counted(tmp_path) -> None:
    """Meta-style names (`layers.N.w`, no `model.` prefix) and no num_hidden_layers: L is the largest index + 1
    for slices and gradients alike (the layer count once read only names with a dot before `layers`)."""
    models = []
    for k, name in enumerate(["base", "expert"]):
        d = tmp_path / name
        d.mkdir()
        g = torch.Generator().manual_seed(k)
        save_file({"tok_embeddings.weight": torch.randn(8, 4, generator=g), "norm.weight": torch.randn(4, generator=g),
                   **{f"layers.{i}.w": torch.randn(4, 4, generator=g) for i in range(3)}}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        models.append(d)
    sliced = tmp_path / "s.yml"
    sliced.write_text(yaml.safe_dump({"merge_method": "passthrough",
                                      "slices": [{"sources": [{"model": str(models[0]), "layer_range": [0, 3]}]}]}))
    r = invoke("run", sliced, tmp_path / "out-s")
    assert r.exit_code == 0, r.output
    graded = tmp_path / "g.yml"
    graded.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(models[0]),
                                      "models": [{"model": str(models[1]), "parameters": {"weight": [0.0, 1.0]}}]}))
    r = invoke("run", graded, tmp_path / "out-g")
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "out-g" / "model.safetensors")
    base, expert = load_file(models[0] / "model.safetensors"), load_file(models[1] / "model.safetensors")
    for i, weight in enumerate([0.0, 0.5, 1.0]):  # t = i / (L - 1), L = 3
        want = base[f"layers.{i}.w"] + weight * (expert[f"layers.{i}.w"] - base[f"layers.{i}.w"])
        torch.testing.assert_close(out[f"layers.{i}.w"], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("where, value", [("weight", 1e39), ("lambda", -4e38)])
def test_parameters_beyond_float32_are_refused(fam, tmp_path, where, value) -> None:
    """The math is float32: a weight of 1e39 is infinite there (the compiled and torch paths then disagreed on
    0 x inf); refused before anything is merged."""
    def edit(c: dict) -> None:
        if where == "weight":
            c["models"][0]["parameters"]["weight"] = value
        else:
            c.setdefault("parameters", {})["lambda"] = value

    r = invoke("run", _edit_config(fam, tmp_path, edit), tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert any(f"{value!r} is beyond float32's range" in e for e in errors(r)), r.output
    assert_nothing_written(tmp_path / "out")


def test_a_weight_that_is_0_in_float32_counts_as_0() -> None:
    """TIES with normalize and weights that are all positive but one is 1e-46 (0 in float32): where no expert
    agrees, D = 0 -> 1 (the smallest weight, 0 in float32, was taken as D's floor: 0 / 0 = NaN)."""
    from fusemerge import merge_tensors

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU tensors would need the interpreter
    base = torch.full((4,), 0.5, device=dev)
    experts = [torch.tensor([1.5, -1.0, 2.0, -2.0], device=dev), torch.tensor([0.5, 1.0, -2.0, 2.0], device=dev)]
    for backend in ("torch", "triton"):  # entry 0: 0 x w and 0, so no expert agrees
        out = merge_tensors(base, experts, "ties", weight=[1e-46, 1.0], density=1.0, backend=backend).cpu()
        assert out[0] == 0.5 and not out.isnan().any(), (backend, out)


def test_a_config_that_fails_to_load_opens_its_models_under_home(fam, tmp_path, monkeypatch) -> None:
    """`~/model` paths in a config that does not load are opened where load_config would open them (they were
    opened literally and reported missing)."""
    monkeypatch.setenv("HOME", str(tmp_path))

    def edit(c: dict) -> None:
        c["merge_method"] = "tiez"
        c["base_model"] = "~/" + str(Path(c["base_model"]).relative_to(tmp_path))
        for m in c["models"]:
            m["model"] = "~/" + str(Path(m["model"]).relative_to(tmp_path))

    r = invoke("plan", _edit_config(fam, tmp_path, edit))
    assert r.exit_code == 2
    assert [e for e in errors(r) if "tiez" in e] and not [e for e in errors(r) if "no such" in e], r.output
