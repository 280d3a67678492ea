"""`trim_scope: global` thresholds found once per merge and kept in a file (streaming/global_cuts.py): the parts of a
partitioned merge share them (one part finds them, the others wait and read them), a resumed run reads its own,
and a file of another merge, or a damaged one, is never used."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import fusemerge
from fusemerge.partition import parts_root
from fusemerge.streaming.executor import Executor
from fusemerge.streaming.global_cuts import CUTS_NAME, FORMAT, LOCK_NAME, CutsFile
from fusemerge.streaming.writer import temp_dir_path
from fusemerge.synthetic import make_llama_family, write_config_yaml

SHAPE = dict(hidden=32, intermediate=72, layers=2, vocab=101)
SHARDS = "6KB"
OPTS = dict(device="cpu", out_shard_size=SHARDS, max_memory="64KiB")
CUTS = [((1000, 17), (2**31 - 1, 0)), ((999, 4), (5, 6))]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("global-cuts")
    fam = make_llama_family(root / "models", n_experts=3, seed=11, **SHAPE)
    for density in (0.3, 0.5):
        fam[density] = root / f"ties-{density}.yml"
        write_config_yaml(fam[density], "ties", fam["base"], fam["experts"], density=density, trim_scope="global")
    fam["reference"] = root / "reference"
    fusemerge.run(fam[0.3], fam["reference"], device="cpu", workers=1, out_shard_size=SHARDS)
    return fam


@pytest.fixture
def finds(monkeypatch) -> list[int]:
    """Counts the whole-model threshold searches (Executor.find_global_cuts) made in this process."""
    calls: list[int] = []
    real = Executor.find_global_cuts

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Executor, "find_global_cuts", counted)
    return calls


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- the file --------------------------------------------------------------------------------------------------


def test_cuts_round_trip_and_missing_file(tmp_path: Path) -> None:
    f = CutsFile(tmp_path, "m1", 2, shared=False)
    assert f.load() is None
    assert f.load_or_find(lambda: CUTS) == CUTS
    assert f.load_or_find(lambda: pytest.fail("found again")) == CUTS
    assert json.loads((tmp_path / CUTS_NAME).read_text())["cuts"] == [[1000, 17, 2**31 - 1, 0], [999, 4, 5, 6]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CUTS_NAME]  # no lock for a run's own file
    f.remove()
    assert list(tmp_path.iterdir()) == []


def _signed(merge: str, rows: list) -> dict:
    from fusemerge.streaming.global_cuts import _checksum

    return {"format": FORMAT, "merge": merge, "cuts": rows, "sha256": _checksum(merge, rows)}


def _flipped() -> dict:
    data = _signed("m1", [[990380032, 2, 3, 4]] * 2)
    data["cuts"][1][0] = 890380032  # one digit: still valid JSON, other thresholds, other bytes
    return data


@pytest.mark.parametrize("content, said", [
    (_signed("other", [[1, 2, 3, 4]] * 2), "holds the thresholds of another merge"),
    (_flipped(), "does not match its checksum"),
    ({"format": FORMAT, "merge": "m1", "cuts": [[1, 2, 3, 4]] * 2}, "does not match its checksum"),
    ({"format": FORMAT, "merge": "m1", "cuts": [[1, 2, 3, 4]] * 3}, "not a fusemerge global-thresholds file of 2"),
    ({"format": FORMAT, "merge": "m1", "cuts": [[1, 2, 3, True]] * 2}, "not a fusemerge global-thresholds file"),
    ({"format": FORMAT, "merge": "m1", "cuts": [[1, 2, 3, -4]] * 2}, "not a fusemerge global-thresholds file"),
    ({"format": "fusemerge-global-cuts/0", "merge": "m1", "cuts": [[1, 2, 3, 4]] * 2}, "not a fusemerge global"),
    ("{torn", "unreadable"),
])
def test_a_file_not_of_this_merge_is_found_again_and_replaced(tmp_path: Path, content, said: str) -> None:
    (tmp_path / CUTS_NAME).write_text(content if isinstance(content, str) else json.dumps(content))
    notes: list[str] = []
    f = CutsFile(tmp_path, "m1", 2, shared=True, notify=notes.append)
    assert f.load_or_find(lambda: CUTS) == CUTS
    assert len(notes) == 1 and said in notes[0] and "again" in notes[0]
    assert CutsFile(tmp_path, "m1", 2, shared=True).load() == CUTS


def test_a_second_part_waits_for_the_first_and_reads_its_thresholds(tmp_path: Path) -> None:
    finding, release = threading.Event(), threading.Event()
    notes: list[str] = []

    def slow_find():
        finding.set()
        assert release.wait(10)
        return CUTS

    first = threading.Thread(target=CutsFile(tmp_path, "m1", 2, shared=True).load_or_find, args=(slow_find,))
    first.start()
    assert finding.wait(10)
    got: list = []
    second = threading.Thread(target=lambda: got.append(
        CutsFile(tmp_path, "m1", 2, shared=True, notify=notes.append).load_or_find(lambda: pytest.fail("found"))))
    second.start()
    second.join(0.3)
    assert second.is_alive() and not got  # waiting on the lock while the first part finds them
    release.set()
    first.join(10)
    second.join(10)
    assert got == [CUTS]
    assert notes[0].startswith("another part is finding the trim_scope: global thresholds")
    assert "read from" in notes[1]
    assert (tmp_path / LOCK_NAME).exists()


def test_a_part_that_dies_while_finding_leaves_them_to_the_next(tmp_path: Path) -> None:
    def dies():
        raise OSError("killed")

    with pytest.raises(OSError):
        CutsFile(tmp_path, "m1", 2, shared=True).load_or_find(dies)
    assert not (tmp_path / CUTS_NAME).exists()
    assert CutsFile(tmp_path, "m1", 2, shared=True).load_or_find(lambda: CUTS) == CUTS


# -- in merges -------------------------------------------------------------------------------------------------


def test_parts_find_the_global_thresholds_once(fam: dict, tmp_path: Path, finds: list[int]) -> None:
    out = tmp_path / "out"
    notes: list[str] = []
    for i in range(3):
        fusemerge.run(fam[0.3], out, partition=f"{i}/3", notify=notes.append, **OPTS)
    assert len(finds) == 1
    assert sum("thresholds read from" in n for n in notes) == 2
    assert (parts_root(out) / CUTS_NAME).is_file()
    fusemerge.finalize(out)
    assert files(out) == files(fam["reference"])
    assert not parts_root(out).exists()


def test_parts_do_not_use_the_thresholds_of_another_merge(fam: dict, tmp_path: Path, finds: list[int]) -> None:
    out = tmp_path / "out"
    fusemerge.run(fam[0.5], out, partition="0/2", **OPTS)  # another density: other thresholds
    notes: list[str] = []
    for i in range(2):
        fusemerge.run(fam[0.3], out, partition=f"{i}/2", overwrite=True, notify=notes.append, **OPTS)
    assert len(finds) == 2
    assert any("holds the thresholds of another merge" in n for n in notes)
    fusemerge.finalize(out)
    assert files(out) == files(fam["reference"])


def test_a_resumed_run_reads_its_thresholds_and_leaves_none_in_the_output(fam: dict, tmp_path: Path,
                                                                          finds: list[int]) -> None:
    out = tmp_path / "out"
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] >= 60_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fusemerge.run(fam[0.3], out, workers=1, progress=progress, **OPTS)
    assert (temp_dir_path(out) / CUTS_NAME).is_file()
    notes: list[str] = []
    fusemerge.run(fam[0.3], out, resume=True, notify=notes.append, **OPTS)
    assert len(finds) == 1
    assert any("thresholds read from" in n for n in notes)
    assert files(out) == files(fam["reference"])  # no thresholds file among them


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_part_waits_for_a_process_holding_the_lock_and_goes_on_when_it_dies(fam: dict, tmp_path: Path) -> None:
    """A real process holds the thresholds' lock (a part finding them); the part started meanwhile waits, and
    when that process is killed the kernel frees the lock: the part finds the thresholds itself and merges."""
    import subprocess
    import sys

    out = tmp_path / "out"
    root = parts_root(out)
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        notes: list[str] = []
        waiting = threading.Event()

        def note(line: str) -> None:
            notes.append(line)
            if line.startswith("another part is finding"):
                waiting.set()

        part = threading.Thread(target=fusemerge.run, args=(fam[0.3], out),
                                kwargs=dict(partition="0/2", notify=note, **OPTS))
        part.start()
        assert waiting.wait(30)
        part.join(0.5)
        assert part.is_alive()  # blocked on the lock while its holder lives
    finally:
        holder.kill()
        holder.wait()
    part.join(60)
    assert not part.is_alive()
    assert (root / CUTS_NAME).is_file() and (root / "part-0-of-2").is_dir()
    fusemerge.run(fam[0.3], out, partition="1/2", **OPTS)
    fusemerge.finalize(out)
    assert files(out) == files(fam["reference"])
