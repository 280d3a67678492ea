"""A PyTorch `.bin` checkpoint larger than 4 GiB (a ZIP64 archive): does fusemerge read torch.load's bytes?

torch.save writes a zip; past 4 GiB the member offsets and sizes move to ZIP64 records (the central directory's
"extra" fields and a ZIP64 end record). This writes, with torch.save, a state dict of a small tensor, one of
`--gib` GiB of bf16 (its storage crosses the 4 GiB mark) and a small tensor stored after it (every byte past
4 GiB), then checks that `fusemerge.streaming.model_index.open_model` gives every tensor the dtype, shape and
bytes that `torch.load(..., mmap=True)` gives (the big one compared in 256 MiB windows), and times both. Too
large for CI; one command:

    python bench/bin_large.py                 # 4.5 GiB in a temporary directory (needs ~5 GB of disk, ~10 GB RAM)
    python bench/bin_large.py --gib 6 --dir /data/tmp
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from fusemerge.streaming.model_index import open_model  # noqa: E402
from fusemerge.streaming.reader import ChunkReader  # noqa: E402

WINDOW = 1 << 27  # bf16 elements compared at a time (256 MiB)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4.5, help="size of the big tensor, GiB (more than 4)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "pytorch_model.bin"
        n = int(args.gib * 2**30) // 2
        g = torch.Generator().manual_seed(0)
        big = torch.empty(n, dtype=torch.bfloat16)
        for s in range(0, n, WINDOW):  # distinct values everywhere, made a window at a time
            c = min(WINDOW, n - s)
            big[s:s + c] = (torch.randn(c, generator=g) + s / n).to(torch.bfloat16)
        state = {"first.weight": torch.randn(3, 5, generator=g), "big.weight": big,
                 "after.weight": torch.randn(7, 11, generator=g).to(torch.float16)}
        t0 = time.perf_counter()
        torch.save(state, path)
        save_s = time.perf_counter() - t0
        del state, big
        with zipfile.ZipFile(path) as zf:
            offsets = {i.filename: i.header_offset for i in zf.infolist()}
        size = path.stat().st_size
        t0 = time.perf_counter()
        model = open_model(path)
        index_s = time.perf_counter() - t0
        loaded = torch.load(path, mmap=True, weights_only=True)
        problems = []
        t0 = time.perf_counter()
        with ChunkReader() as reader:
            for name, want in loaded.items():
                entry = model.tensors[name]
                if entry.torch_dtype != want.dtype or tuple(entry.shape) != tuple(want.shape):
                    problems.append(f"{name}: {entry.torch_dtype} {entry.shape} vs {want.dtype} {tuple(want.shape)}")
                    continue
                flat = want.reshape(-1)
                for s in range(0, flat.numel(), WINDOW):
                    c = min(WINDOW, flat.numel() - s)
                    got = reader.read(entry, s, c)
                    if not torch.equal(got.view(torch.uint8), flat[s:s + c].view(torch.uint8)):
                        problems.append(f"{name}: elements {s}..{s + c} differ")
                    reader.release(entry, s, c)
        read_s = time.perf_counter() - t0
        m = machine()
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        past = sorted(k for k, v in offsets.items() if v >= 2**32)
        print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {when}; torch {torch.__version__}")
        print(f"file: {size / 2**30:.2f} GiB, {len(offsets)} zip members, members stored past 4 GiB: {past}")
        print(f"torch.save {save_s:.1f} s; fusemerge index {index_s * 1e3:.1f} ms; every byte compared in "
              f"{read_s:.1f} s")
        print("OK: every tensor has torch.load's dtype, shape and bytes" if not problems else "\n".join(problems))
        return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
