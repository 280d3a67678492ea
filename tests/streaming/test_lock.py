"""File systems without file locks (Lustre without `-o flock`, some FUSE / SMB mounts): the lock is skipped with
one warning and the merge goes on; any other flock error is raised."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

import pytest

import fusemerge
from fusemerge.streaming import global_cuts, lock
from fusemerge.streaming.global_cuts import CutsFile
from fusemerge.streaming.lock import lock_path, out_dir_lock
from fusemerge.synthetic import make_llama_family, write_config_yaml

CUTS = [((1000, 17), (2**31 - 1, 0))]


def refuse(code: int):
    def flock(fd, op):
        raise OSError(code, "Function not implemented" if code == errno.ENOSYS else "Input/output error")

    return flock


@pytest.mark.parametrize("code", sorted(lock.NO_LOCKS))
def test_a_file_system_without_locks_is_said_once_and_the_block_runs(tmp_path: Path, monkeypatch, code) -> None:
    monkeypatch.setattr(fcntl, "flock", refuse(code))
    notes: list[str] = []
    with out_dir_lock(tmp_path / "out", notes.append) as path:
        assert path == lock_path(tmp_path / "out")
    assert len(notes) == 1 and "does not support file locks" in notes[0] and "going on without the lock" in notes[0]
    assert not lock_path(tmp_path / "out").exists()


def test_other_flock_errors_are_raised(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fcntl, "flock", refuse(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        with out_dir_lock(tmp_path / "out"):
            pytest.fail("ran without the lock")
    with pytest.raises(OSError, match="Input/output error"):
        CutsFile(tmp_path, "m", 1, shared=True).load_or_find(lambda: CUTS)


def test_shared_thresholds_without_locks_are_found_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(global_cuts.fcntl, "flock", refuse(errno.ENOSYS))
    notes: list[str] = []
    assert CutsFile(tmp_path, "m", 1, shared=True, notify=notes.append).load_or_find(lambda: CUTS) == CUTS
    assert len(notes) == 1 and "parts started together" in notes[0]


def test_a_merge_and_a_join_run_where_there_are_no_locks(tmp_path: Path, monkeypatch) -> None:
    fam = make_llama_family(tmp_path / "models", n_experts=2, seed=2, hidden=32, intermediate=72, layers=2,
                            vocab=101)
    cfg = tmp_path / "ties.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4, trim_scope="global")
    fusemerge.run(cfg, tmp_path / "ref", device="cpu", out_shard_size="6KB")
    monkeypatch.setattr(fcntl, "flock", refuse(errno.ENOSYS))
    notes: list[str] = []
    for i in range(3):
        fusemerge.run(cfg, tmp_path / "out", device="cpu", out_shard_size="6KB", partition=f"{i}/3",
                      notify=notes.append)
    joined: list[str] = []
    fusemerge.finalize(tmp_path / "out", notify=joined.append)
    assert sum("does not support file locks" in n for n in joined) == 1  # OUT_DIR's and 3 parts' locks: once
    assert sum("does not support file locks" in n for n in notes) == 6  # each part: its lock and the thresholds'
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert {p.name: p.read_bytes() for p in ref.iterdir()} == {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_parent_that_cannot_hold_the_lock_file_is_an_input_error(tmp_path: Path, monkeypatch) -> None:
    """/sys/out or /proc/out (root may write there by access(2), but no file can be made): exit 2 with the path,
    not an OSError (exit 1)."""
    from fusemerge.errors import InputError

    real = lock.os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(".fusemerge.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", refuse)
    with pytest.raises(InputError, match=r"out: cannot be created: cannot write .*\.out\.fusemerge\.lock: Permission"):
        with out_dir_lock(tmp_path / "out"):
            pytest.fail("ran without its lock")
