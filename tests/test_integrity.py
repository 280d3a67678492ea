"""Reliability of the output: shard manifest and `fusemerge verify`, the OUT_DIR lock, disk full and unwritable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fusemerge import __version__
from fusemerge.streaming.journal import JOURNAL_NAME
from fusemerge.streaming.lock import lock_path
from fusemerge.streaming.writer import temp_dir_path
from fusemerge.verify import MANIFEST_NAME, verify
from tests.cli_helpers import invoke, make_cli_family


@pytest.fixture()
def fam(tmp_path: Path) -> dict:
    return make_cli_family(tmp_path)


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("fusemerge: error:")]


def leftovers(parent: Path) -> list[str]:
    """Temporary directories and lock files a run may have left in `parent`."""
    return [p.name for p in parent.iterdir() if ".fusemerge-tmp" in p.name or p.name.endswith(".fusemerge.lock")]


@pytest.fixture()
def merged(fam: dict, tmp_path: Path) -> Path:
    """A merge in five shards."""
    out = tmp_path / "out"
    r = invoke("run", fam["config"], out, "--quiet", "--out-shard-size", "4KB")
    assert r.exit_code == 0, r.output
    return out


def test_clean_merge_has_manifest_and_verifies(merged: Path) -> None:
    manifest = json.loads((merged / MANIFEST_NAME).read_text())
    assert manifest["fusemerge_version"] == __version__
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) == 5
    assert sorted(manifest["files"]) == sorted(shards + ["model.safetensors.index.json"])
    for name, entry in manifest["files"].items():
        data = (merged / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert verify(merged) == []
    r = invoke("verify", merged)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "OK: 5 shards verified"
    assert leftovers(merged.parent) == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 3)


@pytest.mark.parametrize("damage, needle", [
    (_flip_byte, "SHA-256"),
    (_truncate, "bytes, the manifest says"),
    (Path.unlink, "missing"),
])
def test_damaged_shard_fails_verify_naming_the_file(merged: Path, damage, needle: str) -> None:
    shard = merged / "model-00003-of-00005.safetensors"
    damage(shard)
    r = invoke("verify", merged)
    assert r.exit_code == 2, r.output
    lines = errors(r.stderr)
    assert len(lines) == 1 and str(shard) in lines[0] and needle in lines[0], r.stderr
    assert "OK" not in r.stdout


def test_verify_reports_a_corrupt_header_and_an_unlisted_shard(merged: Path) -> None:
    manifest_path = merged / MANIFEST_NAME
    shard = merged / "model-00001-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[8] = ord("[")  # the header JSON no longer parses; make the manifest agree with the new bytes
    shard.write_bytes(bytes(data))
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][shard.name]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    (merged / "extra.safetensors").write_bytes(b"x")
    problems = verify(merged)
    assert any(str(shard) in p for p in problems) and any("extra.safetensors: not listed" in p for p in problems)


def test_verify_without_manifest_exit_2(merged: Path, tmp_path: Path) -> None:
    (merged / MANIFEST_NAME).unlink()
    r = invoke("verify", merged)
    assert r.exit_code == 2 and MANIFEST_NAME in errors(r.stderr)[0]
    r = invoke("verify", tmp_path / "nope")
    assert r.exit_code == 2 and str(tmp_path / "nope") in errors(r.stderr)[0]


def _python(script: str, *args: object, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


# A merge that pauses once its shards are written (before the manifest) until the file `go` exists.
SLOW_MERGE = """
    import sys, time
    from pathlib import Path
    import fusemerge.merge
    config, out, started, go = sys.argv[1:]
    write_manifest = fusemerge.merge.write_manifest

    def paused(*args, **kwargs):
        Path(started).touch()
        while not Path(go).exists():
            time.sleep(0.02)
        return write_manifest(*args, **kwargs)

    fusemerge.merge.write_manifest = paused
    from fusemerge.cli import main
    main(["run", config, out, "--quiet"])
