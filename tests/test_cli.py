"""The command line: exit codes, one line per problem naming the file / tensor / key, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import fusemerge
from fusemerge.errors import InputError
from fusemerge.methods import METHODS
from tests.cli_helpers import invoke, make_cli_family


@pytest.fixture()
def fam(tmp_path: Path) -> dict:
    return make_cli_family(tmp_path)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fusemerge: error:")]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".fusemerge-tmp" in p.name]


def test_run_plan_inspect_succeed(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke("plan", fam["config"])
    assert r.exit_code == 0, r.output
    assert "plan OK" in r.stdout and "ties" in r.stdout
    r = invoke("run", fam["config"], out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and (out / "fusemerge_config.yml").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "parameters" in r.stdout and "model.norm.weight" in r.stdout


def test_verbose_run_prints_stage_times_and_startup(fam: dict, tmp_path: Path) -> None:
    r = invoke("run", fam["config"], tmp_path / "out", "-v")
    assert r.exit_code == 0, r.output
    stages = next(line for line in r.stderr.splitlines() if line.startswith("stage seconds"))
    assert re.search(r"read \d+\.\d\d, statistics \d+\.\d\d, merge \d+\.\d\d, write \d+\.\d\d; then fsync", stages)
    line = next(line for line in r.stderr.splitlines() if line.startswith("first piece of each stage done"))
    firsts = dict((name, float(at)) for name, at in re.findall(r"(\w+) after (\d+\.\d\d) s", line))
    assert set(firsts) == {"read", "statistics", "merge", "write"}  # ties: every stage ran
    ordered = [float(at) for at in re.findall(r"after (\d+\.\d\d) s", line)]
    assert ordered == sorted(ordered)  # listed in the order they first finished
    assert firsts["read"] <= firsts["statistics"] <= firsts["merge"] <= firsts["write"]  # the CPU path's order
    assert not any(line.startswith("DARE masks") for line in r.stderr.splitlines())


@pytest.mark.parametrize("rescale", [True, "inverse"])
def test_verbose_dare_run_says_how_its_masks_were_drawn(fam: dict, tmp_path: Path, rescale) -> None:
    cfg = yaml.safe_load(fam["config"].read_text())
    cfg["merge_method"] = "dare_ties"
    cfg.setdefault("parameters", {})["rescale"] = rescale
    path = tmp_path / "dare.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = invoke("run", path, tmp_path / "out", "-v")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("DARE masks")]
    if rescale == "inverse":  # no statistics pass, small merge: nothing to keep, drawn in the threads
        assert not lines
        return
    m = re.fullmatch(r"DARE masks: ([\d,]+) chunk runs drawn \(in the (?:merge threads|2 merge worker processes)\)"
                     r" by (?:the compiled keep test|numpy), ([\d,]+) reused by the merge pass from the statistics "
                     r"pass", lines[0])
    assert m, lines
    drawn, reused = (int(g.replace(",", "")) for g in m.groups())
    assert drawn > 0 and reused == drawn  # a tiny merge: every mask fits, each drawn once and used twice


def test_run_without_tokenizer_and_out_dtype(fam: dict, tmp_path: Path) -> None:
    cfg = yaml.safe_load(fam["config"].read_text())
    cfg["out_dtype"] = "float32"
    path = tmp_path / "f32.yml"
    path.write_text(yaml.safe_dump(cfg))
    r = invoke("run", path, tmp_path / "out", "--quiet", "--no-copy-tokenizer")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "header_length":
        path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    elif how == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file at all")


@pytest.mark.parametrize("how", ["truncated", "header_length", "garbage"])
def test_broken_safetensors_exit_2_naming_the_file(fam: dict, tmp_path: Path, how: str) -> None:
    broken = fam["experts"][1] / "model.safetensors"
    _break(broken, how)
    for cmd in (["plan", fam["config"]], ["run", fam["config"], tmp_path / "out"]):
        r = invoke(*cmd)
        assert r.exit_code == 2, r.output
        assert errors(r) and all(str(broken) in e or "expert_2" in e for e in errors(r)), r.stderr
        assert "Traceback" not in r.output
    assert_nothing_written(tmp_path / "out")


def _edit_config(fam: dict, tmp_path: Path, fn) -> Path:
    cfg = yaml.safe_load(fam["config"].read_text())
    fn(cfg)
    path = tmp_path / "edited.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(merge_method="tiez"), "tiez"),
    (lambda c: c["models"][0]["parameters"].update(densty=0.3), "densty"),
    (lambda c: c["models"][1]["parameters"].update(density=1.5), "density"),
    (lambda c: c["models"][1]["parameters"].update(density=0), "density"),
    (lambda c: c["models"][0].update(model="/nonexistent/model"), "/nonexistent/model"),
    (lambda c: c.update(slices=[]), "slices"),
])
def test_bad_config_exit_2_naming_the_key(fam: dict, tmp_path: Path, edit, needle: str) -> None:
    path = _edit_config(fam, tmp_path, edit)
    r = invoke("run", path, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert any(needle in e for e in errors(r)), r.stderr
    assert_nothing_written(tmp_path / "out")


def _rewrite(model_dir: Path, fn) -> None:
    from safetensors.torch import load_file

    tensors = load_file(model_dir / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.norm.weight": torch.ones(17, dtype=torch.bfloat16)}), "shape mismatch"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int16)}), "dtype mismatch"),
    (lambda t: t.update({"model.embed_tokens.weight": torch.ones(60, 16, dtype=torch.bfloat16)}), "vocabularies"),
])
def test_model_mismatch_exit_2(fam: dict, tmp_path: Path, change, needle: str) -> None:
    _rewrite(fam["experts"][0], change)
    r = invoke("run", fam["config"], tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert any(needle in e and "expert_1" in e for e in errors(r)), r.stderr
    assert_nothing_written(tmp_path / "out")


def test_every_problem_is_reported_at_once(fam: dict, tmp_path: Path) -> None:
    _rewrite(fam["experts"][0], lambda t: t.pop("model.norm.weight"))
    _break(fam["experts"][1] / "model.safetensors", "truncated")
    path = _edit_config(fam, tmp_path, lambda c: c["models"].append({"model": str(tmp_path / "missing")}))
    r = invoke("plan", path)
    assert r.exit_code == 2
    text = "\n".join(errors(r))
    assert "missing" in text and "expert_2" in text and "truncated" in text


@pytest.mark.parametrize("config_broken", [False, True])
def test_option_problems_are_reported_with_the_config_and_each_other(fam: dict, tmp_path: Path,
                                                                      config_broken: bool) -> None:
    path = _edit_config(fam, tmp_path, lambda c: c.update(merge_method="tie") if config_broken else None)
    r = invoke("plan", path, "--device", "bogus", "--max-memory", "3XB", "--out-shard-size", "zz",
               "--partition", "3/2")
    assert r.exit_code == 2
    lines = errors(r)
    for option in ("--device bogus", "--max-memory", "--out-shard-size", "--partition"):
        assert sum(option in line for line in lines) == 1, (option, lines)
    assert any("merge_method" in line for line in lines) == config_broken, lines
    with pytest.raises(InputError) as e:  # the API's backend is not checked by click
        fusemerge.build_plan(path, device="bogus", backend="cuda", max_memory="3XB")
    for option in ("device='bogus'", "backend='cuda'", "max_memory:"):  # as the API spells them
        assert sum(option in line for line in e.value.problems) == 1, (option, e.value.problems)


def test_existing_out_dir_is_refused_and_kept(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = invoke("run", fam["config"], out)
    assert r.exit_code == 2 and any("--overwrite" in e for e in errors(r))
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    r = invoke("run", fam["config"], out, "--overwrite", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_out_dir_containing_an_input_is_refused_even_with_overwrite(fam: dict, tmp_path: Path) -> None:
    r = invoke("run", fam["config"], fam["base"].parent, "--overwrite")
    assert r.exit_code == 2
    assert fam["base"].is_dir() and (fam["base"] / "model.safetensors").is_file()


def test_demo(tmp_path: Path) -> None:
    r = invoke("demo", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "equals the in-memory" in r.stdout
    r = invoke("demo", tmp_path / "demo", "--method", "dare_linear", "-q")  # a demo dir is reused
    assert r.exit_code == 0, r.output
    shutil.rmtree(tmp_path / "demo")


def test_bench_and_inspect_of_one_file(fam: dict) -> None:
    r = invoke("bench", "--hidden", "16", "--intermediate", "40", "--layers", "2", "--vocab", "53", "--experts", "2")
    assert r.exit_code == 0, r.output
    assert "GB/s of input" in r.stdout
    r = invoke("inspect", fam["base"] / "model.safetensors", "--no-tensors")
    assert r.exit_code == 0, r.output
    assert "parameters" in r.stdout and "shards      1" in r.stdout


@pytest.mark.parametrize("method", [m for m in METHODS if m != "passthrough"])
def test_bench_runs_every_method_it_offers(method: str) -> None:
    """Every --method choice merges: the density only where the method takes one (sce: its select_topk), a t where
    it needs one, and the experts a method takes a fixed number of (slerp's one, nuslerp's two)."""
    r = invoke("bench", "--method", method, "--hidden", "16", "--intermediate", "40", "--layers", "1", "--vocab", "37",
               "--experts", "3")
    assert r.exit_code == 0, r.output
    assert "GB/s of input" in r.stdout and f"{method}, " in r.stdout


def test_inspect_missing_path_exit_2(tmp_path: Path) -> None:
    r = invoke("inspect", tmp_path / "nope")
    assert r.exit_code == 2 and errors(r) and str(tmp_path / "nope") in errors(r)[0]


# --------------------------------------------------------------------------------------------------
# mergekit's command-line habits


def test_mergekit_flags_are_accepted_with_a_note(fam: dict, tmp_path: Path) -> None:
    r = invoke("run", fam["config"], tmp_path / "out", "--quiet", "--allow-crimes", "--lazy-unpickle",
               "--trust-remote-code", "--copy-tokenizer")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("fusemerge: note:")]
    assert len(notes) == 2 and "--allow-crimes" in notes[0] and "--trust-remote-code" in notes[1]
    r = invoke("plan", fam["config"], "--no-lazy-unpickle", "--allow-crimes")
    assert r.exit_code == 0 and "plan OK" in r.stdout
    r = invoke("run", fam["config"], tmp_path / "out2", "--quiet", "--lazy-unpickle")
    assert r.exit_code == 0 and not r.stderr  # a silent no-op


def test_cuda_flag_is_device_cuda(fam: dict, tmp_path: Path) -> None:
    r = invoke("plan", fam["config"], "--cuda")
    if torch.cuda.is_available():
        assert r.exit_code == 0 and "device        cuda" in r.stdout
    else:
        assert r.exit_code == 2 and errors(r) == ["fusemerge: error: --device cuda: no CUDA device is available on "
                                                  "this machine"]
    r = invoke("plan", fam["config"], "--cuda", "--device", "cpu")
    assert r.exit_code == 2 and "--cuda and --device cpu disagree" in r.stderr


def test_device_lists_name_gpus(fam: dict, monkeypatch) -> None:
    """--device cuda:0,cuda:1 (or cuda:0,1): several GPUs; lists of non-GPUs, repeats and absent GPUs are exit 2."""
    from fusemerge.planner import resolve_devices

    r = invoke("plan", fam["config"], "--device", "cpu,cpu")
    assert r.exit_code == 2 and "a list of devices must be GPUs" in r.stderr
    r = invoke("plan", fam["config"], "--device", "gpu0,gpu1")
    assert r.exit_code == 2 and "--device gpu0: expected auto, cpu, cuda" in r.stderr
    if not torch.cuda.is_available():
        r = invoke("plan", fam["config"], "--device", "cuda:0,cuda:1")
        assert r.exit_code == 2 and "no CUDA device is available" in r.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda:0,1") == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert resolve_devices("cuda,cuda:1") == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert resolve_devices("cuda:1") == (torch.device("cuda", 1),)
    for bad, why in (("cuda:0,cuda:0", "listed twice"), ("cuda:0,cuda:2", "has 2 CUDA device(s)"),
                     ("cuda:0,cpu", "must be GPUs")):
        with pytest.raises(InputError, match=re.escape(why)):
            resolve_devices(bad)


def test_random_seed_is_seed(fam: dict, tmp_path: Path) -> None:
    cfg = _edit_config(fam, tmp_path, lambda c: c.update(merge_method="dare_ties"))
    for i, flags in enumerate([("--seed", "7"), ("--random-seed", "7"), ("--seed", "8")]):
        r = invoke("run", cfg, tmp_path / f"out{i}", "--quiet", *flags)
        assert r.exit_code == 0, r.output
    data = [(tmp_path / f"out{i}" / "model.safetensors").read_bytes() for i in range(3)]
    assert data[0] == data[1] != data[2]
    r = invoke("plan", cfg, "--seed", "1", "--random-seed", "2")
    assert r.exit_code == 2 and "--seed 1 and --random-seed 2 disagree" in r.stderr


def test_out_shard_size_reads_mergekit_forms(fam: dict, tmp_path: Path) -> None:
    # mergekit's parse_kmb: "5k" is 5,000 bytes (--max-memory would read "5K" as KiB); "5B" is 5e9 bytes
    r = invoke("run", fam["config"], tmp_path / "out", "--quiet", "--out-shard-size", "5k")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    sizes = [(tmp_path / "out" / s).stat().st_size for s in shards]
    biggest_tensor = max(t.numel() * 2 for t in load_file_all(fam["base"]).values())
    assert all(s <= max(5_000, biggest_tensor) + 4096 for s in sizes)  # + header
    r = invoke("run", fam["config"], tmp_path / "one", "--quiet", "--out-shard-size", "5B")
    assert r.exit_code == 0 and (tmp_path / "one" / "model.safetensors").is_file()


def load_file_all(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(merge_method="arcee_fusion"),
     "'arcee_fusion' is a mergekit method fusemerge does not support yet"),
    (lambda c: c.update(modules={"text": {}}), "modules: configs are not supported yet"),
    (lambda c: (c.pop("models"), c.update(slices=[{"sources": [{"model": c["base_model"], "layer_range": [0, 2]}],
                                                    "base_model": c["base_model"]}])),
     "slices[0].base_model: a per-slice base_model: is not supported yet"),
    (lambda c: c.update(tokenizer={"source": "union"}), "'union' (building a merged vocabulary) is not supported"),
    (lambda c: c["models"][0].update(model=c["models"][0]["model"] + "+lora"), "LoRA adapters are not supported"),
])
def test_unsupported_feature_fails_in_plan_naming_it(fam: dict, tmp_path: Path, edit, needle: str) -> None:
    path = _edit_config(fam, tmp_path, edit)
    for args in (("plan", path), ("run", path, tmp_path / "out")):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert any(needle in e for e in errors(r)), r.stderr
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("text", ["[" * 3000, "models: " + "[" * 3000 + "]" * 3000, "merge_method: ties\nmodels: 5\n",
                                  "base_model: " + "{a: " * 2000 + "}" * 2000])
def test_plan_of_a_broken_config_is_exit_2_never_an_internal_error(tmp_path: Path, text: str) -> None:
    """Found by bench/fuzz.py at 10^5 cases: `plan` re-reads an invalid config for its model paths too."""
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    res = invoke("plan", cfg)
    assert res.exit_code == 2, res.output
    assert "internal error" not in res.output and str(cfg) in res.output


def test_ctrl_c_in_finalize_says_to_run_it_again(monkeypatch, tmp_path: Path) -> None:
    import fusemerge.partition

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusemerge.partition, "finalize", interrupted)
    r = invoke("finalize", tmp_path / "out")
    assert r.exit_code == 130
    assert errors(r) == ["fusemerge: error: interrupted; the parts are as they were (run the same command again)"]


# A module run as `python -m`, as `python -m fusemerge` is: the signal at the first import of the module named in
# argv[1], from inside a string exec (where dataclasses' methods are made; a KeyboardInterrupt ending one made
# `python -m` exit by SIGINT, status -2, though fusemerge caught it), then fusemerge's __main__ on the rest of argv.
_SIGNAL_AT_IMPORT = """
import runpy, signal, sys

