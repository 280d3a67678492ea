"""`fusemerge demo`: build a tiny base model and three experts, merge them, check and summarise.

Everything is generated locally (nothing is downloaded). The merged file is checked against an
in-memory merge of the same tensors (`merge_tensors`), which must agree byte for byte.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from fusemerge.errors import FusemergeError, InputError
from fusemerge.merge import run
from fusemerge.sizes import format_size
from fusemerge.synthetic import make_llama_family, write_config_yaml
from fusemerge.tensor_merge import merge_tensors

MARKER = ".fusemerge-demo"
SHAPE = dict(hidden=256, intermediate=688, layers=4, vocab=2048)
METHOD_PARAMS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.3, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.3, "gamma": 0.01},
}


def run_demo(out_dir: Path, method: str = "ties", device: str = "auto", echo: Callable[[str], None] = print) -> Path:
    """Make inputs in OUT_DIR/inputs, merge into OUT_DIR/merged, verify one tensor, print a summary."""
    if method not in METHOD_PARAMS:
        raise InputError(f"--method {method}: expected one of {', '.join(METHOD_PARAMS)}")
    out_dir = Path(os.path.abspath(out_dir))  # its config names the models by absolute path
    if out_dir.exists():
        if not (out_dir / MARKER).exists() and any(out_dir.iterdir()):
            raise InputError(f"{out_dir} exists, is not empty and is not a fusemerge demo directory")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text("made by `fusemerge demo`; safe to delete\n")

    t0 = time.perf_counter()
    family = make_llama_family(out_dir / "inputs", n_experts=3, seed=0, **SHAPE)
    echo(f"made a base model and 3 experts ({family['params']:,} parameters each, bf16) "
         f"in {out_dir / 'inputs'} ({time.perf_counter() - t0:.1f} s)")
    params = METHOD_PARAMS[method]
    weights = [1.0, 0.8, 0.6]
    config = write_config_yaml(out_dir / f"{method}.yml", method, family["base"], family["experts"],
                               weight=tuple(weights), **params)
    del config
    merged = out_dir / "merged"
    result = run(out_dir / f"{method}.yml", merged, device=device)
    echo(f"merged with {method} {params or ''} on {result.plan.device}: {len(result.plan.tensors)} tensors, "
         f"{format_size(result.input_bytes)} read, {format_size(result.output_bytes)} written "
         f"in {result.seconds:.2f} s")

    name = "model.layers.1.mlp.down_proj.weight"
    with safe_open(merged / "model.safetensors", "pt") as f:
        on_disk = f.get_tensor(name)
    base = _load(family["base"], name)
    experts = [_load(p, name) for p in family["experts"]]
    kw = {"lambda_": params["lambda"]} if "lambda" in params else {}
    expect = merge_tensors(None if method == "linear" else base, experts, method, weight=weights, name=name,
                           **{k: v for k, v in params.items() if k != "lambda"}, **kw)
    same = torch.equal(on_disk.view(torch.int16), expect.view(torch.int16))
    echo(f"check: '{name}' on disk {'equals' if same else 'DIFFERS FROM'} the in-memory merge_tensors result")
    echo(f"output: {merged}  ({', '.join(result.files)})")
    echo(f"config: {out_dir / f'{method}.yml'}  (try: fusemerge plan {out_dir / f'{method}.yml'})")
    if not same:
        raise FusemergeError("demo check failed: the file merge and the in-memory merge differ")
    return merged


def _load(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(Path(model_dir) / "model.safetensors", "pt") as f:
        return f.get_tensor(name)
