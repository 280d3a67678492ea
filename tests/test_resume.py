"""`run --resume`: a merge killed at any point continues from its journal into the same bytes; a resume against a
changed config, changed options or changed inputs is refused; torn journal entries are redone.

Real kills: `python -m fusemerge run` subprocesses SIGKILL themselves at fixed points through the test hook
`FUSEMERGE_TEST_KILL_AT` (streaming/journal.py); they run in parallel, so the whole file stays at a few seconds.
Interruptions in-process: a progress callback raises KeyboardInterrupt (what Ctrl-C does), which keeps the partial
merge for --resume too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import fusemerge
from fusemerge.cli import main
from fusemerge.streaming.executor import Executor
from fusemerge.streaming.journal import JOURNAL_NAME, KILL_ENV
from fusemerge.streaming.writer import temp_dir_path
from fusemerge.synthetic import make_llama_family, write_config_yaml
from fusemerge.verify import verify

REPO = Path(__file__).resolve().parents[1]
# 21 tensors of up to 2304 elements; --max-memory 64KiB gives chunks of 315 elements: most tensors take 8 chunks
SHAPE = dict(hidden=32, intermediate=72, layers=2, vocab=101)
N_TENSORS = 21
# The killed runs and their resumes: small chunks, several shards, two workers. The reference run uses other
# memory and worker settings: they do not change the bytes, so a resume may change them too.
RUN_OPTS = ["--quiet", "--device", "cpu", "--max-memory", "64KiB", "--workers", "2", "--out-shard-size", "6KB"]
SHARDS = "6KB"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    fam = make_llama_family(root / "models", n_experts=2, seed=3, **SHAPE)
    fam["config"] = root / "ties.yml"
    write_config_yaml(fam["config"], "ties", fam["base"], fam["experts"], density=0.4)
    fam["reference"] = root / "reference"
    fusemerge.run(fam["config"], fam["reference"], device="cpu", workers=1, out_shard_size=SHARDS)
    assert len(fusemerge.build_plan(fam["config"], device="cpu").tensors) == N_TENSORS
    return fam


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("fusemerge: error:")]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def journal_entries(out: Path) -> list[str]:
    lines = (temp_dir_path(out) / JOURNAL_NAME).read_bytes().split(b"\n")
    return [json.loads(line)["tensor"] for line in lines[1:] if line]


def leftovers(out: Path) -> list[str]:
    """What runs into `out` left next to it: its temporary directory, lock file, an old copy."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.fusemerge")]


def assert_resumed_identical(fam: dict, out: Path, r) -> None:
    assert r.exit_code == 0, r.output
    assert files(out) == files(fam["reference"])  # every file, manifest and model card included
    assert verify(out) == [] and leftovers(out) == []


# -- real SIGKILLs ---------------------------------------------------------------------------------------------

# kill point -> journal entries the killed run leaves (None: depends on timing, fewer than all)
KILL_POINTS = {
    "stage:started": 0,            # shards and journal created, nothing merged
    "chunk:40": None,              # mid-run, tensors half written
    "tensor:1": 1,
    "tensor:19": 19,               # nearly all
    "stage:merged": N_TENSORS,     # every tensor written, no manifest yet
    "stage:extras": N_TENSORS,     # manifest and model card written, not yet renamed
}