at, signum = sys.argv.pop(1), getattr(signal, sys.argv.pop(1))

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == at:
            sys.meta_path.remove(self)
            exec("signal.raise_signal(signum)", {"signal": signal, "signum": signum})

sys.meta_path.insert(0, SignalAtImport())
runpy.run_module("fusemerge", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("at, sig, code, message", [
    ("fusemerge.cli", "SIGINT", 130, "interrupted"),  # start-up: the command line's import (it was a traceback)
    ("torch", "SIGINT", 130, "interrupted"),  # start-up: torch's (aborted the process in its C++ at times)
    ("torch", "SIGTERM", 143, "terminated (SIGTERM)"),
    ("fusemerge.planner", "SIGINT", 130, "interrupted; nothing was written to the output directory (run the same "
                                         "command with --resume to continue)"),  # the command's work: was -2
])
def test_ctrl_c_at_any_point_of_start_up_is_exit_130_and_one_line(fam: dict, tmp_path: Path, at: str, sig: str,
                                                                    code: int, message: str) -> None:
    import subprocess
    import sys

    (tmp_path / "signal_at_import.py").write_text(_SIGNAL_AT_IMPORT)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "signal_at_import", at, sig, "run", str(fam["config"]),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo)])})
    assert (r.returncode, r.stderr) == (code, f"fusemerge: error: {message}\n")
    assert_nothing_written(tmp_path / "out")


