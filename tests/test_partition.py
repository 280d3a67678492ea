"""`run --partition I/N` and `fusemerge finalize`: a merge split by output shard into parts that run apart, then
joined into exactly the files one run of the whole merge writes; every way the parts can be wrong is refused
before anything is touched, and a failed join leaves the parts as they were."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import fusemerge
from fusemerge.cli import main
from fusemerge.errors import InputError
from fusemerge.partition import JOIN_MARKER, PART_MANIFEST, part_dir, parts_root
from fusemerge.planner import parse_partition, part_shards
from fusemerge.streaming.lock import out_dir_lock
from fusemerge.streaming.writer import temp_dir_path
from fusemerge.synthetic import make_llama_family, write_config_yaml
from fusemerge.verify import verify

# 21 tensors; 6KB shards make 12 of them, so parts of 1 to 12 shards can be tried
SHAPE = dict(hidden=32, intermediate=72, layers=2, vocab=101)
SHARDS = "6KB"
N_SHARDS = 12
OPTS = dict(device="cpu", out_shard_size=SHARDS, max_memory="64KiB")  # chunked tensors, two workers


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("partition")
    fam = make_llama_family(root / "models", n_experts=3, seed=5, **SHAPE)
    fam["root"] = root
    return fam


def config(fam: dict, method: str, **params) -> Path:
    """A config file for `method` (written once per distinct set of parameters)."""
    name = "-".join([method] + [f"{k}{v}" for k, v in sorted(params.items())]) + ".yml"
    path = fam["root"] / name
    if not path.exists():
        write_config_yaml(path, method, fam["base"], fam["experts"], **params)
    return path


def reference(fam: dict, cfg: Path, tmp_path: Path) -> Path:
    out = tmp_path / "reference"
    fusemerge.run(cfg, out, device="cpu", workers=1, out_shard_size=SHARDS, seed=7)
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def run_parts(cfg: Path, out: Path, n: int, parts: list[int] | None = None, **kwargs) -> None:
    for i in range(n) if parts is None else parts:
        fusemerge.run(cfg, out, partition=f"{i}/{n}", seed=7, **OPTS, **kwargs)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("fusemerge: error:")]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: (size, mtime_ns), to show that nothing was touched."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the join is the whole merge, byte for byte ----------------------------------------------------------------


@pytest.mark.parametrize("method, params", [
    ("ties", dict(density=0.4)),
    ("dare_ties", dict(density=0.5)),  # DARE masks keyed by tensor name and seed: the same in every part
    ("ties", dict(density=0.3, trim_scope="global")),  # the first part finds the thresholds, the others read them
    ("task_arithmetic", {}),
])
@pytest.mark.parametrize("n", [1, 2, 5, N_SHARDS])
def test_parts_join_into_the_files_of_one_run(fam: dict, tmp_path: Path, method: str, params: dict, n: int) -> None:
    cfg = config(fam, method, **params)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    run_parts(cfg, out, n, parts=list(range(n))[::-1], workers=2)  # any order
    assert not out.exists()  # nothing that looks like a model before the join
    result = fusemerge.finalize(out)
    assert files(out) == files(ref)  # shards, index, manifest, config, tokenizer, model card
    assert verify(out) == []
    assert result.parts == n and result.shards == N_SHARDS
    assert result.output_bytes == json.loads((ref / "model.safetensors.index.json").read_text())["metadata"][
        "total_size"]
    assert not parts_root(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock, no temp left


def test_parts_may_run_with_different_settings(fam: dict, tmp_path: Path) -> None:
    """Device, backend, memory and workers do not change the bytes, so the parts of one merge may differ in them
    (here: the Triton kernels through the interpreter, small chunks, one worker, and the defaults)."""
    import torch

    cfg = config(fam, "dare_ties", density=0.5)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    triton = dict(device="cuda", backend="triton") if torch.cuda.is_available() else dict(device="cpu",
                                                                                           backend="triton")
    settings = [triton | dict(workers=1, max_memory="64KiB"), dict(device="cpu", workers=1, max_memory="32KiB"),
                dict(device="cpu")]
    for i, kwargs in enumerate(settings):
        fusemerge.run(cfg, out, partition=(i, 3), seed=7, out_shard_size=SHARDS, **kwargs)
    fusemerge.finalize(out)
    assert files(out) == files(ref)


def test_a_part_writes_only_its_shards(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    result = fusemerge.run(cfg, out, partition=(1, 5), **OPTS)
    directory = part_dir(out, 1, 5)
    assert result.out_dir == directory
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert shards == [f"model-{s:05d}-of-{N_SHARDS:05d}.safetensors" for s in (2, 7, 12)]
    assert not (directory / "model.safetensors.index.json").exists()
    assert not (directory / "fusemerge_manifest.json").exists()  # this is no model: finalize writes the manifest
    manifest = json.loads((directory / PART_MANIFEST).read_text())
    assert (manifest["part"], manifest["parts"]) == (1, 5) and sorted(manifest["files"]) == shards
    assert result.output_bytes == sum((directory / s).stat().st_size - _header_len(directory / s) for s in shards)
    whole = fusemerge.build_plan(cfg, device="cpu", out_shard_size=SHARDS)
    names = {n for s in whole.layout.shards if s.filename in shards for n in s.tensor_names}
    assert {t.name for t in result.plan.tensors} == names and result.input_bytes == sum(
        t.input_bytes for t in whole.tensors if t.name in names)


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_parse_partition_and_round_robin() -> None:
    assert parse_partition("0/1") == (0, 1) and parse_partition(" 3 / 4 ") == (3, 4) and parse_partition(None) is None
    assert parse_partition((2, 3)) == (2, 3)
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b", "1/2/3", (3, 2)):
        with pytest.raises(InputError):
            parse_partition(bad)
    shards = list(range(7))
    assert [part_shards(shards, i, 3) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


# -- the command line -------------------------------------------------------------------------------------------


def test_cli_parts_then_finalize(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    for i in range(3):
        r = invoke("run", cfg, out, "--device", "cpu", "--out-shard-size", SHARDS, "--partition", f"{i}/3", "--seed",
                   "7")
        assert r.exit_code == 0, r.output
        assert f"merged part {i}/3:" in r.output and f"fusemerge finalize {out}" in r.output
    r = invoke("finalize", out)
    assert r.exit_code == 0, r.output
    assert f"joined 3 part(s): {N_SHARDS} shard(s)" in r.output
    assert files(out) == files(ref)
    r = invoke("finalize", out)  # again: nothing to join, and the message says why
    assert r.exit_code == 2 and "holds a finished merge (finalized already?" in r.output, r.output


def test_plan_shows_the_part(fam: dict) -> None:
    cfg = config(fam, "ties", density=0.3, trim_scope="global")
    r = invoke("plan", cfg, "--device", "cpu", "--out-shard-size", SHARDS, "--partition", "2/5")
    assert r.exit_code == 0, r.output
    assert "part 2/5: output shard(s) 3, 8 of 12" in r.output
    assert "the global thresholds read the whole model's" in r.output and "the others wait for them" in r.output


@pytest.mark.parametrize("spec, message", [
    ("5/5", "I must be 0 to N - 1"),
    ("x", "expected I/N"),
    (f"0/{N_SHARDS + 1}", f"the output has {N_SHARDS} shard(s)"),
])
def test_bad_partition_is_an_input_error(fam: dict, tmp_path: Path, spec: str, message: str) -> None:
    cfg = config(fam, "ties", density=0.4)
    r = invoke("run", cfg, tmp_path / "out", "--device", "cpu", "--out-shard-size", SHARDS, "--partition", spec)
    assert r.exit_code == 2, r.output
    assert len(errors(r.output)) == 1 and message in r.output
    assert list(tmp_path.iterdir()) == []


def test_a_part_refuses_an_existing_output_early(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("run", cfg, out, "--device", "cpu", "--out-shard-size", SHARDS, "--partition", "0/2")
    assert r.exit_code == 2 and "exists and is not empty" in r.output  # now, not after every part has run
    assert not parts_root(out).exists()
    run_parts(cfg, out, 2, overwrite=True)
    with pytest.raises(InputError, match="exists and is not empty"):
        fusemerge.finalize(out)
    assert (out / "keep.txt").exists() and len(list(parts_root(out).iterdir())) == 2
    fusemerge.finalize(out, overwrite=True)
    assert not (out / "keep.txt").exists() and verify(out) == []


# -- resuming and re-running parts ------------------------------------------------------------------------------


def test_resume_of_a_finished_part_does_nothing(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2, parts=[0])
    before = snapshot(parts_root(out))
    notes: list[str] = []
    result = fusemerge.run(cfg, out, partition="0/2", resume=True, seed=7, notify=notes.append, **OPTS)
    assert snapshot(parts_root(out)) == before
    assert notes == [f"part 0/2 is already merged in {part_dir(out, 0, 2)}; nothing to resume"]
    assert result.resumed_tensors == len(result.plan.tensors)
    with pytest.raises(InputError, match="exists and is not empty; pass overwrite=True"):
        run_parts(cfg, out, 2, parts=[0])  # without --resume a finished part is not silently redone


def test_resume_redoes_a_finished_part_of_another_merge(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_parts(config(fam, "ties", density=0.4), out, 2, parts=[0])
    with pytest.raises(InputError, match="exists and is not empty"):  # another config: not "already merged"
        run_parts(config(fam, "ties", density=0.6), out, 2, parts=[0], resume=True)


def test_an_interrupted_part_resumes(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "dare_ties", density=0.5)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] > 30_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fusemerge.run(cfg, out, partition="1/2", seed=7, workers=1, progress=progress, **OPTS)
    run_parts(cfg, out, 2, parts=[0])
    with pytest.raises(InputError, match=r"part 1/2 is unfinished: .* partition='1/2', resume=True\)`"):
        fusemerge.finalize(out)
    notes: list[str] = []
    result = fusemerge.run(cfg, out, partition="1/2", seed=7, resume=True, notify=notes.append, **OPTS)
    assert 0 < result.resumed_tensors < len(result.plan.tensors), notes
    fusemerge.finalize(out)
    assert files(out) == files(ref)


# -- the join refuses wrong parts, and touches nothing then ------------------------------------------------------


def refused(out: Path, *messages: str) -> None:
    """finalize(out) fails with every message (regexes) and changes nothing under the parts or in out."""
    before = snapshot(parts_root(out))
    with pytest.raises(InputError) as e:
        fusemerge.finalize(out)
    for message in messages:
        assert any(re.search(message, p) for p in e.value.problems), e.value.problems
    assert snapshot(parts_root(out)) == before
    assert not out.exists() and not temp_dir_path(out).exists()


def test_finalize_lists_every_missing_part(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no parts of a partitioned merge"):
        fusemerge.finalize(out)
    run_parts(cfg, out, 4, parts=[1, 2])
    refused(out, r"part 0/4 is missing .* `fusemerge.run\(config, '.*out', partition='0/4'\)`", r"part 3/4 is missing")


def test_finalize_refuses_parts_of_different_merges(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_parts(config(fam, "ties", density=0.4), out, 2, parts=[0])
    run_parts(config(fam, "ties", density=0.6), out, 2, parts=[1])
    refused(out, r"part-1-of-2 and part-0-of-2 are parts of different merges: the merge config differs; merge")
    with pytest.raises(InputError) as e:  # and only that: their model cards differ because their configs do
        fusemerge.finalize(out)
    assert len(e.value.problems) == 1 and "--copy-tokenizer" not in e.value.problems[0], e.value.problems


def test_finalize_refuses_parts_that_read_other_data(tmp_path: Path) -> None:
    """An input rewritten in place between two parts (same size and header, other weights): the parts read
    different models, which the inputs' sampled digests tell apart on any machine (modification times differ
    between machines' copies, so the join cannot compare them)."""
    fam = make_llama_family(tmp_path / "models", n_experts=2, seed=6, **SHAPE)
    cfg = tmp_path / "ties.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2, parts=[0])
    shard = next(fam["experts"][0].glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for k in range(start, len(data), 997):  # every weight moves a little
        data[k] ^= 1
    shard.write_bytes(bytes(data))
    run_parts(cfg, out, 2, parts=[1])
    refused(out, r"part-1-of-2 and part-0-of-2 are parts of different merges: the input models differ")


def test_finalize_refuses_parts_of_different_seeds(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "dare_ties", density=0.5)
    out = tmp_path / "out"
    fusemerge.run(cfg, out, partition="0/2", seed=1, **OPTS)
    fusemerge.run(cfg, out, partition="1/2", seed=2, **OPTS)
    refused(out, r"different merges: seed differs")


def test_finalize_refuses_mixed_partitions(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    run_parts(cfg, out, 3, parts=[0])
    refused(out, r"holds parts of different partitions \(part-0-of-2, part-0-of-3, part-1-of-2\)")


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model-00004-of-00012.safetensors: \d+ bytes, the layout says \d+"),
    ("header", r"model-00004-of-00012.safetensors: its safetensors header differs"),
    ("delete", r"model-00004-of-00012.safetensors: cannot read"),
    ("manifest", r"fusemerge_part.json: malformed part manifest"),
    ("relabel", r"fusemerge_part.json: describes part 0/2, not 1/2"),
])
def test_finalize_refuses_a_damaged_part(fam: dict, tmp_path: Path, damage: str, message: str) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    directory = part_dir(out, 1, 2)
    shard = directory / "model-00004-of-00012.safetensors"
    manifest = directory / PART_MANIFEST
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 1)
    elif damage == "header":
        data = bytearray(shard.read_bytes())
        data[20] ^= 1  # inside the header JSON
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        m = json.loads(manifest.read_text())
        if damage == "manifest":
            m["files"] = []
        else:
            m["part"] = 0
        manifest.write_text(json.dumps(m))
    refused(out, message)


