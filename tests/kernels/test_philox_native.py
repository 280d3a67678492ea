"""The compiled keep test (kernels/philox_native.py): numpy's bits, built once, and the numpy path whenever it
cannot be built or gives other bits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fusemerge.kernels import native_build, philox_native
from fusemerge.kernels.philox import _split_key, dare_keep_run, dare_key, keep_below
from fusemerge.kernels.philox_numpy import keep_run as numpy_keep_run

needs_compiled = pytest.mark.skipif(not philox_native.available(),
                                    reason=f"keep test not compiled here: {philox_native.describe()}")


@pytest.fixture
def fresh(monkeypatch, native_cache):
    """philox_native as in a new process, with its cache in tmp_path."""
    monkeypatch.setattr(philox_native, "_state", {})
    return native_cache


def both(k0: int, k1: int, start: int, n: int, below: int) -> tuple[np.ndarray, np.ndarray]:
    got = np.empty(n, dtype=np.bool_)
    philox_native.keep_run(k0, k1, start, n, below, got)
    want = np.empty(n, dtype=np.bool_)
    numpy_keep_run(k0, k1, start, n, below, want)
    return got, want


@needs_compiled
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, (1 << 14) + 3])
@pytest.mark.parametrize("where", ["low", "across 2^32", "across 2^33", "high"])
def test_compiled_gives_numpys_bits(n: int, where: str) -> None:
    rng = np.random.default_rng([n, len(where)])
    start = {"low": int(rng.integers(0, 1 << 20)), "across 2^32": (1 << 32) - n // 2,
             "across 2^33": (1 << 33) - n // 3 - 1, "high": (1 << 62) + int(rng.integers(0, 1 << 40))}[where]
    for _ in range(3):  # fresh keys and densities, the edges of `below` among them
        k0, k1 = (int(x) for x in rng.integers(0, 1 << 32, size=2, dtype=np.uint64))
        for below in (0, 1, int(rng.integers(1, 1 << 31)), keep_below(float(rng.random())), 1 << 31):
            got, want = both(k0, k1, start, n, below)
            assert np.array_equal(got, want), (k0, k1, start, n, below)


@needs_compiled
def test_dare_keep_run_on_cpu_is_the_compiled_draw_of_the_documented_stream() -> None:
    key = dare_key(11, "model.layers.3.mlp.up_proj.weight", 2)
    k0, k1 = _split_key(key)
    mask = dare_keep_run(key, (1 << 32) - 300, 1000, 0.37).numpy()
    want = np.empty(1000, dtype=np.bool_)
    numpy_keep_run(k0, k1, (1 << 32) - 300, 1000, keep_below(0.37), want)
    assert np.array_equal(mask, want) and 0 < mask.sum() < 1000


def test_out_must_hold_n_contiguous_bools() -> None:
    for out in (np.empty(10, dtype=np.uint8), np.empty(5, dtype=np.bool_), np.empty(20, dtype=np.bool_)[::2]):
        with pytest.raises(ValueError, match="contiguous bool array"):
            philox_native.keep_run(1, 2, 0, 10, 1 << 30, out)


@needs_compiled
def test_built_once_then_found_in_the_cache(fresh, monkeypatch) -> None:
    assert philox_native.describe().startswith("compiled (")
    built = sorted((fresh / "cache").glob("philox-*.so"))
    assert len(built) == 1 and not list((fresh / "cache").glob(".build-*"))  # the build dir is gone
    calls: list[list[str]] = []
    real_run = native_build.subprocess.run

    def run(cmd, **kw):
        calls.append(cmd)
        return real_run(cmd, **kw)

    monkeypatch.setattr(philox_native, "_state", {})
    monkeypatch.setattr(native_build.subprocess, "run", run)
    assert philox_native.describe() == f"compiled ({built[0]})"
    assert [c[-1] for c in calls] == ["--version"]  # asked the compiler its version, compiled nothing


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_numpy_draws(fresh, monkeypatch, cc: str) -> None:
    monkeypatch.setenv("CC", cc)
    assert not philox_native.available()
    how = philox_native.describe()
    assert how.startswith("numpy (") and str(fresh / "cache") in how and str(fresh / "tmp") in how, how
    got, want = both(5, 6, (1 << 32) - 40, 100, keep_below(0.5))
    assert np.array_equal(got, want)


def test_fusemerge_native_0_asks_for_numpy(fresh, monkeypatch) -> None:
    monkeypatch.setenv("FUSEMERGE_NATIVE", "0")
    assert philox_native.describe() == "numpy (FUSEMERGE_NATIVE=0)"
    assert not list(fresh.glob("cache/*"))


@needs_compiled
def test_a_library_that_disagrees_with_numpy_is_not_used(fresh, monkeypatch) -> None:
    wrong = philox_native.SOURCE.replace("c1 = (uint32_t)pb;", "c1 = (uint32_t)pa;")  # a round's words mixed up
    monkeypatch.setattr(philox_native, "SOURCE", wrong)
    assert not philox_native.available()
    assert "disagreed with numpy's draws" in philox_native.describe()
    got, want = both(1, 2, 3, 1000, 1 << 30)
    assert np.array_equal(got, want)


@needs_compiled
def test_unwritable_cache_builds_in_the_temp_dir(fresh, monkeypatch) -> None:
    (fresh / "cache").write_text("a file where the cache directory should be")
    how = philox_native.describe()
    assert how.startswith(f"compiled ({fresh / 'tmp'}"), how



@needs_compiled
def test_a_cache_others_may_write_is_not_loaded_from(fresh) -> None:
    (fresh / "cache").mkdir()
    (fresh / "cache").chmod(0o777)
    how = philox_native.describe()
    assert how.startswith(f"compiled ({fresh / 'tmp'}"), how  # built in the private temp directory instead
    lib = Path(how[len("compiled ("):-1])
    assert lib.stat().st_mode & 0o777 == 0o755 and lib.parent.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_temp_dir_of_another_user_is_not_loaded_from(fresh) -> None:
    planted = fresh / "tmp" / f"fusemerge-{os.getuid()}"
    planted.mkdir(parents=True, mode=0o700)
    os.chown(planted, 12345, 12345)  # left by another user before this one's first run
    (fresh / "cache").write_text("no cache directory either")
    how = philox_native.describe()
    assert how.startswith("numpy (") and "is not this user's alone (owner uid 12345" in how, how


@needs_compiled
def test_a_library_reached_through_a_symbolic_link_is_not_loaded(fresh, monkeypatch) -> None:
    """The file checked is the file loaded: opened without following links, checked by its descriptor."""
    assert philox_native.describe().startswith(f"compiled ({fresh / 'cache'}")
    (lib,) = (fresh / "cache").glob("philox-*.so")
    elsewhere = fresh / "elsewhere.so"
    lib.rename(elsewhere)
    lib.symlink_to(elsewhere)  # as another user's planted link would be
    monkeypatch.setattr(philox_native, "_state", {})
    how = philox_native.describe()
    assert how.startswith(f"compiled ({fresh / 'tmp'}"), how  # built again in the private temp directory