@pytest.fixture(scope="module")
def killed(fam: dict, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One merge per kill point, all started at once, each killed by the hook; -> (OUT_DIR, the finished process)."""
    root = tmp_path_factory.mktemp("killed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for i, point in enumerate(KILL_POINTS):
        out = root / f"out{i}"
        cmd = [sys.executable, "-m", "fusemerge", "run", str(fam["config"]), str(out), *RUN_OPTS]
        procs[point] = out, subprocess.Popen(cmd, env=dict(env, **{KILL_ENV: point}), cwd=REPO,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    for point, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[point] = out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_merge_resumes_byte_identical(fam: dict, killed: dict, point: str) -> None:
    out, proc = killed[point]
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # nothing that looks like a finished model
    entries = journal_entries(out)
    expected = KILL_POINTS[point]
    if expected is None:
        assert len(entries) < N_TENSORS
    else:
        assert len(entries) == expected
    r = invoke("run", fam["config"], out, *RUN_OPTS[1:], "--resume")  # not --quiet: the summary says what resumed
    assert_resumed_identical(fam, out, r)
    assert f"{len(entries)} of {N_TENSORS} tensors already written and verified" in r.stderr
    if entries:
        assert f"{len(entries)} of them" in r.stdout


# -- interrupted in-process (Ctrl-C) --------------------------------------------------------------------------


def interrupt(fam: dict, out: Path, after_bytes: int = 60_000, **kwargs) -> None:
    """Start a merge into `out` and interrupt it (KeyboardInterrupt, as Ctrl-C) once `after_bytes` input bytes
    are merged; check that OUT_DIR never looks finished meanwhile and that the partial merge is kept."""
    seen = [0]

    def progress(n: int) -> None:
        assert not out.exists()
        seen[0] += n
        if seen[0] >= after_bytes:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fusemerge.run(fam["config"], out, device="cpu", workers=1, max_memory="64KiB", out_shard_size=SHARDS,
                      progress=progress, **kwargs)
    assert not out.exists()
    assert 0 < len(journal_entries(out)) < N_TENSORS


def test_interrupted_merge_keeps_its_journal_and_resumes(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupt(fam, out)
    done = len(journal_entries(out))
    notes: list[str] = []
    total: list[int] = []
    result = fusemerge.run(fam["config"], out, device="cpu", out_shard_size=SHARDS, resume=True,
                           notify=notes.append, progress=total.append)
    assert files(out) == files(fam["reference"])
    assert result.resumed_tensors == done and 0 < result.resumed_bytes < result.input_bytes
    assert total[0] == result.resumed_bytes and sum(total) == result.input_bytes  # the bar starts at the resumed
    assert notes == [f"resuming the interrupted merge into {out}: {done} of {N_TENSORS} tensors already written "
                     "and verified"]


def test_corrupted_tensor_and_torn_journal_lines_are_redone(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupt(fam, out, after_bytes=90_000)
    temp = temp_dir_path(out)
    entries = journal_entries(out)
    plan = fusemerge.build_plan(fam["config"], device="cpu", out_shard_size=SHARDS)
    shard, offset, nbytes = plan.layout.locate(entries[0])
    with open(temp / shard, "r+b") as f:  # a torn write: the tensor's last bytes never reached the disk
        f.seek(offset + nbytes - 4)
        f.write(b"\0\0\0\0")
    with open(temp / JOURNAL_NAME, "ab") as f:  # a garbage line, then a torn one
        f.write(b'{"tensor": "model.norm.wei\n{"tensor": "lm_head.weight", "sha2')
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--resume")
    assert_resumed_identical(fam, out, r)
    assert (f"{len(entries) - 1} of {N_TENSORS} tensors already written and verified; 3 journal entries did not "
            "match the written bytes and are redone") in r.stderr


# -- a full disk -------------------------------------------------------------------------------------------------


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """Make the writer's pwrite fail with ENOSPC once `nbytes` of tensor data are written (by each worker
    process: they inherit the patch), after writing what still fits, as a file system that fills up does."""
    import errno

    import fusemerge.streaming.writer as writer

    pwrite_all = writer._pwrite_all
    room = [nbytes]

    def pwrite(fd: int, buf: memoryview, offset: int) -> None:
        if offset == 0:  # a shard's header: written before any data
            return pwrite_all(fd, buf, offset)
        fits = min(room[0], buf.nbytes)
        pwrite_all(fd, buf[:fits], offset)
        room[0] -= fits
        if fits < buf.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "_pwrite_all", pwrite)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_keeps_the_partial_merge_and_resume_finishes_it(fam: dict, tmp_path: Path, workers: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk deleted the partial merge: once space was freed, the merge started over. Now it is kept, with
    its journal, the message says so, and --resume continues it into the bytes of an uninterrupted run."""
    out = tmp_path / "out"
    opts = list(RUN_OPTS)
    opts[opts.index("--workers") + 1] = workers  # 1: the writer threads; 2: worker processes
    with monkeypatch.context() as m:
        fill_disk_after(m, 12_000)
        r = invoke("run", fam["config"], out, *opts)
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.strip().splitlines()
    temp = temp_dir_path(out)
    assert line.startswith(f"fusemerge: error: writing {out}") and "the disk is full" in line, line
    assert f"nothing was written to {out}; the partial merge is kept in {temp}" in line, line
    assert "then run the same command with --resume to continue it" in line, line
    assert not out.exists()  # nothing that looks like a finished model
    done = len(journal_entries(out))
    assert 0 < done < N_TENSORS
    r = invoke("run", fam["config"], out, *opts[1:], "--resume")  # space freed
    assert_resumed_identical(fam, out, r)
    assert f"{done} of {N_TENSORS} tensors already written and verified" in r.stderr