@pytest.mark.parametrize("damage, message", [
    ("edit", r"part-0-of-2/config.json: differs from the file its part wrote"),
    ("truncate", r"part-0-of-2/README.md: has another size than the file its part wrote"),
    ("delete", r"part-0-of-2/tokenizer.json: cannot read"),
    ("escape", r"fusemerge_part.json: malformed part manifest \(its extras must be file names"),
])
def test_finalize_refuses_part_0s_changed_side_files(fam: dict, tmp_path: Path, damage: str, message: str) -> None:
    """The join copies part 0's config.json, tokenizer and model card: they must be the files its run wrote."""
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    directory = part_dir(out, 0, 2)
    if damage == "edit":
        text = (directory / "config.json").read_text()
        (directory / "config.json").write_text(text.replace('"hidden_size": 32', '"hidden_size": 33'))
        assert (directory / "config.json").read_text() != text
    elif damage == "truncate":
        os.truncate(directory / "README.md", 10)
    elif damage == "delete":
        (directory / "tokenizer.json").unlink()
    else:
        manifest = directory / PART_MANIFEST
        m = json.loads(manifest.read_text())
        m["extras"]["../../stolen"] = m["extras"]["README.md"]
        manifest.write_text(json.dumps(m))
    refused(out, message)


def test_finalize_refuses_parts_with_different_side_files(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2, parts=[0])
    run_parts(cfg, out, 2, parts=[1], copy_tokenizer=False)
    refused(out, r"part-1-of-2 and part-0-of-2 hold different config.json, tokenizer or model card files")


