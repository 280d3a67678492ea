"""Byte-identical output across every axis a user can change without changing the merge.

One reference run (torch backend, CPU, one worker, unbounded memory) per method; each other run changes
one axis and must write the same bytes: repeated runs, memory budgets (chunk sizes), worker threads,
torch's intra-op threads, the Triton backend (interpreter on CPU) and, where a GPU is present, the CUDA
device with either backend. The seed is the one input that must change DARE's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import fusemerge
from fusemerge.synthetic import make_llama_family, write_config_yaml
from tests.kernels.test_reference import PARAMS

SHAPE = dict(hidden=20, intermediate=52, layers=2, vocab=97)
METHODS = ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic", "dare_linear", "slerp", "model_stock",
           "nuslerp", "nuslerp_no_base"]
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return make_llama_family(tmp_path_factory.mktemp("family"), n_experts=3, seed=21, shard_bytes=4000, **SHAPE)


@pytest.fixture(scope="module")
def configs(tmp_path_factory, fam) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for method in METHODS:
        out[method] = root / f"{method}.yml"
        if method in PARAMS:
            write_config_yaml(out[method], method, fam["base"], fam["experts"], weight=(1.0, 0.7, 1.2),
                              **PARAMS[method])
    # the angle methods: weights from exact sums over each tensor (kernels/fixed_dots.py)
    models = [{"model": str(m)} for m in (fam["base"], *fam["experts"])]
    out["slerp"].write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(fam["base"]),
                                            "models": models[:2], "parameters": {"t": [0.2, 0.6, 0.9]}}))
    out["model_stock"].write_text(yaml.safe_dump({"merge_method": "model_stock", "base_model": str(fam["base"]),
                                                  "models": models}))
    two = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(fam["experts"][1:], ([0.4, 1.0], 0.9),
                                                                             strict=True)]
    out["nuslerp"].write_text(yaml.safe_dump({"merge_method": "nuslerp", "base_model": str(fam["base"]),
                                              "models": two}))
    out["nuslerp_no_base"].write_text(yaml.safe_dump({"merge_method": "nuslerp", "models": two}))
    return out


def merged_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


_reference_cache: dict[str, dict[str, bytes]] = {}


def reference(cfg: Path, tmp_path_factory) -> dict[str, bytes]:
    if str(cfg) not in _reference_cache:
        out = tmp_path_factory.mktemp("ref") / "out"
        fusemerge.run(cfg, out, device="cpu", backend="torch", workers=1)
        _reference_cache[str(cfg)] = merged_bytes(out)
    return _reference_cache[str(cfg)]


AXES = {
    "repeat": dict(device="cpu", backend="torch", workers=1),
    "budget-32KiB": dict(device="cpu", backend="torch", workers=1, max_memory="32KiB"),
    "budget-64KiB-2-workers": dict(device="cpu", backend="torch", workers=2, max_memory="64KiB"),
    "3-workers": dict(device="cpu", backend="torch", workers=3),
    "triton-interpreter": dict(device="cpu", backend="triton", workers=1, max_memory="64KiB"),
    "cuda-triton": dict(device="cuda", backend="triton"),
    "cuda-triton-32KiB": dict(device="cuda", backend="triton", max_memory="32KiB"),
    "cuda-torch": dict(device="cuda", backend="torch"),
}


@pytest.mark.parametrize("axis", list(AXES))
@pytest.mark.parametrize("method", METHODS)
def test_same_bytes_on_every_axis(method, axis, configs, tmp_path, tmp_path_factory) -> None:
    opts = AXES[axis]
    if opts["device"] == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if axis == "triton-interpreter" and HAS_CUDA:
        pytest.skip("TRITON_INTERPRET is off on a GPU machine (the cuda-triton axes run the kernels there)")
    expect = reference(configs[method], tmp_path_factory)
    fusemerge.run(configs[method], tmp_path / "out", **opts)
    got = merged_bytes(tmp_path / "out")
    assert got.keys() == expect.keys()
    for name in expect:
        assert got[name] == expect[name], f"{axis}: {name} differs"


def test_torch_intra_op_threads_do_not_change_bytes(configs, tmp_path, tmp_path_factory) -> None:
    """The executor pins torch to one thread on CPU; a caller's thread setting must not leak into the math."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fusemerge.run(configs["ties"], tmp_path / "out", device="cpu", backend="torch")
    finally:
        torch.set_num_threads(before)
    assert merged_bytes(tmp_path / "out") == reference(configs["ties"], tmp_path_factory)
    assert torch.get_num_threads() == before


