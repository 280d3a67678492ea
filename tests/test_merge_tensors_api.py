"""merge_tensors checks its inputs and parameters as the files path checks a config and its models: the same
problems raise InputError (one line each), the same values mean the same merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fusemerge
from fusemerge.errors import InputError
from fusemerge.kernels.params import MAX_EXPERTS
from fusemerge.synthetic import write_config_yaml


@pytest.fixture
def tensors() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(257, generator=g)
    return base, [base + 0.1 * torch.randn(257, generator=g) for _ in range(3)]


BAD_PARAMS = [
    ("dare_linear", dict(density=0.2, rescale=2), "rescale: must be true, false or 'inverse', not 2"),
    ("dare_linear", dict(density=0.2, rescale="true"), "rescale: must be true, false or 'inverse'"),
    ("task_arithmetic", dict(normalize="false"), "normalize: must be true or false, not the string 'false'"),
    ("ties", dict(weight="0.5"), "weight: must be a number, not the string '0.5'"),
    ("ties", dict(density=[0.5, "0.5", 0.5]), "density[1]: must be a number, not the string '0.5'"),
    ("ties", dict(density=1.5), "density: 1.5 is outside (0, 1]"),
    ("ties", dict(weight=float("nan")), "weight: must be a finite number, not nan"),
    ("ties", dict(weight=[1, 2]), "weight: 2 values for 3 experts"),
    ("breadcrumbs", dict(gamma=-0.1), "gamma: -0.1 is outside [0, 1]"),
    ("task_arithmetic", dict(weight=[1, -1, 0], normalize=True), "the weights add up to 0 and normalize is true"),
    ("linear", dict(lambda_=0.5), "lambda: unknown parameter for linear"),
    ("tie", {}, "method: unknown method 'tie' (did you mean 'ties'?)"),
]


@pytest.mark.parametrize("method,params,needle", BAD_PARAMS)
def test_a_parameter_the_files_path_refuses_is_refused(tensors, method, params, needle) -> None:
    base, experts = tensors
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(None if method == "linear" else base, experts, method, **params)
    assert any(needle in line for line in e.value.problems), e.value.problems
    assert all(line.startswith("merge_tensors: ") for line in e.value.problems), e.value.problems


def test_every_problem_at_once(tensors) -> None:
    base, experts = tensors
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(base, experts, "ties", weight="1", density=2.0, normalize="yes")
    assert len(e.value.problems) == 3, e.value.problems


@pytest.mark.parametrize("how,needle", [
    ("numpy", "experts[0]: expected a torch.Tensor, not ndarray"),
    ("int64", "base: dtype torch.int64; merged tensors are float32, float16 or bfloat16"),
    ("shape", "experts[2]: shape [256] differs from base's [257]"),
    ("chunk", "chunk: 0; expected a positive number of elements"),
    ("out_dtype", "out_dtype: torch.int32; expected torch.float32, torch.float16 or torch.bfloat16"),
    ("not a list", "experts: expected a list of tensors"),
    ("gradient lambda", "lambda: [0.5, 1.0]; expected one value for the whole merge"),
    ("nested", "density: [[0.2, 0.5], 0.5, 0.5]; expected one number per expert"),
    ("seed", "seed: 0.0; expected an integer"),
])
def test_inputs_the_files_path_refuses_are_refused(tensors, how, needle) -> None:
    base, experts = tensors
    kw = {}
    if how == "numpy":
        experts = [experts[0].numpy(), *experts[1:]]
    elif how == "int64":
        base, experts = base.long(), [e.long() for e in experts]
    elif how == "shape":
        experts = [*experts[:2], experts[2][:256]]
    elif how == "chunk":
        kw = dict(chunk=0)
    elif how == "out_dtype":
        kw = dict(out_dtype=torch.int32)
    elif how == "not a list":
        experts = 3
    elif how == "gradient lambda":
        kw = dict(lambda_=[0.5, 1.0])
    elif how == "nested":
        kw = dict(density=[[0.2, 0.5], 0.5, 0.5])
    elif how == "seed":
        kw = dict(seed=0.0)
    kw = {"density": 0.5, **kw}
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(base, experts, "ties", **kw)
    assert any(needle in line for line in e.value.problems), e.value.problems


def test_numbers_of_any_spelling_are_the_same_number(tensors) -> None:
    base, experts = tensors
    want = fusemerge.merge_tensors(base, experts, "ties", weight=0.5, density=[0.25, 0.5, 0.75])
    for weight, density in ((np.float32(0.5), np.array([0.25, 0.5, 0.75])), (torch.tensor(0.5), (0.25, 0.5, 0.75)),
                            (0.5, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))):
        got = fusemerge.merge_tensors(base, experts, "ties", weight=weight, density=density)
        assert torch.equal(got, want)
    bf = fusemerge.merge_tensors(base, experts, "ties", weight=0.5, density=[0.25, 0.5, 0.75], out_dtype="bfloat16")
    assert torch.equal(bf, fusemerge.merge_tensors(base, experts, "ties", weight=0.5, density=[0.25, 0.5, 0.75],
                                                   out_dtype=torch.bfloat16))


def test_unset_parameters_take_the_methods_defaults(tensors) -> None:
    base, experts = tensors
    explicit = fusemerge.merge_tensors(base, experts, "dare_ties", weight=1.0, density=1.0, normalize=False,
                                       rescale=True, lambda_=1.0, seed=0)
    assert torch.equal(fusemerge.merge_tensors(base, experts, "dare_ties"), explicit)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear"])
def test_the_base_listed_as_an_expert_is_the_base_listed_under_models(tensors, tmp_path, method) -> None:
    """merge_tensors(b, [b, e1, e2]) is the config that lists base_model under models: too (not an expert; for
    linear averaged once, with its listed weight), byte for byte the files path."""
    base, experts = tensors
    weights = [0.3, 0.7, 1.2]
    params = dict(density=0.5) if method in ("ties", "dare_linear") else {}
    got = fusemerge.merge_tensors(base, [base, *experts[:2]], method, weight=weights, name="w", **params)
    dirs = []
    for i, t in enumerate([base, *experts[:2]]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": t.contiguous()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
        dirs.append(d)
    cfg = write_config_yaml(tmp_path / "c.yml", method, dirs[0], dirs, weight=tuple(weights), **params)
    if method == "linear":  # write_config_yaml leaves the base out for linear; list it as the config does
        cfg["base_model"] = str(dirs[0])
        (tmp_path / "c.yml").write_text(json.dumps(cfg))
    fusemerge.run(tmp_path / "c.yml", tmp_path / "out", device="cpu")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], got)
    if method != "linear":  # the base listed is not an expert: its weight is dropped
        alone = fusemerge.merge_tensors(base, experts[:2], method, weight=weights[1:], name="w", **params)
        assert torch.equal(alone, got)


def test_more_experts_than_the_triton_kernels_take(tensors) -> None:
    base, experts = tensors
    many = [experts[i % 3] for i in range(MAX_EXPERTS + 1)]
    with pytest.raises(InputError, match=f"{MAX_EXPERTS + 1} experts; the Triton kernels merge at most"):
        fusemerge.merge_tensors(base, many, "task_arithmetic", backend="triton")
    assert fusemerge.merge_tensors(base, many, "task_arithmetic", backend="torch").shape == base.shape


def test_the_files_path_refuses_triton_for_more_experts_than_it_takes(tmp_path) -> None:
    dirs = []
    for i in range(MAX_EXPERTS + 2):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": torch.full((3,), float(i))}, str(d / "model.safetensors"))
        dirs.append(d)
    write_config_yaml(tmp_path / "c.yml", "task_arithmetic", dirs[0], dirs[1:])
    with pytest.raises(InputError) as e:
        fusemerge.build_plan(tmp_path / "c.yml", device="cpu", backend="triton")
    assert e.value.problems == [f"backend='triton': {MAX_EXPERTS + 1} models per tensor, more than the Triton "
                                f"kernels take ({MAX_EXPERTS}); backend='torch' merges any number"]
    assert fusemerge.build_plan(tmp_path / "c.yml", device="cpu").backend == "torch"


def test_python_spellings_of_the_same_call_give_the_same_merge(tensors) -> None:
    """normalize / rescale as 0 / 1, numpy integers, a generator or a stacked tensor of experts: the same merge as
    the plain spelling (these all worked before the parameters were validated)."""
    base, experts = tensors
    want = fusemerge.merge_tensors(base, experts, "ties", density=0.5, normalize=True, chunk=100)
    for experts_as in ((e for e in experts), torch.stack(experts)):
        got = fusemerge.merge_tensors(base, experts_as, "ties", density=0.5, normalize=1, chunk=np.int64(100))
        assert torch.equal(got, want)
    assert torch.equal(fusemerge.merge_tensors(base, experts, "dare_linear", density=0.5, rescale=0),
                       fusemerge.merge_tensors(base, experts, "dare_linear", density=0.5, rescale=False))


def test_messages_use_merge_tensors_names(tensors) -> None:
    _, experts = tensors
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(None, experts, "ties", density=0.5)
    (line,) = e.value.problems
    assert "base_model" not in line and "a base tensor" in line, line


def test_lambda_twice_is_refused_and_config_spellings_are_accepted(tensors) -> None:
    base, experts = tensors
    with pytest.raises(InputError, match="lambda given twice"):
        fusemerge.merge_tensors(base, experts, "task_arithmetic", lambda_=0.5, **{"lambda": 2.0})
    want = fusemerge.merge_tensors(base, experts, "dare_ties", density=0.5, seed=3, out_dtype=torch.bfloat16)
    for spelling in ("bf16", "torch.bfloat16", "BFloat16"):
        got = fusemerge.merge_tensors(base, experts, "dare_ties", density=0.5, seed=torch.tensor(3),
                                      out_dtype=spelling)
        assert torch.equal(got, want)


def test_an_unknown_keyword_is_named_with_the_nearest_known_one() -> None:
    """As a config's unknown parameter is (`densty: unknown parameter for ties (did you mean 'density'?)`); it said
    "unknown parameter(s) for merge_tensors: densty" (a new user's walk-through)."""
    b = torch.zeros(8)
    with pytest.raises(InputError) as e:
        fusemerge.merge_tensors(b, [b + 1], "ties", densty=0.5, sead=1)
    assert e.value.problems[0].startswith("merge_tensors: densty: unknown parameter (did you mean 'density'?); "
                                          "it takes weight, density, gamma")
    assert e.value.problems[1].startswith("merge_tensors: sead: unknown parameter (did you mean 'seed'?)")
    with pytest.raises(InputError, match=r"^merge_tensors: experts: at least one tensor"):
        fusemerge.merge_tensors(b, [], "ties")
