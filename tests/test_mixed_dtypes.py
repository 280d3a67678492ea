"""Models saved in different float dtypes (a bf16 base, an fp32 or fp16 fine-tune) merge as their float32 copies.

Every bf16 and fp16 value is a float32 value, so the merge of a mixed family must write the bytes of the merge of
the same family with every tensor upcast to float32 (the out dtype fixed, since by default it is the base's):
on every path that reads inputs (compiled CPU loops, torch operations, the Triton kernels through the
interpreter, the pipeline, resident and streamed tensors, one worker or two) and through `merge_tensors`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import fusemerge
from fusemerge.errors import InputError
from fusemerge.kernels import cpu_fused
from fusemerge.synthetic import make_llama_family, write_config_yaml
from tests.kernels.test_reference import PARAMS

SHAPE = dict(hidden=20, intermediate=52, layers=2, vocab=97)
METHODS = ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic", "dare_linear", "linear"]


def convert_model(model_dir: Path, dtype: torch.dtype) -> None:
    """Rewrite every float tensor of the model's shards in `dtype` (the config.json is left as it was)."""
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(shard))


def _family(root: Path) -> dict:
    return make_llama_family(root, n_experts=3, seed=33, shard_bytes=6000, **SHAPE)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict]:
    """"mixed": base bf16, expert_1 fp32, expert_2 fp16, expert_3 bf16; "f32": the same values, all fp32."""
    mixed = _family(tmp_path_factory.mktemp("mixed"))
    convert_model(mixed["experts"][0], torch.float32)
    convert_model(mixed["experts"][1], torch.float16)  # bf16 -> fp16 rounds some values: the fp16 ones are the data
    f32 = _family(tmp_path_factory.mktemp("f32"))
    for src, dst in zip([mixed["base"], *mixed["experts"]], [f32["base"], *f32["experts"]], strict=True):
        for shard in sorted(src.glob("*.safetensors")):
            save_file({k: v.float() for k, v in load_file(shard).items()}, str(dst / shard.name))
    return {"mixed": mixed, "f32": f32}


def _config(root: Path, fam: dict, method: str, name: str, **extra) -> Path:
    path = root / f"{name}-{method}.yml"
    base = fam["base"]
    models = fam["experts"] if method != "linear" else [fam["base"], *fam["experts"]]
    weight = (1.0, 0.7, 1.2) if method != "linear" else (1.0, 1.0, 0.7, 1.2)
    write_config_yaml(path, method, base, models, weight=weight, **PARAMS[method], **extra)
    return path


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


RUNS = {
    "compiled loops": dict(workers=1),
    "compiled loops, streamed, 2 workers": dict(workers=2, max_memory="96KiB"),
    "torch operations": dict(workers=1, native=False),
    "torch operations, streamed": dict(workers=1, max_memory="48KiB", native=False),
    "triton (interpreter)": dict(workers=1, backend="triton", max_memory="64KiB"),
}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("method", METHODS)
def test_a_mixed_family_merges_as_its_float32_copies(families, tmp_path, monkeypatch, method, run) -> None:
    opts = dict(RUNS[run])
    if not opts.pop("native", True):
        monkeypatch.setattr(cpu_fused, "available", lambda: False)
    if opts.get("backend") == "triton" and torch.cuda.is_available():
        pytest.skip("the Triton backend on device cpu needs the interpreter")
    outs = {}
    for name, fam in families.items():
        cfg = _config(tmp_path, fam, method, name, out_dtype="bfloat16")
        outs[name] = tmp_path / f"out-{name}"
        fusemerge.run(cfg, outs[name], device="cpu", **opts)
    assert _bytes(outs["mixed"]) == _bytes(outs["f32"])


def test_a_mixed_family_through_the_pipeline(families, tmp_path) -> None:
    from fusemerge.streaming.executor import Executor
    from fusemerge.streaming.writer import ShardedWriter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for method in ("ties", "task_arithmetic"):
        ref = tmp_path / f"ref-{method}"
        fusemerge.run(_config(tmp_path, families["f32"], method, "f32", out_dtype="bfloat16"), ref, device="cpu")
        # resident, then too large to keep (streamed twice); the Triton kernels (interpreted on CPU) once
        for budget, backend in ((None, "auto"), ("40KiB", "auto"), ("40KiB", "triton")):
            cfg = _config(tmp_path, families["mixed"], method, "mixed", out_dtype="bfloat16")
            plan = fusemerge.build_plan(cfg, device=device, backend=backend, max_memory=budget, workers=1,
                                        max_pinned_memory="64KiB")
            out = tmp_path / f"pipe-{method}-{budget}-{backend}"
            out.mkdir()
            ex = Executor(plan, None, pipeline=True, readers=2)
            with ShardedWriter(out, plan.layout) as writer:
                ex.writer = writer
                ex.run()
            assert _bytes(out) == _bytes(ref), (method, budget, backend)