def test_a_closed_pipe_ends_the_command_quietly(fam: dict) -> None:
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m fusemerge inspect {fam['base']} | head -1", shell=True,
                       capture_output=True, text=True, cwd="/")
    assert "error" not in p.stderr, p.stderr


def test_demo_config_names_its_models_by_absolute_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke("demo", "d", "-q").exit_code == 0
    cfg = yaml.safe_load((tmp_path / "d" / "ties.yml").read_text())
    assert all(Path(m["model"]).is_absolute() for m in cfg["models"]) and Path(cfg["base_model"]).is_absolute()


@pytest.mark.parametrize("args, message", [
    (["run"], "Missing argument 'CONFIG'."),
    (["run", "c.yml", "out", "--bogus"], "No such option '--bogus'"),
    (["run", "c.yml", "out", "--backend", "cuda"], "Invalid value for '--backend'"),
])
def test_click_usage_errors_are_one_line(tmp_path, args, message) -> None:
    """CLI.md: one line per problem on stderr, exit 2, for click's own checks too (not its usage block)."""
    import subprocess
    import sys

    (tmp_path / "c.yml").write_text("merge_method: linear\n")
    r = subprocess.run([sys.executable, "-m", "fusemerge", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"fusemerge: error: {message}") and "--help`)" in line, line


def test_fusemerge_alone_shows_the_help(tmp_path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fusemerge"], capture_output=True, text=True, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert out.startswith("Usage: ") and "fusemerge: error" not in out and "run" in out, out


def test_overwrite_of_the_directory_holding_the_config_is_refused(fam: dict, tmp_path: Path, monkeypatch) -> None:
    """A new user's walk-through: `cd project && fusemerge run ties.yml . --overwrite` deleted ties.yml and notes.txt
    and left the shell in a deleted directory. Now exit 2 and nothing touched."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(fam["config"], project / "ties.yml")
    (project / "notes.txt").write_text("precious")
    monkeypatch.chdir(project)
    r = invoke("run", "ties.yml", ".", "--overwrite", "--quiet")
    assert r.exit_code == 2, r.output
    assert any("is the current directory, which --overwrite would delete" in line for line in errors(r)), r.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "ties.yml"]
    assert (project / "notes.txt").read_text() == "precious"


def test_resume_of_a_finished_merge_says_so_once(fam: dict, tmp_path: Path) -> None:
    """It printed a 0% bar and 'merged ... (75 of them already written by the interrupted run) in 0.0 s (0.00 GB/s)',
    though nothing had been interrupted (a new user's walk-through): now the note alone."""
    out = tmp_path / "out"
    assert invoke("run", fam["config"], out, "--quiet").exit_code == 0
    r = invoke("run", fam["config"], out, "--resume")
    assert r.exit_code == 0, r.output
    assert f"fusemerge: note: {out} already holds this merge, finished; nothing to resume" in r.stderr
    assert "merged" not in r.stdout + r.stderr.replace("already holds this merge", "")
    assert "merging" not in r.stderr and "interrupted" not in r.output


def test_help_does_not_import_torch() -> None:
    """The package imports its API on first use: `fusemerge --help` answers without loading torch."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom fusemerge.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0 and 'Usage' in r.output, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    repo = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_every_public_name_resolves() -> None:
    assert set(fusemerge.__all__) == {"__version__", *fusemerge._API}
    for name in fusemerge.__all__:
        assert getattr(fusemerge, name) is not None, name
    assert fusemerge.plan is fusemerge.build_plan
    assert set(fusemerge.__all__) <= set(dir(fusemerge))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fusemerge.nope  # noqa: B018
    assert fusemerge.planner.build_plan is fusemerge.build_plan  # submodules, as with eager imports
