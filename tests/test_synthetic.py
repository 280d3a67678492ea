"""Tests for the synthetic Llama-shaped checkpoint generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusemerge.synthetic import make_llama_family, write_config_yaml

SHAPE = dict(hidden=64, intermediate=96, layers=3, vocab=37)


def load_model(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, single file or shards."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tie", [False, True])
def test_names_shapes_dtype_and_config(tmp_path: Path, dtype: torch.dtype, tie: bool) -> None:
    fam = make_llama_family(tmp_path, n_experts=2, heads=4, kv_heads=2, dtype=dtype, tie_embeddings=tie, **SHAPE)
    assert fam["base"] == tmp_path / "base"
    assert fam["experts"] == [tmp_path / "expert_1", tmp_path / "expert_2"]
    kv = 2 * (64 // 4)
    expected = {"model.embed_tokens.weight": (37, 64), "model.norm.weight": (64,)}
    for i in range(3):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (64, 64),
            p + "self_attn.k_proj.weight": (kv, 64),
            p + "self_attn.v_proj.weight": (kv, 64),
            p + "self_attn.o_proj.weight": (64, 64),
            p + "mlp.gate_proj.weight": (96, 64),
            p + "mlp.up_proj.weight": (96, 64),
            p + "mlp.down_proj.weight": (64, 96),
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
        }
    if not tie:
        expected["lm_head.weight"] = (37, 64)
    assert fam["params"] == sum(torch.Size(s).numel() for s in expected.values())
    assert fam["bytes_per_model"] == fam["params"] * dtype.itemsize
    assert fam["total_bytes"] == 3 * fam["bytes_per_model"]
    for d in [fam["base"], *fam["experts"]]:
        assert [f.name for f in d.glob("*.safetensors")] == ["model.safetensors"]
        tensors = load_model(d)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        assert all(v.dtype == dtype for v in tensors.values())
        config = json.loads((d / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 96, 3)
        assert (config["vocab_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (37, 4, 2)
        assert config["tie_word_embeddings"] is tie
        assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
        assert json.loads((d / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
        assert "tokenizer_class" in json.loads((d / "tokenizer_config.json").read_text())


def test_values_base_and_expert_deltas(tmp_path: Path) -> None:
    fam = make_llama_family(tmp_path, n_experts=2, dtype=torch.float32, **SHAPE)
    base = load_model(fam["base"])
    e1, e2 = (load_model(d) for d in fam["experts"])
    q = base["model.layers.0.self_attn.q_proj.weight"]
    assert 0.015 < q.std().item() < 0.025 and abs(q.mean().item()) < 0.005
    assert abs(base["model.norm.weight"].mean().item() - 1.0) < 0.01
    for name, b in base.items():
        d1, d2 = e1[name] - b, e2[name] - b
        assert 0 < d1.abs().mean().item() < 0.005, name  # small, non-zero fine-tune deltas
        assert not torch.equal(d1, d2), name  # experts differ from each other
    assert max((e1[n] - base[n]).abs().max().item() for n in base) > 0.03  # a few larger entries


def test_shards_differ_between_models_and_values_do_not_depend_on_sharding(tmp_path: Path) -> None:
    single = make_llama_family(tmp_path / "single", n_experts=2, seed=3, **SHAPE)
    sharded = make_llama_family(
        tmp_path / "sharded", n_experts=2, seed=3, shard_bytes=30_000, expert_shard_bytes=[None, 11_000], **SHAPE
    )
    maps = []
    for d in [sharded["base"], *sharded["experts"]]:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert not (d / "model.safetensors").exists()
        files = sorted(set(index["weight_map"].values()))
        assert files == sorted(f.name for f in d.glob("*.safetensors")) and len(files) > 1
        assert index["metadata"]["total_size"] == sharded["bytes_per_model"]
        for f in files:  # every shard holds exactly the tensors the index says
            assert set(load_file(d / f)) == {k for k, v in index["weight_map"].items() if v == f}
        maps.append(index["weight_map"])
    assert maps[0] == maps[1] and maps[2] != maps[0]
    for a, b in zip([single["base"], *single["experts"]], [sharded["base"], *sharded["experts"]], strict=True):
        ta, tb = load_model(a), load_model(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_deterministic_in_seed(tmp_path: Path) -> None:
    runs = [
        make_llama_family(tmp_path / name, n_experts=1, seed=s, **SHAPE) for name, s in [("a", 7), ("b", 7), ("c", 8)]
    ]
    for sub in ["base", "expert_1"]:
        a, b, c = ((tmp_path / n / sub / "model.safetensors").read_bytes() for n in "abc")
        assert a == b and a != c
    assert runs[0]["params"] == runs[2]["params"]
    assert json.loads((tmp_path / "a" / "family.json").read_text())["spec"]["seed"] == 7


def test_regenerating_with_other_sharding_removes_stale_files(tmp_path: Path) -> None:
    make_llama_family(tmp_path, n_experts=1, shard_bytes=20_000, **SHAPE)
    fam = make_llama_family(tmp_path, n_experts=1, **SHAPE)
    assert sorted(p.name for p in fam["base"].glob("*.safetensors*")) == ["model.safetensors"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads"):
        make_llama_family(tmp_path, n_experts=1, heads=5, **SHAPE)
    with pytest.raises(ValueError, match="expert_shard_bytes"):
        make_llama_family(tmp_path, n_experts=2, expert_shard_bytes=[None], **SHAPE)


def test_write_config_yaml(tmp_path: Path) -> None:
    base, experts = tmp_path / "base", [tmp_path / "e1", tmp_path / "e2"]
    path = tmp_path / "ties.yml"
    written = write_config_yaml(
        path, "ties", base, experts, density=0.2, weight=(0.7, 0.3), gamma=[0.0, 0.1], normalize=True, dtype="bfloat16"
    )
    config = yaml.safe_load(path.read_text())
    assert config == written
    assert config["merge_method"] == "ties" and config["base_model"] == str(base) and config["dtype"] == "bfloat16"
    assert config["parameters"] == {"normalize": True}
    assert [m["model"] for m in config["models"]] == [str(e) for e in experts]
    assert [m["parameters"] for m in config["models"]] == [
        {"weight": 0.7, "density": 0.2, "gamma": [0.0, 0.1]},
        {"weight": 0.3, "density": 0.2, "gamma": [0.0, 0.1]},
    ]
    linear = write_config_yaml(tmp_path / "linear.yml", "linear", base, experts)
    assert "base_model" not in linear and all(m["parameters"] == {"weight": 1.0} for m in linear["models"])
    with pytest.raises(ValueError, match="weight"):
        write_config_yaml(path, "ties", base, experts, weight=(1.0,))
