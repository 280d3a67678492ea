"""open_model over single files, model directories and sharded checkpoints, and their problems."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusemerge.errors import InputError
from fusemerge.streaming.model_index import ModelIndex, open_model
from tests.streaming.helpers import as_bytes, random_tensor

INDEX = "model.safetensors.index.json"


def make_tensors(gen: torch.Generator, n: int = 7) -> dict[str, torch.Tensor]:
    """`n` tensors of mixed dtypes and shapes, named like a transformer's."""
    codes = ["BF16", "F32", "BF16", "F16", "BF16", "I64", "BF16"]
    shapes = [(5, 3), (7,), (3, 3), (), (1, 11), (2,), (4, 2, 3)]
    return {f"model.layers.{i}.w": random_tensor(codes[i % 7], shapes[i % 7], gen) for i in range(n)}


def save_sharded(directory: Path, tensors: dict[str, torch.Tensor], bounds: list[int], index: bool = True) -> None:
    """Save `tensors` (in order) into shards split before the positions in `bounds`, with an HF index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    cuts = [0, *bounds, len(names)]
    n = len(cuts) - 1
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[cuts[i] : cuts[i + 1]]}
        save_file(part, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    if index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def assert_matches(model: ModelIndex, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the index points at exactly the bytes of the corresponding source tensor."""
    assert set(model.tensors) == set(tensors)
    for name, entry in model.tensors.items():
        assert entry.shape == tuple(tensors[name].shape)
        with open(entry.file, "rb") as f:
            f.seek(entry.start)
            assert f.read(entry.nbytes) == as_bytes(tensors[name])


def open_problems(path: Path) -> list[str]:
    with pytest.raises(InputError) as info:
        open_model(path)
    return info.value.problems


def test_single_file(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = make_tensors(gen)
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path)
    model = open_model(path)
    assert model.path == path and model.files == [path] and model.config is None
    assert_matches(model, tensors)


def test_directory_with_model_safetensors_and_config(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = make_tensors(gen)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 3}))
    (tmp_path / "other.safetensors").write_bytes(b"ignored: model.safetensors comes first")
    model = open_model(tmp_path)
    assert model.files == [tmp_path / "model.safetensors"]
    assert model.config == {"model_type": "llama", "hidden_size": 3}
    assert_matches(model, tensors)