def test_the_default_out_dtype_is_the_base_models(families, tmp_path) -> None:
    """An fp32 fine-tune of a bf16 base: written in bf16, as the base, the same bytes as an all-bf16 family
    (upcasting a bf16 expert to fp32 changes none of its values)."""
    bf16 = _family(tmp_path / "bf16")
    up = _family(tmp_path / "up")
    convert_model(up["experts"][0], torch.float32)
    outs = {}
    for name, fam in (("bf16", bf16), ("up", up)):
        outs[name] = tmp_path / f"out-{name}"
        fusemerge.run(_config(tmp_path, fam, "ties", name), outs[name], device="cpu")
    assert _bytes(outs["up"]) == _bytes(outs["bf16"])
    header = load_file(next(outs["up"].glob("*.safetensors")))
    assert {v.dtype for v in header.values()} == {torch.bfloat16}


def test_plan_says_which_tensors_are_mixed(families, tmp_path) -> None:
    plan = fusemerge.build_plan(_config(tmp_path, families["mixed"], "ties", "mixed"), device="cpu")
    notes = [w for w in plan.warnings if "different dtypes" in w]
    assert len(notes) == 1, plan.warnings
    assert "BF16, F16, F32" in notes[0] and "float32 copies" in notes[0] and "written as BF16" in notes[0]
    mixed = [t for t in plan.tensors if t.mixed_dtypes]
    assert mixed and notes[0].startswith(f"{len(mixed)} tensor(s)")
    # kept in memory as float32 copies: the compiled loops read one dtype
    t = mixed[0]
    assert plan.kept_bytes(t) == 4 * t.numel * (len(t.inputs) + 1)


def test_a_non_float_dtype_mismatch_is_still_refused(tmp_path) -> None:
    fam = _family(tmp_path / "f")
    shard = next(p for p in fam["experts"][0].glob("*.safetensors") if "model.norm.weight" in load_file(p))
    tensors = load_file(shard)
    name = "model.norm.weight"
    tensors[name] = tensors[name].to(torch.int16)
    save_file(tensors, str(shard))
    with pytest.raises(InputError) as e:
        fusemerge.build_plan(_config(tmp_path, fam, "ties", "f"), device="cpu")
    assert any(f"tensor '{name}': dtype mismatch" in p and "I16" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_merge_tensors_takes_copies_in_different_dtypes(method) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, generator=g).bfloat16()
    experts = [(base.float() + 0.05 * torch.randn(300, generator=g)).to(d)
               for d in (torch.float32, torch.float16, torch.bfloat16)]
    kw = dict(density=0.4) if method != "task_arithmetic" else {}
    mixed = fusemerge.merge_tensors(base, experts, method, seed=3, **kw)
    as_f32 = fusemerge.merge_tensors(base.float(), [e.float() for e in experts], method, seed=3,
                                     out_dtype=torch.bfloat16, **kw)
    assert mixed.dtype == torch.bfloat16  # the base's
    assert torch.equal(mixed.view(torch.int16), as_f32.view(torch.int16))


def test_slices_write_the_base_models_dtype_whichever_source_is_listed_first(families, tmp_path) -> None:
    fam = families["mixed"]
    base, fp32 = str(fam["base"]), str(fam["experts"][0])
    cfg = tmp_path / "s.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5},
                                   "slices": [{"sources": [{"model": fp32, "layer_range": [0, 2]},
                                                           {"model": base, "layer_range": [0, 2]}]}]}))
    plan = fusemerge.build_plan(cfg, device="cpu")
    assert {t.out_dtype for t in plan.tensors if not t.copy_only} == {"BF16"}


def test_merge_tensors_linear_with_a_base_writes_the_bases_dtype() -> None:
    base = torch.randn(50).bfloat16()
    out = fusemerge.merge_tensors(base, [base.float() + 0.1, (base.float() - 0.1).half()], "linear")
    assert out.dtype == torch.bfloat16
