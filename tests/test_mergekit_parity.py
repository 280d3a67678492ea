"""Parity with mergekit 0.1.5 itself, on tiny synthetic models (needs a mergekit venv; skipped without one).

mergekit is found through FUSEMERGE_MERGEKIT_PYTHON (the python of a venv with mergekit==0.1.5), else
mk-venv/bin/python in the repository (README.md makes it there).
All mergekit merges run in one subprocess (one import of mergekit and torch);
fusemerge runs in this process. Configs use `dtype: float32` + `out_dtype: bfloat16`, so both tools do
float32 math and round once (mergekit otherwise computes in the config dtype; a documented difference).

What must hold (issue 6, docs/mergekit.md):
- linear and task_arithmetic, with gradients, filters and lambda: every element within 1 bf16 ulp of
  mergekit's, except where the weighted sum cancels to far below its terms and the two tools' float32
  rounding (fused multiply-add vs multiply then add) shows (bench/parity.py `rounding`);
- ties, breadcrumbs and breadcrumbs_ties: every element more than 1 ulp apart sits at a trim-threshold tie;
- slerp, model_stock, karcher, and nuslerp and multislerp (with and without a base), of `models:` and of
  `slices:`, as linear (their weights from the angles between the tensors; mergekit finds those angles in
  float32, fusemerge exactly: bench/parity.py);
- nearswap (its float32 operations are mergekit's): byte-identical;
- ram and ramplus_tl (mergekit's float32 operations): byte-identical;
- sce: as linear without a selection; with one (select_topk < 1), as ties, its ties those of the variance;
- della and della_linear: at density 1 as ties (the election, the mean, the defaults); with a drop, the two tools'
  masks differ by design (as DARE's), but keep each rank of a row's deltas at the same rate;
- passthrough slices (layer stacking): byte-identical, and the same num_hidden_layers in config.json;
- the same holds for a family whose models were saved in different dtypes (bf16, fp32, fp16), and for one
  saved as PyTorch `.bin` checkpoints (one file, and shards with an index).

Run just these:

    FUSEMERGE_MERGEKIT_PYTHON=/path/to/mk-venv/bin/python python -m pytest -q tests/test_mergekit_parity.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import fusemerge
from bench.parity import compare_dirs
from fusemerge.synthetic import make_llama_family, save_as_bin
from tests.test_mixed_dtypes import convert_model

DEFAULT_MERGEKIT_PYTHON = Path(__file__).resolve().parents[1] / "mk-venv" / "bin" / "python"  # README.md
SHAPE = dict(hidden=64, intermediate=160, layers=4, vocab=96)
WEIGHTS = [0.6, [0.2, 0.9], [{"filter": "mlp", "value": 0.4}, {"value": 0.7}]]

_DRIVER = textwrap.dedent("""
    import sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
        source = open(config).read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out,
                  options=MergeOptions(quiet=True, random_seed=0), config_source=source)