def test_helpers(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = make_tensors(gen)
    save_file(tensors, tmp_path / "model.safetensors")
    model = open_model(tmp_path)
    assert model.num_parameters == sum(t.numel() for t in tensors.values())
    assert model.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert model.dtype_counts() == {"BF16": 4, "F32": 1, "F16": 1, "I64": 1}


@pytest.mark.parametrize("bounds", [[3], [1, 2, 6], [4, 5]])
def test_sharded_with_index(tmp_path: Path, gen: torch.Generator, bounds: list[int]) -> None:
    tensors = make_tensors(gen)
    save_sharded(tmp_path, tensors, bounds)
    (tmp_path / "config.json").write_text("{}")
    model = open_model(tmp_path)
    assert model.files == sorted(tmp_path.glob("model-*.safetensors"))
    assert len(model.files) == len(bounds) + 1
    assert model.config == {}
    assert_matches(model, tensors)
    for entry in model.tensors.values():  # every entry points into the shard that holds it
        assert as_bytes(load_file(entry.file)[entry.name]) == as_bytes(tensors[entry.name])


def test_shards_without_index(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = make_tensors(gen)
    save_sharded(tmp_path, tensors, [2, 5], index=False)
    (tmp_path / "notes.txt").write_text("not a shard")
    model = open_model(tmp_path)
    assert len(model.files) == 3
    assert_matches(model, tensors)


def test_tensor_in_a_shard_but_not_in_the_index_is_included(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = make_tensors(gen)
    save_sharded(tmp_path, tensors, [3])
    index = json.loads((tmp_path / INDEX).read_text())
    del index["weight_map"]["model.layers.0.w"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    assert_matches(open_model(tmp_path), tensors)


def test_missing_path(tmp_path: Path) -> None:
    [problem] = open_problems(tmp_path / "nope")
    assert problem.startswith(f"{tmp_path / 'nope'}: ") and "no such file or directory" in problem


def test_file_that_is_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"pickle")
    [problem] = open_problems(tmp_path / "model.bin")
    assert problem.startswith(f"{tmp_path / 'model.bin'}: ")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    [problem] = open_problems(tmp_path)
    assert problem.startswith(f"{tmp_path}: ") and "no model.safetensors" in problem


def test_unreadable_directory(tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file(make_tensors(gen), tmp_path / "model.safetensors")

    def denied(path: object) -> list[str]:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", denied)  # chmod 0 would not stop root
    [problem] = open_problems(tmp_path)
    assert problem == f"{tmp_path}: cannot read directory: Permission denied"


@pytest.mark.parametrize(
    "text", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": []}', '{"weight_map": {"a": 3}}', b"\xff\xfe"]
)
def test_malformed_index(tmp_path: Path, gen: torch.Generator, text: str | bytes) -> None:
    save_sharded(tmp_path, make_tensors(gen), [3])
    if isinstance(text, bytes):
        (tmp_path / INDEX).write_bytes(text)
    else:
        (tmp_path / INDEX).write_text(text)
    [problem] = open_problems(tmp_path)
    assert problem.startswith(f"{tmp_path / INDEX}: ")


def test_index_names_missing_shard(tmp_path: Path, gen: torch.Generator) -> None:
    save_sharded(tmp_path, make_tensors(gen), [2, 4])
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    [problem] = open_problems(tmp_path)
    assert problem.startswith(f"{tmp_path / INDEX}: ")
    assert "model-00002-of-00003.safetensors" in problem and "does not exist" in problem


def test_index_maps_tensor_to_shard_without_it(tmp_path: Path, gen: torch.Generator) -> None:
    save_sharded(tmp_path, make_tensors(gen), [3])
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["model.layers.0.w"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    problems = open_problems(tmp_path)
    assert len(problems) == 2
    assert all(p.startswith(f"{tmp_path / INDEX}: ") and "has no such tensor" in p for p in problems)
    assert any("'model.layers.0.w'" in p for p in problems) and any("'lm_head.weight'" in p for p in problems)


def test_index_shard_name_with_a_path(tmp_path: Path, gen: torch.Generator) -> None:
    save_sharded(tmp_path, make_tensors(gen), [3])
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["model.layers.0.w"] = "../elsewhere.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    problems = open_problems(tmp_path)
    assert any("'../elsewhere.safetensors' is not a plain file name" in p for p in problems)


@pytest.mark.parametrize("index", [True, False])
def test_tensor_in_two_shards(tmp_path: Path, gen: torch.Generator, index: bool) -> None:
    tensors = make_tensors(gen)
    save_sharded(tmp_path, tensors, [3], index=index)
    second = {name: tensors[name] for name in list(tensors)[3:]}
    second["model.layers.0.w"] = tensors["model.layers.0.w"]  # also in the first shard
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    [problem] = open_problems(tmp_path)
    assert "'model.layers.0.w'" in problem
    assert "model-00001-of-00002.safetensors" in problem and "model-00002-of-00002.safetensors" in problem


def test_problems_of_every_shard_at_once(tmp_path: Path, gen: torch.Generator) -> None:
    save_sharded(tmp_path, make_tensors(gen), [2, 4])
    for shard in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        raw = (tmp_path / shard).read_bytes()
        (tmp_path / shard).write_bytes(raw[:-4])  # truncated
    (tmp_path / "config.json").write_text("{'single': 'quotes'}")
    problems = open_problems(tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith(f"{tmp_path / 'model-00001-of-00003.safetensors'}: truncated")
    assert problems[1].startswith(f"{tmp_path / 'model-00003-of-00003.safetensors'}: truncated")
    assert problems[2].startswith(f"{tmp_path / 'config.json'}: not valid JSON")


@pytest.mark.parametrize("text", ["{", "[1, 2]", "null"])
def test_bad_config(tmp_path: Path, gen: torch.Generator, text: str) -> None:
    save_file(make_tensors(gen), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text)
    [problem] = open_problems(tmp_path)
    assert problem.startswith(f"{tmp_path / 'config.json'}: ")


def test_config_next_to_a_single_file(tmp_path: Path, gen: torch.Generator) -> None:
    save_file(make_tensors(gen), tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text('{"vocab_size": 11}')
    assert open_model(tmp_path / "weights.safetensors").config == {"vocab_size": 11}
