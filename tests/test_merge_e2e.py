"""End to end through files: every method, shards that differ between models, chunking, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusemerge
from fusemerge.streaming.model_index import open_model
from fusemerge.synthetic import make_llama_family, write_config_yaml
from tests.kernels.test_reference import PARAMS

# Odd sizes on purpose: nothing is a multiple of a block, a chunk or a page.
SHAPE = dict(hidden=36, intermediate=100, layers=3, vocab=301)
WEIGHTS = (1.0, 0.6, 1.3)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("family")
    return make_llama_family(root, n_experts=3, seed=4, shard_bytes=9000, expert_shard_bytes=[None, 14000, 5000],
                             **SHAPE)


def load_model(path: Path) -> dict[str, torch.Tensor]:
    model = open_model(path)
    out = {}
    for f in model.files:
        out.update(load_file(f))
    return out


def config_for(tmp_path: Path, fam: dict, method: str, **extra) -> Path:
    params = {k: v for k, v in PARAMS[method].items()}
    path = tmp_path / f"{method}.yml"
    write_config_yaml(path, method, fam["base"], fam["experts"], weight=WEIGHTS, **params, **extra)
    return path


@pytest.mark.parametrize("method", list(PARAMS))
def test_file_merge_equals_in_memory_merge(tmp_path: Path, fam: dict, method: str) -> None:
    cfg = config_for(tmp_path, fam, method)
    result = fusemerge.run(cfg, tmp_path / "out", device="cpu")
    merged = load_model(tmp_path / "out")
    base = load_model(fam["base"])
    experts = [load_model(p) for p in fam["experts"]]
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        expect = fusemerge.merge_tensors(None if method == "linear" else base[name], [e[name] for e in experts],
                                         method, weight=list(WEIGHTS), name=name, **PARAMS[method])
        assert torch.equal(tensor.view(torch.int16), expect.view(torch.int16)), name
    assert result.input_bytes > 0 and sorted(result.files)[0] == "README.md"
    cfg_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_json["num_hidden_layers"] == SHAPE["layers"]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "linear"])
def test_output_bytes_do_not_depend_on_memory_budget_or_workers(tmp_path: Path, fam: dict, method: str) -> None:
    cfg = config_for(tmp_path, fam, method)
    fusemerge.run(cfg, tmp_path / "a", device="cpu", workers=1)
    # 64 KiB leaves chunks of ~500 elements: every tensor here is chunked
    fusemerge.run(cfg, tmp_path / "b", device="cpu", max_memory="64KiB", workers=2)
    plan = fusemerge.build_plan(cfg, device="cpu", max_memory="64KiB", workers=2)
    assert plan.chunk_elems < SHAPE["hidden"] * SHAPE["intermediate"]
    for f in ("model.safetensors",):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_trim_rescale_on_the_files_path(tmp_path: Path, fam: dict, method: str) -> None:
    """`rescale: true` of a trim: the in-memory merge's bytes, whatever the budget (tensors kept in memory or
    read again for the L1 sums) and the backend, and other bytes than without it."""
    cfg = config_for(tmp_path, fam, method, rescale=True)
    fusemerge.run(cfg, tmp_path / "a", device="cpu", workers=1)
    fusemerge.run(cfg, tmp_path / "b", device="cpu", max_memory="64KiB", workers=2)
    fusemerge.run(cfg, tmp_path / "c", device="cpu", backend="triton", max_memory="64KiB", workers=1)
    fusemerge.run(config_for(tmp_path, fam, method), tmp_path / "plain", device="cpu")
    merged = load_model(tmp_path / "a")
    base, experts = load_model(fam["base"]), [load_model(p) for p in fam["experts"]]
    name = "model.layers.1.mlp.up_proj.weight"
    expect = fusemerge.merge_tensors(base[name], [e[name] for e in experts], method, weight=list(WEIGHTS), name=name,
                                     rescale=True, **PARAMS[method])
    assert torch.equal(merged[name].view(torch.int16), expect.view(torch.int16))
    shard = {d: (tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "b", "c", "plain")}
    assert shard["a"] == shard["b"] == shard["c"] != shard["plain"]


def test_sharded_output_matches_single_shard(tmp_path: Path, fam: dict) -> None:
    cfg = config_for(tmp_path, fam, "ties")
    fusemerge.run(cfg, tmp_path / "one", device="cpu")
    fusemerge.run(cfg, tmp_path / "many", device="cpu", out_shard_size="20KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0].startswith("model-00001-of-")
    one, many = load_model(tmp_path / "one"), load_model(tmp_path / "many")
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_tied_embeddings_expert_without_lm_head(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    emb, head, norm = (torch.randn(17, 8, generator=g), torch.randn(17, 8, generator=g), torch.randn(8, generator=g))
    tensors = {"model.embed_tokens.weight": emb, "lm_head.weight": head, "model.norm.weight": norm}
    base = _write(tmp_path / "base", tensors, {"tie_word_embeddings": False})
    e_emb = emb + 0.1 * torch.randn(17, 8, generator=g)
    tied = _write(tmp_path / "tied", {"model.embed_tokens.weight": e_emb, "model.norm.weight": norm + 0.1},
                  {"tie_word_embeddings": True})
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(tied)}]}
    fusemerge.run(cfg, tmp_path / "out", device="cpu")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    # the tied expert's lm_head is its embedding: delta = e_emb - head
    torch.testing.assert_close(out["lm_head.weight"], head + (e_emb - head), rtol=0, atol=1e-6)


def test_trim_scope_global_uses_one_threshold_per_expert(tmp_path: Path, fam: dict) -> None:
    cfg = config_for(tmp_path, fam, "ties", trim_scope="global")
    fusemerge.run(cfg, tmp_path / "out", device="cpu", max_memory="64KiB")
    merged, base = load_model(tmp_path / "out"), load_model(fam["base"])
    experts = [load_model(p) for p in fam["experts"]]
    names = [t.name for t in fusemerge.build_plan(cfg, device="cpu").tensors]
    # Concatenate every tensor in plan order: one global tensor, merged in memory, must equal the file merge.
    flat_base = torch.cat([base[n].reshape(-1) for n in names])
    flat_exp = [torch.cat([e[n].reshape(-1) for n in names]) for e in experts]
    expect = fusemerge.merge_tensors(flat_base, flat_exp, "ties", weight=list(WEIGHTS), density=0.3)
    got = torch.cat([merged[n].reshape(-1) for n in names])
    assert torch.equal(got.view(torch.int16), expect.view(torch.int16))
    per_tensor = tmp_path / "pt"
    fusemerge.run(config_for(tmp_path, fam, "ties"), per_tensor, device="cpu")
    assert not torch.equal(torch.cat([load_model(per_tensor)[n].reshape(-1) for n in names]), got)


@pytest.mark.parametrize("method,scope", [*((m, "tensor") for m in PARAMS), ("ties", "global")])
def test_a_tensor_with_no_elements_merges_to_an_empty_tensor(tmp_path: Path, method: str, scope: str) -> None:
    """A (0, 4) tensor beside ordinary ones: k = max(1, floor(density * 0)) has nothing to keep (it made the
    trim raise and stop the whole merge)."""
    g = torch.Generator().manual_seed(9)
    base = {"a.weight": torch.randn(5, 7, generator=g).bfloat16(), "b.empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        tensors = base if i == 0 else {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16()
                                       for k, v in base.items()}
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
        dirs.append(d)
    cfg = tmp_path / "c.yml"
    extra = {"trim_scope": "global"} if scope == "global" else {}
    write_config_yaml(cfg, method, dirs[0], dirs[1:], **PARAMS[method], **extra)
    fusemerge.run(cfg, tmp_path / "out", device="cpu")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged["b.empty"].shape == (0, 4) and merged["b.empty"].dtype == torch.bfloat16
    for backend in ("torch", "triton"):
        out = fusemerge.merge_tensors(None if method == "linear" else torch.zeros(0, 4, dtype=torch.bfloat16),
                                      [torch.zeros(0, 4, dtype=torch.bfloat16)] * 2, method, backend=backend,
                                      **PARAMS[method])
        assert out.shape == (0, 4), backend
