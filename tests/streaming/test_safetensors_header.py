"""read_header against files written by the safetensors library, and every kind of malformed file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusemerge.errors import InputError
from fusemerge.streaming.safetensors_header import DTYPES, MAX_HEADER_BYTES, read_header
from tests.streaming.helpers import as_bytes, random_tensor, split_file, write_raw

SHAPES = [(), (1,), (7,), (13, 3), (2, 3, 5), (0,), (4, 0, 2)]


@pytest.mark.parametrize("code", list(DTYPES))
def test_round_trip_every_dtype_and_shape(tmp_path: Path, gen: torch.Generator, code: str) -> None:
    tensors = {f"t{i}.weight": random_tensor(code, shape, gen) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "é ✓"})

    header = read_header(path)
    raw = path.read_bytes()
    assert header.path == path
    assert header.file_size == len(raw)
    assert header.data_start == 8 + header.header_len == 8 + int.from_bytes(raw[:8], "little")
    assert header.metadata == {"format": "pt", "note": "é ✓"}
    assert set(header.tensors) == set(tensors)
    loaded = load_file(path)
    for name, entry in header.tensors.items():
        assert entry.name == name and entry.file == path and entry.dtype == code
        assert entry.shape == tuple(tensors[name].shape)
        assert entry.torch_dtype == tensors[name].dtype
        assert entry.itemsize == tensors[name].element_size()
        assert entry.numel == tensors[name].numel()
        assert entry.nbytes == entry.numel * entry.itemsize
        assert raw[entry.start : entry.end] == as_bytes(loaded[name]) == as_bytes(tensors[name])


def test_mixed_dtypes_without_metadata(tmp_path: Path, gen: torch.Generator) -> None:
    tensors = {code.lower(): random_tensor(code, (5, 3), gen) for code in DTYPES}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    header = read_header(path)
    assert header.metadata is None
    raw = path.read_bytes()
    for name, entry in header.tensors.items():
        assert raw[entry.start : entry.end] == as_bytes(tensors[name])
    spans = sorted((e.start, e.end) for e in header.tensors.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


def test_header_order_is_kept(tmp_path: Path, gen: torch.Generator) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": random_tensor("F32", (2,), gen), "b": random_tensor("F32", (3,), gen)}, good)
    header, data = split_file(good)
    reordered = {"b": header["b"], "a": header["a"]}
    assert list(read_header(write_raw(tmp_path / "r.safetensors", reordered, data)).tensors) == ["b", "a"]


# -- malformed files ---------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path, gen: torch.Generator) -> Path:
    """A valid file with two BF16 tensors 'x.weight' (3, 2) and 'y' (5,), and metadata."""
    path = tmp_path / "good.safetensors"
    save_file({"x.weight": random_tensor("BF16", (3, 2), gen), "y": random_tensor("BF16", (5,), gen)}, path,
              metadata={"format": "pt"})
    return path


def problems_of(path: Path) -> list[str]:
    """The problems read_header reports for `path`; checks each one names the file."""
    with pytest.raises(InputError) as info:
        read_header(path)
    problems = info.value.problems
    assert problems and all(p.startswith(f"{path}: ") for p in problems), problems
    return problems


def edited(good: Path, name: str, edit) -> Path:
    """A copy of `good` named `name` whose header dict went through `edit` (which mutates it)."""
    header, data = split_file(good)
    edit(header)
    return write_raw(good.parent / name, header, data)


def test_shorter_than_8_bytes(tmp_path: Path) -> None:
    for size in (0, 1, 7):
        path = tmp_path / f"short{size}.safetensors"
        path.write_bytes(b"\x05" * size)
        [problem] = problems_of(path)
        assert f"has {size} bytes" in problem and "too short" in problem


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, "header length is 0"), (MAX_HEADER_BYTES + 1, "limit"), (2**64 - 1, "limit"), (None, "past the end")],
)
def test_bad_header_length(good: Path, length: int | None, expected: str) -> None:
    raw = bytearray(good.read_bytes())
    length = len(raw) - 7 if length is None else length  # None: one byte more than the file holds
    raw[:8] = length.to_bytes(8, "little")
    good.write_bytes(raw)
    [problem] = problems_of(good)
    assert expected in problem


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_truncated_file(good: Path, cut: int) -> None:
    raw = good.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    good.write_bytes(raw[: max(header_end, len(raw) - cut)])
    problems = problems_of(good)
    assert all("truncated" in p for p in problems)
    assert any("tensor 'x.weight'" in p or "tensor 'y'" in p for p in problems)
    assert any(f"but the file has {max(header_end, len(raw) - cut)} bytes" in p for p in problems)


def test_truncated_inside_header(good: Path) -> None:
    raw = good.read_bytes()
    good.write_bytes(raw[:20])
    [problem] = problems_of(good)
    assert "truncated" in problem and "past the end" in problem


def test_header_not_utf8(good: Path) -> None:
    raw = bytearray(good.read_bytes())
    raw[raw.index(b"x.weight")] = 0xFF
    good.write_bytes(raw)
    [problem] = problems_of(good)
    assert "UTF-8" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [('{"x": ', "not valid JSON"), ("not json at all", "not valid JSON"), ("[1, 2]", "JSON list"), ("7", "JSON int")],
)
def test_header_not_a_json_object(good: Path, text: str, expected: str) -> None:
    _, data = split_file(good)
    [problem] = problems_of(write_raw(good, text, data))
    assert expected in problem


def test_duplicate_tensor_key(good: Path) -> None:
    header, data = split_file(good)
    text = json.dumps(header)
    entry = json.dumps({"y": header["y"]})[1:-1]
    [problem] = problems_of(write_raw(good, text[:-1] + ", " + entry + "}", data))
    assert "duplicate key 'y'" in problem


def test_duplicate_key_inside_entry(good: Path) -> None:
    text = json.dumps(split_file(good)[0]).replace('"dtype": "BF16"', '"dtype": "BF16", "dtype": "F16"', 1)
    problems = problems_of(write_raw(good, text, split_file(good)[1]))
    assert any("duplicate key 'dtype'" in p for p in problems)


@pytest.mark.parametrize("metadata", [{"format": 1}, ["format", "pt"], "pt", {"a": {"b": "c"}}])
def test_bad_metadata(good: Path, metadata: object) -> None:
    [problem] = problems_of(edited(good, "m.safetensors", lambda h: h.update(__metadata__=metadata)))
    assert "__metadata__" in problem


def test_null_metadata_is_none(good: Path) -> None:
    assert read_header(edited(good, "m.safetensors", lambda h: h.update(__metadata__=None))).metadata is None


@pytest.mark.parametrize(
    "entry",
    [
        5,
        "BF16",
        [3, 2],
        {"dtype": "BF16", "shape": [3, 2]},
        {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 12], "extra": 1},
    ],
)
def test_entry_not_an_object_with_the_three_keys(good: Path, entry: object) -> None:
    [problem] = problems_of(edited(good, "e.safetensors", lambda h: h.update({"x.weight": entry})))
    assert "tensor 'x.weight'" in problem and "dtype, shape, data_offsets" in problem


@pytest.mark.parametrize("dtype", ["F7", "bf16", "", 3, None])
def test_unknown_dtype(good: Path, dtype: object) -> None:
    [problem] = problems_of(edited(good, "d.safetensors", lambda h: h["y"].update(dtype=dtype)))
    assert "tensor 'y'" in problem and "unknown dtype" in problem


@pytest.mark.parametrize("shape", [[5, -1], [2.5, 2], ["5"], [True, 5], 5, None, {"0": 5}])
def test_bad_shape(good: Path, shape: object) -> None:
    [problem] = problems_of(edited(good, "s.safetensors", lambda h: h["y"].update(shape=shape)))
    assert "tensor 'y'" in problem and "not a list of non-negative integers" in problem


@pytest.mark.parametrize("offsets", [[10], [0, 5, 10], [-2, 8], [12, 2], [0.0, 10.0], "0,10", None, [False, 10]])
def test_bad_data_offsets(good: Path, offsets: object) -> None:
    [problem] = problems_of(edited(good, "o.safetensors", lambda h: h["y"].update(data_offsets=offsets)))
    assert "tensor 'y'" in problem and "[begin, end]" in problem


def test_wrong_byte_length(good: Path) -> None:
    def edit(h: dict) -> None:
        begin = h["x.weight"]["data_offsets"][0]
        h["x.weight"]["data_offsets"] = [begin, begin + 10]

    [problem] = problems_of(edited(good, "model.safetensors", edit))
    begin = split_file(good)[0]["x.weight"]["data_offsets"][0]
    assert f"tensor 'x.weight': data_offsets [{begin}, {begin + 10}] hold 10 bytes" in problem
    assert "shape [3, 2] of BF16 needs 12" in problem


def test_offsets_past_end_of_file(good: Path) -> None:
    header, data = split_file(good)
    header["z"] = {"dtype": "U8", "shape": [4000], "data_offsets": [len(data), len(data) + 4000]}
    path = write_raw(good.parent / "shard.safetensors", header, data)
    [problem] = problems_of(path)
    size = path.stat().st_size
    assert problem == f"{path}: truncated: tensor 'z' ends at byte {size + 4000} but the file has {size} bytes"


def test_overlapping_tensors(good: Path) -> None:
    def edit(h: dict) -> None:
        h["y"]["data_offsets"] = [h["x.weight"]["data_offsets"][0] + 2, h["x.weight"]["data_offsets"][0] + 12]

    [problem] = problems_of(edited(good, "overlap.safetensors", edit))
    assert "'x.weight'" in problem and "'y'" in problem and "overlap" in problem


def test_empty_tensors_never_overlap(good: Path) -> None:
    def edit(h: dict) -> None:
        h["e1"] = {"dtype": "F32", "shape": [0, 3], "data_offsets": [2, 2]}
        h["e2"] = {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]}

    assert read_header(edited(good, "empty.safetensors", edit)).tensors["e1"].nbytes == 0


def test_all_problems_of_a_file_at_once(good: Path) -> None:
    def edit(h: dict) -> None:
        h["x.weight"]["dtype"] = "Q4"
        h["y"]["shape"] = [6]
        h["__metadata__"] = {"format": 5}

    problems = problems_of(edited(good, "many.safetensors", edit))
    assert len(problems) == 3
    assert any("unknown dtype" in p for p in problems)
    assert any("tensor 'y'" in p and "needs 12" in p for p in problems)
    assert any("__metadata__" in p for p in problems)


def test_deeply_nested_header(good: Path) -> None:
    [problem] = problems_of(write_raw(good, "[" * 100_000 + "]" * 100_000, b""))
    assert "nested too deeply" in problem


def test_unreadable_path(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.safetensors", tmp_path):
        [problem] = problems_of(path)
        assert "cannot read" in problem


def test_never_reads_the_data(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the 8-byte prefix and the header are read, whatever the file size."""
    import builtins

    sizes: list[int] = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            out = self.f.read(n)
            sizes.append(len(out))
            return out

    def spy_open(path, mode="r", *args, **kwargs):
        assert mode == "rb"  # read-only
        return Spy(real_open(path, mode, *args, **kwargs))

    monkeypatch.setattr(builtins, "open", spy_open)
    header = read_header(good)
    assert sizes == [8, header.header_len]
