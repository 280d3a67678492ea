"""NaN / Inf in an input stops the merge by default, naming the tensor and the model; --allow-nonfinite merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import fusemerge
from fusemerge.cli import main
from fusemerge.errors import InputError
from fusemerge.synthetic import make_llama_family, write_config_yaml

SHAPE = dict(hidden=24, intermediate=40, layers=2, vocab=67)
TENSOR = "model.layers.1.mlp.up_proj.weight"


def poison(model_dir: Path, name: str, values: list[float]) -> None:
    """Write NaN / Inf into the first entries of tensor `name` of the (single-file) model."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    flat = tensors[name].view(-1)
    for k, v in enumerate(values):
        flat[7 * k + 3] = v
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture
def fam(tmp_path) -> dict:
    fam = make_llama_family(tmp_path / "family", n_experts=3, seed=5, **SHAPE)
    poison(fam["experts"][1], TENSOR, [float("nan"), float("inf"), float("nan")])
    return fam


@pytest.mark.parametrize("method", ["ties", "dare_linear", "linear"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_stops_the_merge_naming_tensor_and_model(tmp_path, fam, method, backend) -> None:
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("Triton on CPU needs the interpreter, off on a GPU machine (the pipeline tests cover CUDA)")
    cfg = tmp_path / "c.yml"
    params = {"density": 0.5} if method != "linear" else {}
    write_config_yaml(cfg, method, fam["base"], fam["experts"], weight=(1.0, 0.5, 0.5), **params)
    with pytest.raises(InputError) as err:
        fusemerge.run(cfg, tmp_path / "out", device="cpu", backend=backend)
    (line,) = err.value.problems
    assert TENSOR in line and f"3 in {fam['experts'][1]}" in line and "allow_nonfinite=True" in line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind

    result = fusemerge.run(cfg, tmp_path / "out", device="cpu", backend=backend, allow_nonfinite=True)
    (note,) = result.nonfinite
    assert TENSOR in note and "3 in" in note
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.isfinite(merged["model.embed_tokens.weight"].float()).all()


def test_nan_in_the_base_is_reported_as_the_base(tmp_path) -> None:
    fam = make_llama_family(tmp_path / "family", n_experts=2, seed=6, **SHAPE)
    poison(fam["base"], "model.norm.weight", [float("-inf")])
    cfg = tmp_path / "c.yml"
    write_config_yaml(cfg, "task_arithmetic", fam["base"], fam["experts"])
    with pytest.raises(InputError, match=r"model\.norm\.weight: NaN/Inf values in the inputs \(1 in .*base"):
        fusemerge.run(cfg, tmp_path / "out", device="cpu")


@pytest.mark.parametrize("method", ["passthrough", "ties"])
def test_nan_in_a_slice_source_names_that_sources_file(tmp_path, fam, method) -> None:
    """A slice's tensors have only its sources as inputs: the counts name those (they stopped the merge with an
    internal error when they were paired with the config's models)."""
    params = {"scale": 2.0} if method == "passthrough" else {"weight": 1.0, "density": 0.5}
    base = {"base_model": str(fam["base"])} if method != "passthrough" else {}
    layer = [{"model": str(fam["experts"][1]), "layer_range": [1, 2], "parameters": params}]
    if method != "passthrough":
        layer.append({"model": str(fam["base"]), "layer_range": [1, 2]})
    slices = [{"sources": [{"model": str(fam["experts"][0]), "layer_range": [0, 1], "parameters": params}]
               + ([{"model": str(fam["base"]), "layer_range": [0, 1]}] if method != "passthrough" else [])},
              {"sources": layer}]
    config = {"merge_method": method, **base, "slices": slices}
    with pytest.raises(InputError) as err:
        fusemerge.run(config, tmp_path / "out", device="cpu")
    (line,) = err.value.problems
    assert line.startswith(f"{TENSOR}: NaN/Inf values in the inputs (3 in {fam['experts'][1]}/model.safetensors)"), line


def test_cli_exit_codes(tmp_path, fam) -> None:
    cfg = tmp_path / "c.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.5)
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "--device", "cpu", "-q"])
    assert res.exit_code == 2, res.output
    assert f"error: {TENSOR}: NaN/Inf values" in res.output and res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "--device", "cpu", "-q",
                                    "--allow-nonfinite"])
    assert res.exit_code == 0, res.output
    assert f"warning: {TENSOR}: NaN/Inf" in res.output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