def test_dare_seed_changes_the_output_and_only_the_seed(configs, fam, tmp_path) -> None:
    cfg = tmp_path / "seeded.yml"
    write_config_yaml(cfg, "dare_ties", fam["base"], fam["experts"], weight=(1.0, 0.7, 1.2), **PARAMS["dare_ties"])
    fusemerge.run(cfg, tmp_path / "s1", device="cpu", seed=1)
    fusemerge.run(cfg, tmp_path / "s1b", device="cpu", seed=1, max_memory="64KiB")
    fusemerge.run(cfg, tmp_path / "s2", device="cpu", seed=2)
    assert merged_bytes(tmp_path / "s1") == merged_bytes(tmp_path / "s1b")
    assert merged_bytes(tmp_path / "s1") != merged_bytes(tmp_path / "s2")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("budget", [None, "32KiB"])
def test_dare_masks_are_drawn_once_and_change_no_byte(method, budget, configs, tmp_path, tmp_path_factory,
                                                      monkeypatch) -> None:
    """The CPU path keeps each DARE keep mask its L1 statistics pass draws for the merge pass (KeepMasks):
    with room for them every (expert, chunk) is drawn once, without room or with the masks off it is drawn
    again, and the bytes are those of the reference either way."""
    from fusemerge.kernels import dare_masks, philox
    from fusemerge.kernels import reference as ref_backend
    from fusemerge.streaming.executor import Executor

    draws: list[tuple[int, int, int]] = []
    real = philox.dare_keep_run

    def counted(key, start, n, density, device="cpu"):
        draws.append((key, start, n))
        return real(key, start, n, density, device)

    monkeypatch.setattr(dare_masks, "dare_keep_run", counted)
    monkeypatch.setattr(ref_backend, "dare_keep_run", counted)
    expect = reference(configs[method], tmp_path_factory)
    draws.clear()
    fusemerge.run(configs[method], tmp_path / "once", device="cpu", backend="torch", workers=1, max_memory=budget)
    assert merged_bytes(tmp_path / "once") == expect
    once = list(draws)
    assert once
    if budget is None:  # everything fits: one draw per (expert, chunk)
        assert len(set(once)) == len(once)
    draws.clear()
    monkeypatch.setattr(Executor, "keep_masks", lambda self, t: None)
    fusemerge.run(configs[method], tmp_path / "twice", device="cpu", backend="torch", workers=1, max_memory=budget)
    assert merged_bytes(tmp_path / "twice") == expect
    assert sorted(set(draws)) == sorted(set(once))
    assert all(draws.count(d) == 2 for d in set(draws))  # statistics pass, then merge pass
    if budget is None:
        assert len(draws) == 2 * len(once)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_masks_drawn_by_worker_processes_change_no_byte(method, configs, tmp_path, tmp_path_factory,
                                                             monkeypatch) -> None:
    """With mask worker processes (started for any size here, where the keep test is not compiled), the CPU
    merge writes the reference's bytes, and the workers drew masks."""
    from fusemerge.kernels import philox_native
    from fusemerge.kernels.dare_masks import MaskWorkers
    from fusemerge.streaming import executor

    started: list[MaskWorkers] = []

    class Recorded(MaskWorkers):
        def __init__(self, processes: int) -> None:
            super().__init__(processes)
            started.append(self)

    expect = reference(configs[method], tmp_path_factory)
    monkeypatch.setattr(philox_native, "_state", {"obj": None, "how": "numpy (test)"})
    monkeypatch.setattr(executor, "WORKER_MIN_DRAWS", 0)
    monkeypatch.setattr(executor, "MaskWorkers", Recorded)
    monkeypatch.setenv("FUSEMERGE_CPU_WORKERS", "threads")  # mask workers serve merge threads, not processes
    fusemerge.run(configs[method], tmp_path / "out", device="cpu", backend="torch", workers=2)
    assert merged_bytes(tmp_path / "out") == expect
    assert len(started) == 1 and started[0].served > 0 and started[0].failed == 0
    assert started[0].alive == 0  # closed at the end of the merge