def test_finalize_copies_only_the_files_a_part_wrote(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    (part_dir(out, 0, 2) / "notes.txt").write_text("a file someone left in the part")
    fusemerge.finalize(out)
    assert not (out / "notes.txt").exists()
    assert files(out) == files(reference(fam, cfg, tmp_path))


def test_parts_of_a_merge_of_mixed_dtypes_write_the_whole_merges_config(tmp_path: Path) -> None:
    """config.json's torch_dtype is the dtype most of the whole output has, in every part (each part once named
    the one most of its own shards have, and finalize then found the parts' files different)."""
    import torch
    from safetensors.torch import save_file

    for name, off in (("base", 0.0), ("e0", 0.01)):
        (tmp_path / name).mkdir()
        save_file({"a.weight": (torch.ones(400) + off).to(torch.bfloat16),  # most of the output's elements
                   "b.weight": (torch.ones(300) + off).to(torch.float16)}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "e0")}, {"model": str(tmp_path / "base")}]}
    opts = dict(device="cpu", out_shard_size=700)
    fusemerge.run(cfg, tmp_path / "single", **opts)
    for i in range(2):
        fusemerge.run(cfg, tmp_path / "parted", partition=f"{i}/2", **opts)
    fusemerge.finalize(tmp_path / "parted")
    assert json.loads((tmp_path / "parted" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert files(tmp_path / "parted") == files(tmp_path / "single")


def test_finalize_verify_reads_every_shard_and_refuses_a_changed_one(fam: dict, tmp_path: Path) -> None:
    """A byte of data changed after the part finished: same size, same header, so only finalize --verify (or
    `fusemerge verify` after the join) finds it."""
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    shard = part_dir(out, 1, 2) / "model-00004-of-00012.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        fusemerge.finalize(out, verify=True)
    assert e.value.problems == [f"{shard}: its SHA-256 differs from {part_dir(out, 1, 2) / PART_MANIFEST} (changed "
                                "after the part was merged; merge that part again with overwrite=True)"]
    assert not out.exists() and shard.exists()
    fusemerge.finalize(out)  # without --verify it joins; verify then finds the shard
    from fusemerge.verify import verify

    (problem,) = verify(out)
    assert "model-00004-of-00012.safetensors: SHA-256" in problem and "(corrupted or changed)" in problem


def test_finalize_refuses_while_a_part_is_being_written(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    with out_dir_lock(part_dir(out, 1, 2)):  # as a part run writing it again (with --overwrite) holds it
        with pytest.raises(InputError, match="another fusemerge run is writing it"):
            fusemerge.finalize(out)
    assert not out.exists() and len(list(parts_root(out).glob("part-*"))) == 2


# -- a failed join puts everything back; links and moves ---------------------------------------------------------


@pytest.mark.parametrize("links", [True, False])
def test_a_failed_join_leaves_the_parts_as_they_were(fam: dict, tmp_path: Path, monkeypatch, links: bool) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 3)
    before = {k: v[0] for k, v in snapshot(parts_root(out)).items()}  # a move back keeps sizes, not times
    if not links:
        monkeypatch.setattr(os, "link", _no_links)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fusemerge.partition.write_manifest", fail)
    with pytest.raises(OSError):
        fusemerge.finalize(out)
    assert {k: v[0] for k, v in snapshot(parts_root(out)).items()} == before
    assert not out.exists() and not temp_dir_path(out).exists()


def _no_links(src, dst, *args, **kwargs):
    raise OSError(1, "Operation not permitted", str(src))


def test_join_without_hard_links_moves_the_shards(fam: dict, tmp_path: Path, monkeypatch) -> None:
    cfg = config(fam, "ties", density=0.4)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    run_parts(cfg, out, 3)
    monkeypatch.setattr(os, "link", _no_links)
    notes: list[str] = []
    fusemerge.finalize(out, keep_parts=True, notify=notes.append)
    assert files(out) == files(ref)
    assert notes == [f"kept the parts in {parts_root(out)} (without their shards: this file system refuses hard "
                     f"links, so they were moved into {out})"]
    assert not list(parts_root(out).rglob("*.safetensors"))


def test_keep_parts_links_the_shards(fam: dict, tmp_path: Path) -> None:
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    r = invoke("finalize", out, "--keep-parts")
    assert r.exit_code == 0, r.output
    assert "kept the parts" in r.output
    shard = "model-00002-of-00012.safetensors"
    assert (out / shard).stat().st_ino == (part_dir(out, 1, 2) / shard).stat().st_ino
    assert verify(out) == []


def test_one_shard_one_part(fam: dict, tmp_path: Path) -> None:
    """The smallest partition: a single `model.safetensors`, no index, in one part."""
    cfg = config(fam, "ties", density=0.4)
    ref = tmp_path / "reference"
    fusemerge.run(cfg, ref, device="cpu")
    assert (ref / "model.safetensors").exists() and not (ref / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    fusemerge.run(cfg, out, device="cpu", partition="0/1")
    with pytest.raises(InputError, match="the output has 1 shard"):
        fusemerge.run(cfg, out, device="cpu", partition="0/2")
    fusemerge.finalize(out)
    assert files(out) == files(ref)


@pytest.mark.parametrize("when", ["moving", "before the rename"])
def test_a_killed_join_is_recovered(fam: dict, tmp_path: Path, when: str) -> None:
    """Where links are refused the join moves shards into OUT_DIR's temporary directory. Killed while moving
    (JOIN_MARKER there), or after every shard was in (the marker removed) and before the rename, the next
    finalize moves them back into their parts first (then by size and SHA-256 against the part manifests)."""
    cfg = config(fam, "ties", density=0.4)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    run_parts(cfg, out, 3)
    temp = temp_dir_path(out)
    temp.mkdir()
    if when == "moving":
        (temp / JOIN_MARKER).touch()
        moved = [part_dir(out, 1, 3) / n for n in ("model-00002-of-00012.safetensors",
                                                   "model-00005-of-00012.safetensors")]
    else:
        moved = [p for i in range(3) for p in part_dir(out, i, 3).glob("model-*.safetensors")]
    for p in moved:
        os.rename(p, temp / p.name)  # what the killed join had moved
    fusemerge.finalize(out)
    assert files(out) == files(ref) and not temp.exists()


def test_the_recovery_never_takes_shards_from_an_interrupted_run(fam: dict, tmp_path: Path) -> None:
    """A `run` into OUT_DIR (not partitioned) interrupted leaves shards of the same names, partly written, in the
    same temporary directory: they never fill in for a part's missing shard."""
    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 3)
    name = "model-00002-of-00012.safetensors"
    (part_dir(out, 1, 3) / name).unlink()
    temp = temp_dir_path(out)
    temp.mkdir()
    (temp / name).write_bytes(b"partial")
    with pytest.raises(InputError, match=f"{name}: cannot read"):
        fusemerge.finalize(out)
    assert (temp / name).read_bytes() == b"partial" and not (part_dir(out, 1, 3) / name).exists()
    run_parts(cfg, out, 3, parts=[1], overwrite=True)
    notes: list[str] = []
    fusemerge.finalize(out, notify=notes.append)
    assert notes[0] == f"removed the partial merge an interrupted run into {out} left in {temp}"
    assert verify(out) == [] and not temp.exists()


def test_finalize_of_the_current_directory(fam: dict, tmp_path: Path, monkeypatch) -> None:
    cfg = config(fam, "ties", density=0.4)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    run_parts(cfg, out, 2)
    monkeypatch.chdir(out)
    fusemerge.finalize(".")
    assert files(out) == files(ref)


def test_finalize_verify_checks_out_dir_before_reading_the_shards(fam: dict, tmp_path: Path, monkeypatch) -> None:
    from fusemerge import partition

    cfg = config(fam, "ties", density=0.4)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    monkeypatch.setattr(partition, "_verify_parts", lambda parts: pytest.fail("read the shards first"))
    with pytest.raises(InputError, match="exists and is not empty"):
        fusemerge.finalize(out, verify=True)


def test_an_interrupt_while_the_old_output_is_deleted_never_moves_it_into_the_parts(fam: dict, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """finalize --overwrite where links are refused: after the exchange the old output sat under the temporary
    name, and a failure while deleting it made the join's undo move the old output's shards into the parts."""
    from fusemerge.streaming import writer

    cfg = config(fam, "ties", density=0.4)
    ref = reference(fam, cfg, tmp_path)
    out = tmp_path / "out"
    run_parts(cfg, out, 2)
    out.mkdir()
    (out / "model-00001-of-00012.safetensors").write_text("OLD OUTPUT")
    monkeypatch.setattr(os, "link", _no_links)
    real = writer.shutil.rmtree

    def interrupted(path, *a, **k):
        if ".fusemerge-old-" in str(path):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(writer.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fusemerge.finalize(out, overwrite=True, keep_parts=True)
    assert files(out) == files(ref)  # the new merge is in place
    for p in parts_root(out).rglob("*.safetensors"):
        assert b"OLD OUTPUT" not in p.read_bytes()[:20], p