def test_a_nan_is_written_as_one_bit_pattern_by_every_backend(method, dtype) -> None:
    """--allow-nonfinite merges are the same bytes on every backend and device: every NaN the merge writes is
    the dtype's positive quiet NaN (torch's CPU conversions gave 0xFFFF / 0xFE00 / 0xFFC00000 here). The Triton
    kernels run on the GPU where there is one (the interpreter otherwise), the torch backend on CPU."""
    from fusemerge.kernels.reference import CANONICAL_NAN

    triton_device = "cuda" if torch.cuda.is_available() else "cpu"

    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, generator=g).to(dtype)
    experts = [(base.float() + 0.1 * torch.randn(300, generator=g)).to(dtype) for _ in range(3)]
    experts[1][[5, 77, 299]] = float("nan")
    experts[2][[5, 100]] = float("inf")
    experts[0][100] = float("-inf")  # inf - inf: a NaN the merge makes itself
    int_dtype, bits = CANONICAL_NAN[dtype]
    outs = []
    for backend, device in (("torch", "cpu"), ("triton", triton_device)):
        out = fusemerge.merge_tensors(None if method == "linear" else base.to(device), [e.to(device) for e in experts],
                                      method, backend=backend,
                                      **({"density": 0.5} if method in ("ties", "dare_ties") else {})).cpu()
        nan = torch.isnan(out.float())
        assert nan.any() == (method in ("task_arithmetic", "linear"))  # TIES elects no sign a NaN agrees with
        assert (out.view(int_dtype)[nan] == bits).all(), (backend, out.view(int_dtype)[nan])
        outs.append(out.view(int_dtype))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF])
def test_a_nan_at_the_threshold_is_kept_by_every_backend(bits: int) -> None:
    """|d| of the NaNs GPUs write (0x7FFFFFFF) is EMPTY_T's bit pattern: as the k-th largest it is still kept
    (index cut > 0), and as breadcrumbs' top outlier still dropped, by the torch, compiled and Triton paths."""
    from fusemerge import merge_tensors

    nan = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]
    base = torch.zeros(10)
    e0 = torch.arange(10, dtype=torch.float32) * 0.1 + 0.1
    e0[0] = nan
    e1 = torch.full((10,), 0.5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU tensors would need the interpreter
    if dev == "cuda":
        base, e0, e1 = base.to(dev), e0.to(dev), e1.to(dev)
    ties = {b: merge_tensors(base, [e0, e1], "ties", density=0.1, backend=b).cpu() for b in ("torch", "triton")}
    # k = 1: each expert keeps its entry 0; the NaN makes the election -1, with which neither agrees
    assert ties["torch"][0] == 0.0 and torch.equal(ties["torch"], ties["triton"]), ties
    crumbs = {b: merge_tensors(base, [e0], "breadcrumbs", density=0.5, gamma=0.1, backend=b).cpu()
              for b in ("torch", "triton")}
    assert crumbs["torch"][0] == 0.0, crumbs  # the NaN is the one outlier dropped
    assert torch.equal(crumbs["torch"].view(torch.int32), crumbs["triton"].view(torch.int32)), crumbs


@pytest.mark.parametrize("where", [5, 40])
def test_a_nan_delta_gives_dare_the_factor_1_whatever_the_chunking(where: int) -> None:
    """The L1 rescale of an expert with a NaN delta is 1 (no finite ratio), in one chunk or two, on both backends:
    the chunk maxima once lost a NaN that came after a finite one, and the factor came out of a NaN's bits."""
    from fusemerge import merge_tensors

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU tensors would need the interpreter
    base = torch.zeros(64, device=dev)
    e = torch.linspace(0.01, 0.64, 64, device=dev)
    e[where] = float("nan")
    outs = [merge_tensors(base, [e], "dare_linear", density=0.5, seed=0, name="w", backend=b, chunk=c).cpu()
            for b in ("torch", "triton") for c in (64, 32)]
    unscaled = merge_tensors(base, [e], "dare_linear", density=0.5, seed=0, name="w", rescale=False).cpu()
    for out in outs:
        assert torch.equal(out.view(torch.int32), unscaled.view(torch.int32)), (out[:4], unscaled[:4])
