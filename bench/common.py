"""Measurement pieces shared by the end-to-end benchmarks (e2e.py, compare_mergekit.py).

- `machine()`: CPU model, cores, RAM, for the tables.
- `timed_run(cmd, log, env)`: run a command as a subprocess; whole-process wall time, CPU seconds, peak
  anonymous memory (copy-on-write pages shared by forked processes counted once) and peak RSS summed over its
  process tree (sampled every ~5 ms from /proc), ru_maxrss.
- `read_all(files, threads=1)`: read files once (warms the page cache the same way before every run); with
  `threads`, several files at a time.
- `append_csv(path, rows)`: append result rows, header when the file is new, so the history stays.
- `model_tensors(dir)`: tensor name -> the safetensors file holding it.
- `add_chunk_loop_args(p)`, `compiled_loops_here()`: the options and the check shared by the benchmarks of one
  compiled CPU loop on chunks (stat_reads.py, gram_loops.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
SAMPLE_S = 0.005  # memory sampling period
RESCAN_EVERY = 10  # look for new descendants every 10 samples (~50 ms): scanning /proc costs ~1 ms
SHARED_EVERY = 40  # re-read the copy-on-write shared part every 40 samples (~0.2 s): smaps_rollup costs ~3 ms
READ_CHUNK = 16 << 20  # bytes per read() when warming the page cache


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram_gib": f"{ram_kb / 2**20:.1f}"}


def version_of(python: Path | str, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        if package == "fusemerge":  # not installed: the checkout's pyproject
            text = (REPO / "pyproject.toml").read_text()
            return next(line.split('"')[1] for line in text.splitlines() if line.startswith("version")) + " (src)"
        return "n/a"


def read_all(files: list[Path], threads: int = 1) -> float:
    """Read every file once (warms the page cache); returns the elapsed seconds.

    `threads` > 1 reads that many files at a time, one thread each: a disk with a deep queue (NVMe, a
    virtual disk) serves concurrent reads faster than one sequential stream, and fusemerge reads
    concurrently, so its I/O floor is the faster of the two.
    """

    def read_one(f: Path) -> None:
        buf = bytearray(READ_CHUNK)
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    t0 = time.perf_counter()
    if threads <= 1:
        for f in files:
            read_one(f)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read_one, files))
    return time.perf_counter() - t0


class TreeMonitor(threading.Thread):
    """Samples the summed anonymous memory and VmRSS (bytes) of a process and all its descendants.

    Anonymous memory is RssAnon summed over the tree, less what forked processes share copy-on-write (fusemerge's
    CPU worker processes start as copies of the run's process): summing RssAnon would count those pages once
    per process. The shared part, RssAnon - Pss_Anon of each process, comes from /proc/PID/smaps_rollup, which
    costs ~3 ms a read, so it is refreshed every SHARED_EVERY samples and only while the tree has several
    processes; one process shares nothing and is measured exactly as before.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.pids, self.stop = pid, {pid}, threading.Event()
        self.peak_anon = self.peak_rss = 0
        self.shared: dict[int, int] = {}  # pid -> bytes of its RssAnon counted by other processes too

    def _shared_anon(self, pid: int, rss_anon: int) -> int:
        """RssAnon - Pss_Anon of `pid` (bytes): its anonymous pages shared with other processes, less its share."""
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss_Anon:"):
                    return max(0, rss_anon - int(line.split()[1]) * 1024)
        except OSError:
            pass
        return 0

    def _descendants(self) -> set[int]:
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found, frontier = {self.root}, [self.root]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parent.items() if pp == p and c not in found]
            found.update(kids)
            frontier += kids
        return found

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            new = False
            if n % RESCAN_EVERY == 0:
                found = self._descendants()
                new = bool(found - self.pids)  # a fork shares everything at first: measure it before summing
                self.pids |= found
            refresh = len(self.pids) > 1 and (new or n % SHARED_EVERY == 0)
            n += 1
            anon = rss = 0
            for pid in list(self.pids):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            pid_anon = int(line.split()[1]) * 1024
                            if refresh:
                                self.shared[pid] = self._shared_anon(pid, pid_anon)
                            anon += pid_anon - self.shared.get(pid, 0)
                        elif line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
                except OSError:
                    self.pids.discard(pid)
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            time.sleep(SAMPLE_S)


def timed_run(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> dict:
    """Run `cmd` in `cwd`; wall time, sampled peaks and ru_maxrss (from wait4) of that child alone."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        mon = TreeMonitor(proc.pid)
        mon.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        mon.stop.set()
        mon.join()
    return {
        "rc": proc.returncode,
        "wall": wall,
        "anon": mon.peak_anon,
        "rss": mon.peak_rss,
        "maxrss": usage.ru_maxrss * 1024,
        "cpu": usage.ru_utime + usage.ru_stime,
    }


def model_tensors(d: Path) -> dict[str, Path]:
    return {name: f for f in sorted(d.glob("*.safetensors")) for name in safe_open(f, "pt").keys()}


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows to the results CSV; the header is written when the file is new. Rows with columns the file
    lacks rewrite it with the union of the columns (old rows get empty cells), so a benchmark may add columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    old: list[dict] = []
    rewrite = not path.exists()
    if not rewrite:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            have = list(reader.fieldnames or [])
            if set(fields) - set(have):  # new columns: the whole file is written again
                rewrite, old = True, list(reader)
            fields = have + [f for f in fields if f not in have]
    with open(path, "w" if rewrite else "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old)
        writer.writerows(rows)
    print(f"\nappended {len(rows)} row(s) to {path}")


def add_chunk_loop_args(p: argparse.ArgumentParser) -> None:
    """--chunks (entries per chunk), --rounds and --dtype, as the compiled-loop benchmarks take them."""
    p.add_argument("--chunks", type=int, nargs="+", default=[1 << 18, 1 << 22], help="entries per chunk")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")


def compiled_loops_here() -> bool:
    """Whether the CPU's compiled loops load here; says why not where they do not. Sets one torch thread."""
    import torch

    from fusemerge.kernels import cpu_fused

    if not cpu_fused.available():
        print(f"the CPU merge is not compiled here: {cpu_fused.describe()}")
        return False
    torch.set_num_threads(1)
    return True