"""


def test_second_merge_into_the_same_out_dir_is_refused(fam: dict, tmp_path: Path) -> None:
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    first = _python(SLOW_MERGE, fam["config"], out, started, go)
    try:
        _wait_for(started, first)
        for args in (["--quiet"], ["--quiet", "--overwrite"]):
            r = invoke("run", fam["config"], out, *args)
            assert r.exit_code == 2, r.output
            lines = errors(r.stderr)
            assert len(lines) == 1 and "another fusemerge run is writing" in lines[0], r.stderr
            assert str(lock_path(out)) in lines[0]
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        go.touch()
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert verify(out) == [] and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


HOLD_LOCK = """
    import sys, time
    from pathlib import Path
    from fusemerge.streaming.lock import out_dir_lock
    with out_dir_lock(sys.argv[1]):
        Path(sys.argv[2]).touch()
        time.sleep(600)
"""


def test_lock_of_a_killed_run_does_not_block(fam: dict, tmp_path: Path) -> None:
    out, held = tmp_path / "out", tmp_path / "held"
    holder = _python(HOLD_LOCK, out, held)
    try:
        _wait_for(held, holder)
        assert lock_path(out).exists()
        r = invoke("run", fam["config"], out, "--quiet")
        assert r.exit_code == 2 and "another fusemerge run" in r.stderr, r.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # left behind by the killed process
    r = invoke("run", fam["config"], out, "--quiet")
    assert r.exit_code == 0, r.output
    assert verify(out) == [] and leftovers(tmp_path) == []


# Runs the CLI with every file limited to `limit` bytes; SIGXFSZ ignored so writes fail with EFBIG.
FSIZE_LIMITED = """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from fusemerge.cli import main
    main(sys.argv[2:])
"""


def _existing_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def _assert_untouched(out: Path) -> None:
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert leftovers(out.parent) == []


def test_file_too_large_exit_1_and_out_dir_untouched(fam: dict, tmp_path: Path) -> None:
    out = _existing_out(tmp_path)
    proc = _python(FSIZE_LIMITED, 8192, "run", fam["config"], out, "--overwrite", "--quiet")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines == errors(stderr), stderr
    assert str(out) in lines[0] and "file too large" in lines[0]
    _assert_untouched(out)


def test_disk_full_during_writes_exit_1_and_out_dir_untouched(
    fam: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUT_DIR stays as it was; the partial merge is kept beside it, for --resume once space is freed
    (tests/test_resume.py resumes one)."""
    import fusemerge.streaming.writer as writer

    pwrite_all = writer._pwrite_all

    def full(fd: int, buf: memoryview, offset: int) -> None:
        if offset > 0:  # headers land at offset 0; the disk fills with the first tensor data
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pwrite_all(fd, buf, offset)

    monkeypatch.setattr(writer, "_pwrite_all", full)
    out = _existing_out(tmp_path)
    r = invoke("run", fam["config"], out, "--overwrite", "--quiet")
    assert r.exit_code == 1, r.output
    lines = errors(r.stderr)
    assert len(lines) == 1 and str(out) in lines[0] and "the disk is full" in lines[0], r.stderr
    temp = temp_dir_path(out)
    assert f"the partial merge is kept in {temp}" in lines[0] and (temp / JOURNAL_NAME).is_file(), r.stderr
    shutil.rmtree(temp)
    _assert_untouched(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_exit_2(fam: dict, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        r = invoke("run", fam["config"], parent / "out", "--quiet")
        assert r.exit_code == 2, r.output
        assert any(str(parent) in e and "not writable" in e for e in errors(r.stderr)), r.stderr
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


def test_parent_that_is_a_file_exit_2(fam: dict, tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    r = invoke("run", fam["config"], parent / "out", "--quiet")
    assert r.exit_code == 2, r.output
    assert any(str(parent) in e and "not a directory" in e for e in errors(r.stderr)), r.stderr
    assert parent.read_text() == "not a directory" and leftovers(tmp_path) == []