""")


def _candidate() -> Path:
    env = os.environ.get("FUSEMERGE_MERGEKIT_PYTHON")
    return Path(env) if env else DEFAULT_MERGEKIT_PYTHON


def _mergekit_python() -> Path | None:
    return _candidate() if _candidate().is_file() else None


pytestmark = pytest.mark.skipif(
    _mergekit_python() is None,
    reason=f"mergekit not installed: {_candidate()} does not exist (set FUSEMERGE_MERGEKIT_PYTHON to the python of "
           f"a venv with mergekit==0.1.5; default {DEFAULT_MERGEKIT_PYTHON})",
)


def _models_config(method: str, fam: dict, **global_params) -> dict:
    models = []
    for i, expert in enumerate(fam["experts"]):
        params: dict = {"weight": WEIGHTS[i % len(WEIGHTS)]}
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
            params["density"] = [0.3, 0.5] if i == 0 else 0.4
        models.append({"model": str(expert), "parameters": params})
    cfg: dict = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":  # mergekit appends an unlisted base and then needs a weight for it: list it
        models.append({"model": str(fam["base"]), "parameters": {"weight": 0.5}})
    cfg["base_model"] = str(fam["base"])
    if global_params:
        cfg["parameters"] = global_params
    return cfg


def _configs(fam: dict, mixed: dict, bins: dict) -> dict[str, dict]:
    base, (e1, e2, e3) = str(fam["base"]), [str(e) for e in fam["experts"]]
    return {
        # pytorch_model.bin (base, expert 2) and pytorch_model-*-of-*.bin shards with their index (experts 1, 3)
        "ties_bin": _models_config("ties", bins),
        # a bf16 base with an fp32 and an fp16 fine-tune: mergekit casts every input to the config's float32,
        # fusemerge takes float32 deltas whatever the inputs' dtypes (tests/test_mixed_dtypes.py)
        "ties_mixed_dtypes": _models_config("ties", mixed),
        "task_arithmetic_mixed_dtypes": _models_config("task_arithmetic", mixed),
        "linear": _models_config("linear", fam),
        "task_arithmetic": _models_config("task_arithmetic", fam, **{"lambda": 0.8}),
        "ties": _models_config("ties", fam, **{"lambda": 0.9, "normalize": True}),
        "breadcrumbs": _models_config("breadcrumbs", fam, gamma=0.02),
        "breadcrumbs_ties": _models_config("breadcrumbs_ties", fam),
        # mergekit's L1 rescale of a trim: ties at the threshold keep the same |d| whichever wins, so the factor
        # matches but for float32 rounding (mergekit sums in float32, fusemerge exactly)
        "ties_rescale": _models_config("ties", fam, rescale=True),
        "breadcrumbs_rescale": _models_config("breadcrumbs", fam, gamma=0.02, rescale=True),
        # slerp of the base and one model: t by filter rules with gradients (mergekit's examples/gradient-slerp.yml)
        "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                  "models": [{"model": base}, {"model": e1}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "slerp_slices": {"merge_method": "slerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                         "slices": [
                             {"sources": [{"model": base, "layer_range": [0, 2]},
                                          {"model": e2, "layer_range": [2, 4]}], "parameters": {"t": [0.2, 0.9]}},
                             {"sources": [{"model": base, "layer_range": [1, 4]},
                                          {"model": e3, "layer_range": [1, 4]}]}],
                         "parameters": {"t": 0.35}},
        # model_stock of the base and three models, and over slices (the base listed second in one)
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                        "out_dtype": "bfloat16", "models": [{"model": base}, {"model": e1}, {"model": e2},
                                                            {"model": e3}], "parameters": {"filter_wise": False}},
        # nuslerp with one arc per row, with a base and without
        "nuslerp_rows": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                         "models": [{"model": e1, "parameters": {"weight": 0.4}},
                                    {"model": e2, "parameters": {"weight": 1.1}}],
                         "parameters": {"nuslerp_flatten": False}},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "dtype": "float32", "out_dtype": "bfloat16",
                                 "models": [{"model": e1, "parameters": {"weight": 0.7}},
                                            {"model": e3, "parameters": {"weight": 0.5}}],
                                 "parameters": {"nuslerp_flatten": False}},
        "nuslerp_cols": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                         "models": [{"model": e2, "parameters": {"weight": 0.6}},
                                    {"model": e3, "parameters": {"weight": 0.9}}],
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                                    "out_dtype": "bfloat16", "models": [{"model": base}, {"model": e1},
                                                                        {"model": e2}, {"model": e3}],
                                    "parameters": {"filter_wise": True}},
        "model_stock_slices": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                               "out_dtype": "bfloat16", "slices": [
                                   {"sources": [{"model": base, "layer_range": [0, 2]},
                                                {"model": e1, "layer_range": [0, 2]},
                                                {"model": e2, "layer_range": [2, 4]}]},
                                   {"sources": [{"model": e3, "layer_range": [2, 4]},
                                                {"model": base, "layer_range": [2, 4]},
                                                {"model": e1, "layer_range": [2, 4]}]}]},
        # nuslerp of two task vectors (a base), with a gradient weight; of two models (no base); and over slices
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                    "models": [{"model": e1, "parameters": {"weight": [0.2, 0.9]}},
                               {"model": e2, "parameters": {"weight": 0.6}}]},
        "nuslerp_no_base": {"merge_method": "nuslerp", "dtype": "float32", "out_dtype": "bfloat16",
                            "models": [{"model": e3, "parameters": {"weight": 1.0}},
                                       {"model": e1, "parameters": {"weight": [
                                           {"filter": "mlp", "value": 3.0}, {"value": 0.5}]}}]},
        "nuslerp_slices": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
                           "out_dtype": "bfloat16", "slices": [
                               {"sources": [{"model": base, "layer_range": [0, 2]},
                                            {"model": e1, "layer_range": [0, 2], "parameters": {"weight": 2.0}},
                                            {"model": e2, "layer_range": [2, 4], "parameters": {"weight": 1.0}}]},
                               {"sources": [{"model": e3, "layer_range": [2, 4], "parameters": {"weight": 1.0}},
                                            {"model": base, "layer_range": [2, 4]},
                                            {"model": e1, "layer_range": [2, 4], "parameters": {"weight": 1.0}}]}]},
        # karcher of three models and the unlisted base (mergekit averages it in), max_iter by filter rules; and of
        # two models with no base over slices
        "karcher": {"merge_method": "karcher", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                    "models": [{"model": e1}, {"model": e2}, {"model": e3}],
                    "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 10}], "tol": 1e-6}},
        "karcher_slices": {"merge_method": "karcher", "dtype": "float32", "out_dtype": "bfloat16", "slices": [
            {"sources": [{"model": e1, "layer_range": [0, 2]}, {"model": e2, "layer_range": [2, 4]}]},
            {"sources": [{"model": e3, "layer_range": [1, 4]}, {"model": base, "layer_range": [1, 4]}]}]},
        # multislerp of three task vectors (a base), weights a gradient and rules; of three models (no base, weights
        # not normalized, another eps); and over slices
        "multislerp": {"merge_method": "multislerp", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                       "models": [{"model": e1, "parameters": {"weight": 1.0}},
                                  {"model": e2, "parameters": {"weight": [0.2, 2.0]}},
                                  {"model": e3, "parameters": {"weight": [{"filter": "mlp", "value": 0.3},
                                                                          {"value": 0.8}]}}]},
        "multislerp_no_base": {"merge_method": "multislerp", "dtype": "float32", "out_dtype": "bfloat16",
                               "models": [{"model": e3, "parameters": {"weight": 0.3}},
                                          {"model": e1, "parameters": {"weight": 0.4}},
                                          {"model": base, "parameters": {"weight": 0.2}}],
                               "parameters": {"normalize_weights": False, "eps": 1e-6}},
        "multislerp_slices": {"merge_method": "multislerp", "base_model": base, "dtype": "float32",
                              "out_dtype": "bfloat16", "slices": [
                                  {"sources": [{"model": base, "layer_range": [0, 2]},
                                               {"model": e1, "layer_range": [0, 2], "parameters": {"weight": 2.0}},
                                               {"model": e2, "layer_range": [2, 4], "parameters": {"weight": 1.0}},
                                               {"model": e3, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]},
                                  {"sources": [{"model": e3, "layer_range": [2, 4], "parameters": {"weight": 1.0}},
                                               {"model": base, "layer_range": [2, 4]}]}]},
        # nearswap of the base and one model, t a gradient; and t from filter rules
        "nearswap": {"merge_method": "nearswap", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                     "models": [{"model": base}, {"model": e1}], "parameters": {"t": [0.0005, 0.004]}},
        "nearswap_rules": {"merge_method": "nearswap", "base_model": base, "dtype": "float32",
                           "out_dtype": "bfloat16", "models": [{"model": e2}, {"model": base}],
                           "parameters": {"t": [{"filter": "mlp", "value": 0.003}, {"value": 0.0008}]}},
        # della and della_linear at density 1 (nothing dropped, so comparable element by element: the sign
        # election, the disjoint mean and the defaults of normalize and rescale), epsilon given per model
        "della_dense": {"merge_method": "della", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                        "models": [{"model": e1, "parameters": {"weight": 0.6, "epsilon": 0.3}},
                                   {"model": e2, "parameters": {"weight": [0.2, 0.9]}},
                                   {"model": e3, "parameters": {"weight": 1.0}}],
                        "parameters": {"density": 1.0, "epsilon": 0.1}},
        "della_linear_dense": {"merge_method": "della_linear", "base_model": base, "dtype": "float32",
                               "out_dtype": "bfloat16", "models": [{"model": e1, "parameters": {"weight": 0.6}},
                                                                   {"model": e2, "parameters": {"weight": 1.4}}],
                               "parameters": {"density": 1.0, "lambda": 0.8}},
        # one model's drop, unrescaled: where the output is not the base is what each tool kept (the masks differ
        # by design; their keep rates by rank must not)
        "della_linear_drop": {"merge_method": "della_linear", "base_model": base, "dtype": "float32",
                              "out_dtype": "bfloat16", "models": [{"model": e1, "parameters": {"weight": 1.0}}],
                              "parameters": {"density": 0.4, "epsilon": 0.3, "rescale": False}},
        # sce: every entry (its weights from the deltas, then the election and the weighted disjoint mean), and a
        # selection by filter rules (the entries of most variance; bf16 models tie there often)
        "sce": {"merge_method": "sce", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                "models": [{"model": e1}, {"model": e2}, {"model": e3}]},
        "sce_select": {"merge_method": "sce", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                       "models": [{"model": e1}, {"model": e2}, {"model": e3}],
                       "parameters": {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}},
        "sce_slices": {"merge_method": "sce", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                       "slices": [
                           {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": e1, "layer_range": [2, 4]},
                                        {"model": e3, "layer_range": [0, 2]}], "parameters": {"select_topk": 0.4}},
                           {"sources": [{"model": base, "layer_range": [3, 4]}, {"model": e2, "layer_range": [0, 1]},
                                        {"model": e3, "layer_range": [3, 4]}]}],
                       "parameters": {"select_topk": 0.8}},
        # ram and ramplus_tl: epsilon around the synthetic experts' median |delta|, so entries are changed by none,
        # one or several experts; by filter rules for ram
        "ram": {"merge_method": "ram", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                "models": [{"model": e1}, {"model": e2}, {"model": e3}],
                "parameters": {"epsilon": [{"filter": "mlp", "value": 0.0015}, {"value": 0.001}]}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                       "models": [{"model": e1}, {"model": e2}, {"model": e3}],
                       "parameters": {"epsilon": 0.0012, "r": 0.4, "alpha": 0.5}},
        "passthrough": {"merge_method": "passthrough", "base_model": base, "dtype": "bfloat16", "slices": [
            {"sources": [{"model": e1, "layer_range": [0, 3]}]},
            {"sources": [{"model": e2, "layer_range": [1, 4]}]},
            {"sources": [{"model": base, "layer_range": [2, 3]}]}]},
        "ties_slices": {"merge_method": "ties", "base_model": base, "dtype": "float32", "out_dtype": "bfloat16",
                        "slices": [
                            {"sources": [{"model": base, "layer_range": [0, 2]},
                                         {"model": e1, "layer_range": [2, 4], "parameters": {"density": 0.3}},
                                         {"model": e3, "layer_range": [0, 2], "parameters": {"weight": [0.3, 1]}}],
                             "parameters": {"density": 0.5}},
                            {"sources": [{"model": base, "layer_range": [3, 4]},
                                         {"model": e1, "layer_range": [0, 1]},
                                         {"model": e3, "layer_range": [3, 4]}]}],
                        "parameters": {"weight": 0.7, "density": 0.4}},
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """{name: (config, fusemerge output, mergekit output)} for every config of `_configs`."""
    root = tmp_path_factory.mktemp("parity")
    fam = make_llama_family(root / "models", n_experts=3, seed=11, **SHAPE)
    mixed = make_llama_family(root / "mixed", n_experts=3, seed=12, **SHAPE)
    convert_model(mixed["experts"][0], torch.float32)
    convert_model(mixed["experts"][1], torch.float16)
    bins = make_llama_family(root / "bins", n_experts=3, seed=13, shard_bytes=40_000,
                             expert_shard_bytes=[40_000, None, 60_000], **SHAPE)
    for model, how in zip([bins["base"], *bins["experts"]], ["single", "index", "single", "index"], strict=True):
        save_as_bin(model, how)
    out: dict[str, tuple[Path, Path, Path]] = {}
    argv = []
    for name, cfg in _configs(fam, mixed, bins).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[name] = (path, root / f"fm-{name}", root / f"mk-{name}")
        argv += [str(path), str(root / f"mk-{name}")]
        fusemerge.run(path, root / f"fm-{name}", device="cpu")
    proc = subprocess.run([str(_mergekit_python()), "-c", _DRIVER, *argv], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "task_arithmetic_mixed_dtypes", "slerp",
                                  "slerp_slices", "model_stock", "model_stock_filter_wise", "model_stock_slices",
                                  "nuslerp", "nuslerp_no_base", "nuslerp_slices", "nuslerp_rows",
                                  "nuslerp_rows_no_base", "nuslerp_cols", "karcher", "karcher_slices",
                                  "multislerp", "multislerp_no_base", "multislerp_slices", "sce"])
def test_weighted_sums_within_one_ulp(merged: dict, name: str) -> None:
    config, fm, mk = merged[name]
    par = compare_dirs(fm, mk, config)
    assert not par.problems, par.problems
    assert par.elements > 0 and par.differ == par.rounding and par.unexplained == 0, par.summary()
    assert par.rounding <= par.elements * 1e-4, par.summary()  # cancellation is rare


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties", "ties_slices", "ties_rescale",
                                  "breadcrumbs_rescale", "ties_mixed_dtypes", "ties_bin", "della_dense",
                                  "della_linear_dense", "sce_select", "sce_slices"])
def test_trimming_methods_differ_only_at_threshold_ties(merged: dict, name: str) -> None:
    config, fm, mk = merged[name]
    par = compare_dirs(fm, mk, config)
    assert not par.problems, par.problems
    assert par.unexplained == 0 and par.differ == par.tie + par.rounding, par.summary()


def test_della_keeps_deltas_at_mergekits_rates_by_rank(merged: dict) -> None:
    """mergekit's della_magprune and fusemerge's drop (different random streams) keep each row's deltas at the same
    rates by rank: over each 2-D tensor's rows, the kept fraction of each fifth of the ranks (by |delta|) agrees
    between the tools within 5 binomial sigmas, rises from the smallest fifth to the largest, and is near
    density - 0.8 epsilon and density + 0.8 epsilon at the two ends."""
    from tests.test_merge_e2e import load_model

    config, fm, mk = merged["della_linear_drop"]
    cfg = yaml.safe_load(config.read_text())
    base, expert = load_model(Path(cfg["base_model"])), load_model(Path(cfg["models"][0]["model"]))
    outs = [load_model(fm), load_model(mk)]
    kept = torch.zeros(2, 5)
    total = torch.zeros(5)
    for name, b in base.items():
        if b.dim() != 2 or b.shape[1] < 50:
            continue
        d = expert[name].float() - b.float()
        rank = d.abs().argsort(dim=1, stable=True).argsort(dim=1)
        fifth = (rank * 5) // b.shape[1]
        live = d != 0  # a zero delta leaves the base either way
        for k, out in enumerate(outs):
            keep = (out[name] != b) & live
            kept[k] += torch.bincount(fifth[keep], minlength=5).float()
        total += torch.bincount(fifth[live], minlength=5).float()
    rates = kept / total
    sigma = (rates.mean(0) * (1 - rates.mean(0)) / total).sqrt()
    assert bool(((rates[0] - rates[1]).abs() <= 5 * sigma * 2**0.5).all()), rates
    for r in rates:
        assert bool((r[1:] > r[:-1]).all()), rates
        assert abs(float(r[0]) - (0.4 - 0.8 * 0.3)) < 0.03 and abs(float(r[-1]) - (0.4 + 0.8 * 0.3)) < 0.03, rates


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_is_byte_identical(merged: dict, name: str) -> None:
    """mergekit's float32 operations, in its order (RAM+'s scales from the same counts): the same bytes."""
    config, fm, mk = merged[name]
    par = compare_dirs(fm, mk, config)
    assert par.identical_bytes and par.elements > 0, par.summary()


@pytest.mark.parametrize("name", ["nearswap", "nearswap_rules"])
def test_nearswap_is_byte_identical(merged: dict, name: str) -> None:
    """The same float32 operations as mergekit's (its `t / x` is a reciprocal, then a product): the same bytes."""
    config, fm, mk = merged[name]
    par = compare_dirs(fm, mk, config)
    assert par.identical_bytes and par.elements > 0, par.summary()
    from tests.test_merge_e2e import load_model

    cfg = yaml.safe_load(config.read_text())
    out, base = load_model(fm), load_model(Path(cfg["base_model"]))
    other = load_model(Path(next(m["model"] for m in cfg["models"] if m["model"] != cfg["base_model"])))
    mixed = sum(int(((out[k] != base[k]) & (out[k] != other[k])).sum()) for k in out)
    assert mixed > par.elements // 100  # t mixes entries, not only swaps or keeps them


def test_passthrough_slices_are_byte_identical(merged: dict) -> None:
    config, fm, mk = merged["passthrough"]
    par = compare_dirs(fm, mk, config)
    assert par.identical_bytes and par.elements > 0, par.summary()
    layers = [json.loads((d / "config.json").read_text())["num_hidden_layers"] for d in (fm, mk)]
    assert layers == [7, 7]


def test_mergekit_is_0_1_5() -> None:
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    out = subprocess.run([str(_mergekit_python()), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.5", f"parity is pinned to mergekit 0.1.5, found {out.stdout.strip()}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