# -- refusals ---------------------------------------------------------------------------------------------------


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _resave(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file with the same tensors and other header metadata, keeping its mtime."""
    st = path.stat()
    save_file(load_file(path), str(path), metadata=metadata)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _edit_config(fam: dict, path: Path) -> None:
    write_config_yaml(path, "ties", fam["base"], fam["experts"], density=0.5)


@pytest.mark.parametrize("change, args, needle", [
    ("mtime", [], "changed since the interrupted run (modification time differs)"),
    ("header", [], "changed since the interrupted run (its header or sampled data differs)"),
    ("size", [], "bytes)"),
    ("model config", [], "config.json changed since the interrupted run (its content differs)"),
    ("merge config", [], "the merge config differs from the interrupted run's"),
    ("shard size", ["--out-shard-size", "5GB"], "the output layout differs"),
    ("out dtype", [], "the merge config differs"),
])
def test_resume_refused_when_something_changed(fam: dict, tmp_path: Path, change: str, args: list,
                                               needle: str) -> None:
    family = make_llama_family(tmp_path / "models", n_experts=2, seed=3, **SHAPE)  # ours to change
    fam = dict(fam, base=family["base"], experts=family["experts"], config=tmp_path / "c.yml")
    write_config_yaml(fam["config"], "ties", fam["base"], fam["experts"], density=0.4)
    expert = fam["experts"][1] / "model.safetensors"
    _resave(expert, {"format": "pt"})
    size = expert.stat().st_size
    out = tmp_path / "out"
    interrupt(fam, out)
    if change == "mtime":
        _touch(expert)
    elif change == "header":
        _resave(expert, {"format": "pX"})  # same size, same data, same mtime: only the header differs
        assert expert.stat().st_size == size
    elif change == "size":
        _resave(expert, {"note": "a longer header than before"})
    elif change == "model config":
        path = fam["base"] / "config.json"  # num_hidden_layers places gradient parameters: the bytes would differ
        st, text = path.stat(), path.read_text()
        path.write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))  # same size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.read_text() != text and path.stat().st_size == st.st_size
    elif change == "merge config":
        _edit_config(fam, fam["config"])
    elif change == "out dtype":
        write_config_yaml(fam["config"], "ties", fam["base"], fam["experts"], density=0.4, out_dtype="float32")
    journal_before = (temp_dir_path(out) / JOURNAL_NAME).read_bytes()
    r = invoke("run", fam["config"], out, *RUN_OPTS, *args, "--resume")
    assert r.exit_code == 2, r.output
    lines = errors(r.stderr)
    assert len(lines) == 1 and lines == r.stderr.strip().splitlines(), r.stderr
    assert str(out) in lines[0] and "cannot resume the interrupted merge" in lines[0] and needle in lines[0]
    assert "run without --resume to start it over" in lines[0]
    # refused without touching anything: the partial merge is still there to resume once the change is undone
    assert not out.exists() and (temp_dir_path(out) / JOURNAL_NAME).read_bytes() == journal_before


def test_resume_refused_when_the_dare_seed_changed(fam: dict, tmp_path: Path) -> None:
    fam = dict(fam, config=tmp_path / "dare.yml")
    write_config_yaml(fam["config"], "dare_ties", fam["base"], fam["experts"], density=0.5)
    out = tmp_path / "out"
    interrupt(fam, out, seed=7)
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--seed", "8", "--resume")
    assert r.exit_code == 2 and "--seed 8 differs from the interrupted run's 7" in errors(r.stderr)[0], r.output
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--seed", "7", "--resume")
    assert r.exit_code == 0, r.output
    fusemerge.run(fam["config"], tmp_path / "ref", device="cpu", seed=7, out_shard_size=SHARDS)
    assert files(out) == files(tmp_path / "ref")


# -- nothing to resume, and runs without --resume ----------------------------------------------------------------


def test_resume_with_nothing_to_resume_starts_fresh_with_a_note(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--resume")
    assert_resumed_identical(fam, out, r)
    assert f"fusemerge: note: no interrupted merge into {out} to resume; starting from the beginning" in r.stderr


def _finished(fam: dict, out: Path, part: bool) -> tuple[list[str], Path]:
    """A finished merge into `out` (part 0 of 2, where `part`): (the options of its runs, its directory)."""
    opts = [*RUN_OPTS, *(["--partition", "0/2"] if part else [])]
    assert invoke("run", fam["config"], out, *opts).exit_code == 0
    return opts, out.parent / f"{out.name}.fusemerge-parts" / "part-0-of-2" if part else out


@pytest.mark.parametrize("part", [False, True])
def test_resume_of_a_finished_merge_removes_what_an_interrupted_overwrite_left(
        fam: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: bool) -> None:
    """An --overwrite interrupted after the new output was swapped in, before the old one was deleted, left it
    beside OUT_DIR (`.out.fusemerge-old-XXXXXXXX`); a --resume, finding the merge finished, left it there too.
    Now it deletes it, as the --overwrite meant to, and says so."""
    import fusemerge.streaming.writer as writer

    out = tmp_path / "out"
    opts, done = _finished(fam, out, part)

    def interrupted(old_dir: Path) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(writer, "_remove_replaced", interrupted)
        r = invoke("run", fam["config"], out, *opts, "--overwrite")
    assert r.exit_code == 130, r.output
    (old,) = [p for p in done.parent.iterdir() if p.name.startswith(f".{done.name}.fusemerge-old-")]
    before = files(done)
    r = invoke("run", fam["config"], out, *opts, "--resume")
    assert r.exit_code == 0 and "nothing to resume" in r.stderr, r.output
    assert f"fusemerge: note: removed {old}, the output an earlier --overwrite of {done} replaced" in r.stderr
    assert not old.exists() and files(done) == before and leftovers(done) == []


def test_resume_of_a_finished_merge_with_nothing_to_do_takes_no_lock(
        fam: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished merge may lie where this user cannot write (a read-only mount, another user's): a --resume of
    it with nothing left over and nothing missing writes nothing there, the lock file included."""
    import fusemerge.merge as merge_module

    out = tmp_path / "out"
    opts, done = _finished(fam, out, False)

    def no_lock(*args, **kwargs):
        raise AssertionError("a lock was taken")

    monkeypatch.setattr(merge_module, "out_dir_lock", no_lock)
    r = invoke("run", fam["config"], out, *opts, "--resume")
    assert r.exit_code == 0 and "nothing to resume" in r.stderr, r.output


def test_an_index_the_model_was_not_read_through_is_not_an_input(tmp_path: Path) -> None:
    """A model directory holding both model.safetensors.index.json and pytorch_model.bin.index.json (many Hub
    repositories do) is read through the first: the second is not one of the merge's inputs, so touching or
    removing it changes nothing for --resume."""
    fam = make_llama_family(tmp_path / "models", n_experts=1, seed=4, shard_bytes=6000, **SHAPE)
    unused = fam["base"] / "pytorch_model.bin.index.json"
    unused.write_text(json.dumps({"metadata": {}, "weight_map": {"x": "pytorch_model-00001-of-00002.bin"}}))
    cfg = tmp_path / "c.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4)
    out = tmp_path / "out"
    assert invoke("run", cfg, out, *RUN_OPTS).exit_code == 0
    _touch(unused)
    r = invoke("run", cfg, out, *RUN_OPTS, "--resume")
    assert r.exit_code == 0 and "nothing to resume" in r.stderr, r.output
    _touch(fam["base"] / "model.safetensors.index.json")  # the one it was read through is an input
    r = invoke("run", cfg, out, *RUN_OPTS, "--resume")
    assert r.exit_code == 2 and "modified after" in r.stderr, r.output


def test_finalize_of_a_finalized_merge_removes_what_an_overwrite_left(
        fam: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for `finalize` run again on a finalized merge (its parts gone): the old output a `finalize
    --overwrite` could not delete is removed; finalize still says there is nothing to join."""
    import fusemerge.streaming.writer as writer

    out = tmp_path / "out"
    for i in range(2):
        assert invoke("run", fam["config"], out, *RUN_OPTS, "--partition", f"{i}/2").exit_code == 0
    assert invoke("finalize", out, "-q", "--keep-parts").exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(writer, "_remove_replaced", lambda old_dir: None)  # as when it cannot be deleted
        assert invoke("finalize", out, "-q", "--overwrite").exit_code == 0
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.fusemerge-old-")]
    r = invoke("finalize", out)
    assert r.exit_code == 2 and "finalized already?" in r.stderr, r.output
    assert f"removed {old}, the output an earlier --overwrite of {out} replaced" in r.stderr
    assert not old.exists() and files(out) == files(fam["reference"]) and leftovers(out) == []


@pytest.mark.parametrize("name, part", [
    ("config.json", False), ("README.md", False), ("fusemerge_config.yml", False), ("tokenizer.json", False),
    ("tokenizer_config.json", False), ("model.safetensors.index.json", False), ("config.json", True),
])
def test_resume_of_a_finished_merge_writes_a_missing_file_again(fam: dict, tmp_path: Path, name: str,
                                                               part: bool) -> None:
    """A finished merge whose config.json (or model card, tokenizer file, index) was deleted since counted as
    finished: --resume said "nothing to resume" and left the model without it (the manifest listed only the
    shards and the index, and a missing index made it "exists and is not empty"). Now the manifest lists the
    other files too, and --resume writes the missing one again, the same bytes, without reading the shards."""
    out = tmp_path / "out"
    opts, done = _finished(fam, out, part)
    before = files(done)
    shard_times = {p.name: p.stat().st_mtime_ns for p in done.glob("*.safetensors")}
    (done / name).unlink()
    r = invoke("run", fam["config"], out, *opts, "--resume")
    assert r.exit_code == 0, r.output
    assert f"fusemerge: note: wrote {name} into {done} again: missing from the finished merge there" in r.stderr
    assert files(done) == before and leftovers(done) == []
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.safetensors")} == shard_times
    if not part:
        assert before == files(fam["reference"]) and verify(out) == []
    r = invoke("run", fam["config"], out, *opts, "--resume")  # and now nothing is missing
    assert r.exit_code == 0 and "wrote" not in r.stderr and "nothing to resume" in r.stderr, r.output


def test_resume_without_copy_tokenizer_does_not_write_a_missing_tokenizer_file(fam: dict, tmp_path: Path) -> None:
    """A tokenizer file deleted from a finished merge, resumed with --no-copy-tokenizer: refused, naming it, and
    nothing written; resumed with --copy-tokenizer: written again."""
    out = tmp_path / "out"
    _finished(fam, out, part=False)
    (out / "tokenizer.json").unlink()
    before = files(out)
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--resume", "--no-copy-tokenizer")
    assert r.exit_code == 2, r.output
    assert errors(r.stderr) == [f"fusemerge: error: {out / 'tokenizer.json'}: missing from the finished merge, "
                                "and this run copies no tokenizer files; resume with --copy-tokenizer to write "
                                "it again"], r.stderr
    assert files(out) == before and leftovers(out) == []
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--resume", "--copy-tokenizer")
    assert r.exit_code == 0 and files(out) == files(fam["reference"]), r.output


def _rewrite_in_place(shard: Path) -> None:
    """New data, the same header and size: what a checkpoint overwritten by a later save of it looks like."""
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for j in range(start + 1, len(data), 2):  # the high byte of each bf16 value: other values, same layout
        data[j] ^= 0x01
    with open(shard, "r+b") as f:
        f.write(data)


@pytest.mark.parametrize("part", [False, True])
def test_resume_of_a_finished_merge_whose_inputs_were_rewritten_is_refused(tmp_path: Path, part: bool) -> None:
    """The merge identity holds the inputs' sizes and headers, not their data: a finished merge (or part) whose
    input was rewritten since is refused by --resume (it did nothing, and finalize then joined parts of old and
    new data); --resume --overwrite merges it again."""
    fam = make_llama_family(tmp_path / "models", n_experts=2, seed=3, **SHAPE)
    cfg = tmp_path / "ties.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4)
    out = tmp_path / "out"
    opts = [*RUN_OPTS, *(["--partition", "0/2"] if part else [])]
    assert invoke("run", cfg, out, *opts).exit_code == 0
    shard = next(fam["experts"][0].glob("*.safetensors"))
    _rewrite_in_place(shard)
    r = invoke("run", cfg, out, *opts, "--resume")
    assert r.exit_code == 2, r.output
    (line,) = errors(r.stderr)
    assert "holds a finished merge of these input files, but" in line, line
    assert str(shard) in line and "--overwrite" in line, line
    r = invoke("run", cfg, out, *opts, "--resume", "--overwrite")
    assert r.exit_code == 0, r.output
    fresh = tmp_path / "fresh"
    assert invoke("run", cfg, fresh, *opts).exit_code == 0
    done = (lambda d: d.parent / f"{d.name}.fusemerge-parts" / "part-0-of-2") if part else (lambda d: d)
    shards = lambda d: {n: b for n, b in files(done(d)).items() if n.endswith(".safetensors")}  # noqa: E731
    assert shards(out) == shards(fresh)
    r = invoke("run", cfg, out, *opts, "--resume")  # and now it is this merge, finished: nothing to do
    assert r.exit_code == 0 and "nothing to resume" in r.stderr, r.output


def test_unreadable_journal_starts_fresh(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupt(fam, out)
    (temp_dir_path(out) / JOURNAL_NAME).write_bytes(b"not a journal")
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--resume")
    assert_resumed_identical(fam, out, r)
    assert "no interrupted merge" in r.stderr


def test_run_without_resume_removes_the_partial_merge(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupt(fam, out)
    stale = temp_dir_path(out) / "stale.txt"
    stale.write_text("left by the killed run")
    r = invoke("run", fam["config"], out, *RUN_OPTS)
    assert_resumed_identical(fam, out, r)
    assert f"removed the partial merge an interrupted run left in {temp_dir_path(out)}" in r.stderr


def test_resume_drops_files_the_interrupted_run_wrote_besides_shards(fam: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    interrupt(fam, out)
    (temp_dir_path(out) / "tokenizer.json").write_text("{}")  # as if that run had copied a tokenizer
    r = invoke("run", fam["config"], out, *RUN_OPTS, "--no-copy-tokenizer", "--resume")
    assert r.exit_code == 0, r.output
    assert "tokenizer.json" not in files(out) and verify(out) == []


# -- the executor's hooks ------------------------------------------------------------------------------------------


class RecordingWriter:
    """Stands in for a ShardedWriter: records (event, tensor) pairs; `hook(name)` runs before each write."""

    def __init__(self, hook=lambda name: None):
        self.events: list[tuple[str, str]] = []
        self.hook = hook

    def write(self, name: str, byte_offset: int, data) -> None:
        self.hook(name)
        self.events.append(("write", name))

    def done(self, name: str) -> None:
        self.events.append(("done", name))


def test_executor_skips_and_reports_each_tensor_after_its_last_write(fam: dict) -> None:
    plan = fusemerge.build_plan(fam["config"], device="cpu", max_memory="64KiB", workers=1)
    skip = {t.name for t in plan.tensors[::3]}
    writer = RecordingWriter()
    Executor(plan, writer, skip=skip, on_tensor_done=writer.done).run()
    merged = [t.name for t in plan.tensors if t.name not in skip]
    assert {name for _, name in writer.events} == set(merged)
    assert sorted(name for event, name in writer.events if event == "done") == sorted(merged)
    for t in plan.tensors:
        if t.name in merged:  # every chunk, then done
            chunks = -(-t.numel // plan.chunk_elems)
            assert [event for event, n in writer.events if n == t.name] == ["write"] * chunks + ["done"]
    assert max(-(-t.numel // plan.chunk_elems) for t in plan.tensors) > 5


def test_executor_never_reports_a_tensor_cut_short(fam: dict) -> None:
    plan = fusemerge.build_plan(fam["config"], device="cpu", max_memory="64KiB", workers=2)
    first, second = sorted(plan.tensors, key=lambda t: -t.numel)[:2]  # what the two workers start with
    executor: Executor | None = None
    second_writing = threading.Event()

    def hook(name: str) -> None:
        if name == first.name:  # fails once the other worker is mid-tensor
            assert second_writing.wait(30)
            raise OSError(28, "No space left on device")
        if name == second.name:
            second_writing.set()
            deadline = time.monotonic() + 30
            while not executor._stop.is_set():
                assert time.monotonic() < deadline
                time.sleep(0.001)

    writer = RecordingWriter(hook)
    executor = Executor(plan, writer, on_tensor_done=writer.done, processes=False)  # threads: shared events
    with pytest.raises(OSError):
        executor.run()
    assert ("write", second.name) in writer.events and not [e for e in writer.events if e[0] == "done"]


def test_a_journal_that_hashed_headers_only_is_compared_as_it_hashed(tmp_path: Path) -> None:
    """Journals of the fusemerge before sampled digests recorded each shard's header hash ("hashed": "header")."""
    from fusemerge.streaming.journal import differences, header_digest, input_files

    fam = make_llama_family(tmp_path / "models", n_experts=2, seed=3, **SHAPE)
    cfg = tmp_path / "ties.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4)
    plan = fusemerge.build_plan(cfg, device="cpu")
    new = {"fusemerge_version": fusemerge.__version__, "config": 1, "seed": 0, "partition": None, "layout": [],
           "inputs": input_files(plan)}
    old = {**new, "inputs": [{**f, "sha256": header_digest(Path(f["path"])), "hashed": "header"}
                             if f["hashed"] == "sampled" else f for f in new["inputs"]]}
    assert differences(old, new) == []
