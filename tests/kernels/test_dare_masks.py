"""DARE masks on the CPU path: kept between passes (KeepMasks) and drawn in worker processes (MaskWorkers),
always with dare_keep_run's bits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fusemerge.kernels import dare_masks, philox, philox_numpy
from fusemerge.kernels.dare_masks import KeepMasks, MaskWorkers
from fusemerge.kernels.philox import dare_key


def test_keep_masks_hand_out_each_stored_mask_once_within_their_bound(monkeypatch) -> None:
    key = dare_key(0, "w", 0)
    masks = KeepMasks(max_bytes=2 * 125)  # room for two runs of 1000 entries (125 bytes each)
    first = [masks.draw(key, s, 1000, 0.3, keep=True) for s in (0, 1000, 2000)]
    assert masks.held_bytes == 250
    for s, m in zip((0, 1000, 2000), first, strict=True):
        assert torch.equal(m, philox.dare_keep_run(key, s, 1000, 0.3))
    drawn = []
    real = philox.dare_keep_run
    monkeypatch.setattr(dare_masks, "dare_keep_run", lambda *a, **k: drawn.append(a[1]) or real(*a, **k))
    again = [masks.draw(key, s, 1000, 0.3) for s in (0, 1000, 2000, 0)]
    assert drawn == [2000, 0]  # the third did not fit; the first was handed out once and forgotten
    assert all(torch.equal(a, b) for a, b in zip(again, first + first[:1], strict=True))
    assert masks.held_bytes == 0 and masks.used_bytes == 250
    masks.draw(key, 0, 1000, 0.3, keep=True)  # space is not reused: nothing more is stored
    assert masks.held_bytes == 0 and masks.used_bytes == 250 and masks.drawn == 6 and masks.reused == 2
    # another density, key, or run is another mask: never confused with a stored one
    masks = KeepMasks(max_bytes=1000)
    masks.draw(key, 0, 1000, 0.3, keep=True)
    assert torch.equal(masks.draw(key, 0, 1000, 0.8), philox.dare_keep_run(key, 0, 1000, 0.8))
    assert torch.equal(masks.draw(key + 1, 0, 1000, 0.3), philox.dare_keep_run(key + 1, 0, 1000, 0.3))
    assert torch.equal(masks.draw(key, 0, 999, 0.3), philox.dare_keep_run(key, 0, 999, 0.3))
    assert masks.held_bytes == 125
    assert torch.equal(masks.draw(key, 0, 1000, 0.3), first[0]) and masks.held_bytes == 0  # handed out


RUNS = [(0, 1), (0, 8), (5, 1003), (2**32 - 3_000, 6_000), (2**50 + 1, 40_000), (2**63 - 64, 64)]


@pytest.mark.parametrize("density", [0.0, 0.2, 0.75, 1.0])
def test_workers_draw_the_same_bits(density: float) -> None:
    key = dare_key(3, "model.layers.1.mlp.up_proj.weight", 2)
    with MaskWorkers(2) as workers:
        for start, n in RUNS:
            packed = workers.draw_packed(key, start, n, density)
            assert packed.dtype == np.uint8 and packed.size == -(-n // 8)
            got = np.unpackbits(packed, count=n, bitorder="little").astype(bool)
            assert np.array_equal(got, philox.dare_keep_run(key, start, n, density).numpy()), (start, n)
        assert workers.served == len(RUNS) and workers.failed == 0
    assert workers.draw_packed(key, 0, 0, 0.5).size == 0


def test_workers_serve_several_threads() -> None:
    keys = [dare_key(0, "w", i) for i in range(6)]
    results: dict[int, np.ndarray] = {}
    with MaskWorkers(2) as workers:
        def work(i: int) -> None:
            results[i] = workers.draw_packed(keys[i], 1000 * i, 20_000 + i, 0.3)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert workers.served == 6
    for i, packed in results.items():
        want = philox.dare_keep_run(keys[i], 1000 * i, 20_000 + i, 0.3).numpy()
        assert np.array_equal(np.unpackbits(packed, count=20_000 + i, bitorder="little").astype(bool), want)


def test_a_failed_worker_is_dropped_and_its_run_drawn_in_place() -> None:
    key = dare_key(1, "w", 0)
    want = np.packbits(philox.dare_keep_run(key, 77, 5000, 0.4).numpy(), bitorder="little")
    with MaskWorkers(2) as workers:
        for proc in list(workers._all):
            proc.kill()
            proc.wait()
        for _ in range(3):  # both dead workers are found and dropped; then every draw is in place
            assert np.array_equal(workers.draw_packed(key, 77, 5000, 0.4), want)
        assert workers.failed == 2 and workers.served == 0
    assert np.array_equal(workers.draw_packed(key, 77, 5000, 0.4), want)  # after close: in place


@pytest.mark.parametrize("program", ["silent", "cat"])
def test_a_program_that_does_not_say_ready_is_not_used(program, monkeypatch, tmp_path) -> None:
    """sys.executable that is not Python (an embedding application's binary): one that never writes (the
    timeout), one that writes something else."""
    if program == "silent":
        fake = tmp_path / "silent"
        fake.write_text("#!/bin/sh\nexec sleep 30\n")
        fake.chmod(0o755)
        program = str(fake)
    else:
        program = "/bin/cat"  # prints the script it is given
    monkeypatch.setattr(dare_masks.sys, "executable", program)
    monkeypatch.setattr(dare_masks, "READY_TIMEOUT_S", 0.5)
    key = dare_key(2, "w", 0)
    with MaskWorkers(2) as workers:
        assert workers.failed == 2 and workers.alive == 0
        got = workers.draw_packed(key, 3, 500, 0.5)
    assert np.array_equal(got, np.packbits(philox.dare_keep_run(key, 3, 500, 0.5).numpy(), bitorder="little"))


def test_no_worker_started_draws_in_place(monkeypatch) -> None:
    def no_process(*a, **k):
        raise OSError("no processes here")

    monkeypatch.setattr(dare_masks.subprocess, "Popen", no_process)
    key = dare_key(2, "w", 1)
    with MaskWorkers(2) as workers:
        assert workers.failed == 2
        got = workers.draw_packed(key, 0, 999, 0.5)
    assert np.array_equal(got, np.packbits(philox.dare_keep_run(key, 0, 999, 0.5).numpy(), bitorder="little"))


def test_serve_answers_until_end_of_input() -> None:
    import io

    k0, k1 = philox._split_key(-7)
    below = philox.keep_below(0.6)
    requests = io.BytesIO(philox_numpy.REQUEST.pack(k0, k1, 10, 100, below)
                          + philox_numpy.REQUEST.pack(k0, k1, 2**33, 9, below) + b"\x01\x02")  # a torn request ends it
    answers = io.BytesIO()
    philox_numpy.serve(requests, answers)
    want = [np.packbits(philox.dare_keep_run(-7, s, n, 0.6).numpy(), bitorder="little").tobytes()
            for s, n in [(10, 100), (2**33, 9)]]
    assert answers.getvalue() == philox_numpy.READY + b"".join(want)


def test_keep_masks_store_what_the_workers_drew() -> None:
    key = dare_key(0, "w", 3)
    with MaskWorkers(1) as workers:
        masks = KeepMasks(1 << 20, workers)
        first = masks.draw(key, 0, 4000, 0.25, keep=True)
        assert workers.served == 1 and masks.held_bytes == 500
        assert torch.equal(masks.draw(key, 0, 4000, 0.25), first)
        assert workers.served == 1 and masks.held_bytes == 0  # the second use drew nothing
    assert torch.equal(first, philox.dare_keep_run(key, 0, 4000, 0.25))


def test_the_worker_script_imports_numpy_only() -> None:
    import ast

    tree = ast.parse(open(philox_numpy.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "numpy", "struct", "sys"}


def test_an_error_while_a_worker_answers_drops_it_and_is_raised() -> None:
    """The worker's pipe state is unknown after an unexpected error: it is dropped (never lost while still
    counted, which left the other threads waiting on the idle queue) and the error reaches the caller."""

    class Failing:
        def read(self, size: int) -> bytes:
            raise MemoryError("injected")

    key = dare_key(4, "w", 0)
    with MaskWorkers(2) as workers:
        first, second = list(workers._all)
        first.stdout = Failing()
        second.kill()
        second.wait()
        with pytest.raises(MemoryError):  # the idle queue hands out the workers in the order they started
            workers.draw_packed(key, 0, 100, 0.5)
        assert workers.alive == 1 and workers.failed == 1  # `first` dropped; `second`'s death not seen yet
        done = threading.Event()
        out = []
        t = threading.Thread(target=lambda: (out.append(workers.draw_packed(key, 0, 100, 0.5)), done.set()))
        t.start()
        assert done.wait(10), "a draw waited for a worker that was lost"
        assert workers.alive == 0 and workers.failed == 2
    want = np.packbits(philox.dare_keep_run(key, 0, 100, 0.5).numpy(), bitorder="little")
    assert np.array_equal(out[0], want)


def test_workers_that_never_say_ready_share_one_wait(monkeypatch, tmp_path) -> None:
    import time

    fake = tmp_path / "silent"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(dare_masks.sys, "executable", str(fake))
    monkeypatch.setattr(dare_masks, "READY_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    with MaskWorkers(4) as workers:
        assert workers.failed == 4
    assert time.monotonic() - t0 < 3.0  # one shared second, not 4 x 1 s


def test_merge_tensors_draws_each_mask_once_with_odd_chunks(monkeypatch) -> None:
    from fusemerge import merge_tensors

    drawn = []
    real = philox.dare_keep_run
    monkeypatch.setattr(dare_masks, "dare_keep_run", lambda *a, **k: drawn.append(a[:3]) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1000, generator=g)
    experts = [base + 0.1 * torch.randn(1000, generator=g) for _ in range(3)]
    merge_tensors(base, experts, "dare_ties", density=0.4, name="w", seed=2, chunk=97)
    assert drawn and len(drawn) == len(set(drawn)) == 3 * 11  # 11 chunks of 97 (the last 30), 3 experts


@pytest.mark.parametrize("numel,chunk,experts", [(1000, 97, 3), (0, 5, 2), (262144 * 3 + 5, 262144, 4), (7, 8, 1),
                                                 (16, 8, 2)])
def test_bytes_for_is_what_storing_every_chunk_takes(numel: int, chunk: int, experts: int) -> None:
    masks = KeepMasks(10**9)
    for i in range(experts):
        for s in range(0, numel, chunk):
            masks.draw(dare_key(0, "w", i), s, min(chunk, numel - s), 0.5, keep=True)
    assert KeepMasks.bytes_for(numel, chunk, experts) == masks.used_bytes
