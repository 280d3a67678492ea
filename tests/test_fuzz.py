"""Fuzzing the input parsers: safetensors headers, model directories, config YAML and the CLI on top of them.

Every parser either returns something valid or raises `InputError` whose problems are one line each and name the
file; never another exception, never a hang. Bounded and derandomized here (CI); `bench/fuzz.py` runs the same
properties for 10^5 cases. The number of cases tried is printed at the end of the pytest run ("fuzz: N cases").
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusemerge.cli import main
from fusemerge.config import MergeConfig, load_config
from fusemerge.errors import InputError
from fusemerge.streaming.model_index import ModelIndex, open_model
from fusemerge.streaming.safetensors_header import DTYPES, read_header
from fusemerge.streaming.torch_bin import read_bin_header
from tests.fuzz_count import tried

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
MAX_SECONDS = 30.0  # one parse of these tiny inputs taking longer than this counts as a hang (generous: CI is shared)

_ROOT = Path(tempfile.mkdtemp(prefix="fusemerge-fuzz-"))
_ids = itertools.count()


def _fresh_dir() -> Path:
    d = _ROOT / f"case{next(_ids)}"
    d.mkdir()
    return d


def _assert_input_error(e: InputError, names: str) -> None:
    assert e.problems, "InputError without problems"
    for p in e.problems:
        assert isinstance(p, str) and p
        assert "\n" not in p and "\r" not in p, f"problem spans lines: {p!r}"
        assert names in p, f"problem does not name {names}: {p!r}"


# --------------------------------------------------------------------------------------------------
# strategies

_text = st.text(st.characters(codec="utf-8"), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
_dtypes = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["f32", "F31", "", "float32", "F8_E4M3FN"]) | json_values
_dims = (
    st.integers(0, 3)
    | st.sampled_from([-1, -(2**63), 2**31, 2**62, 2**63, 2**64 + 1, 10**30])
    | st.booleans()
    | st.floats(-2, 3)
    | st.text(max_size=2)
)
_shapes = st.lists(_dims, max_size=4) | json_values
# Tensor names: a small alphabet (collisions: duplicate keys), any text, lone surrogates (not valid UTF-8).
_names = st.sampled_from(["a", "b", "w.weight", "__metadata__"]) | st.text(max_size=6) | st.sampled_from(
    ["\ud800", "x\udfff", "\n", "é"]
)


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    """A small safetensors file, mostly well formed, then perhaps mutated."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))  # plain random bytes
    pairs: list[tuple[str, str]] = []
    cursor = 0
    prev: tuple[int, int] = (0, 0)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_names)
        dtype = draw(_dtypes) if draw(st.booleans()) else draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(_shapes) if draw(st.integers(0, 3)) == 0 else draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = 0
        if isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            nbytes = math.prod(shape) * DTYPES[dtype][1]
        offsets = [cursor, cursor + nbytes]
        how = draw(st.integers(0, 9))
        if how == 1:
            offsets = draw(st.lists(st.integers(-5, 2**64) | st.integers(0, 64), min_size=2, max_size=2))
        elif how == 2:
            offsets = list(prev)  # overlaps the previous tensor
        elif how == 3:
            offsets = [cursor, cursor + 10**6]  # past the end
        elif how == 4:
            offsets = draw(json_values)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), json_values))
        elif draw(st.integers(0, 19)) == 0:
            entry = draw(json_values)
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            prev = (offsets[0], offsets[1])
        cursor += nbytes if 0 <= nbytes < 64 else 0
        pairs.append((json.dumps(name), json.dumps(entry)))
    if draw(st.integers(0, 3)) == 0:
        meta = draw(st.dictionaries(_text, _text, max_size=2) | json_values)
        pairs.insert(draw(st.integers(0, len(pairs))), ('"__metadata__"', json.dumps(meta)))
    # Written by hand, not json.dumps of a dict, so that duplicate keys survive.
    header = ("{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}").encode()
    if draw(st.integers(0, 19)) == 0:
        header = draw(st.sampled_from([b"[]", b"1", b'"x"', b"null", b"{", b"[" * 5000, b'{"a": 1e999999}'])) or header
    if draw(st.integers(0, 19)) == 0:
        header = header.replace(b'"a"', b'"\xff\xfe"')  # raw bytes that are not UTF-8
    header += b" " * draw(st.sampled_from([0, -len(header) % 8]))
    data = draw(st.binary(min_size=cursor, max_size=cursor)) + draw(st.binary(max_size=draw(st.sampled_from([0, 8]))))
    raw = bytearray(len(header).to_bytes(8, "little") + header + data)

    mutation = draw(st.integers(0, 9))
    if mutation == 1 and raw:  # flip a bit of the length prefix
        i = draw(st.integers(0, 7))
        raw[i] ^= 1 << draw(st.integers(0, 7))
    elif mutation == 2 and len(raw) > 8:  # flip a bit anywhere after it (header JSON, data)
        i = draw(st.integers(8, len(raw) - 1))
        raw[i] ^= 1 << draw(st.integers(0, 7))
    elif mutation == 3:  # truncate
        del raw[draw(st.integers(0, len(raw))) :]
    elif mutation == 4:  # absurd declared header length
        absurd = st.sampled_from([0, 1, 7, 2**32, 100_000_000, 100_000_001, 2**63, 2**64 - 1])
        n = draw(absurd | st.integers(0, 2**64 - 1))
        raw[:8] = n.to_bytes(8, "little")
    elif mutation == 5 and len(raw) > 8:  # overwrite a random byte of the header
        raw[draw(st.integers(8, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def _load_or_input_error(kind: str, load, path: Path):
    """load(path), or None once the InputError it raised is checked to name `path`; within MAX_SECONDS."""
    tried(kind)
    t0 = time.monotonic()
    try:
        return load(path)
    except InputError as e:
        _assert_input_error(e, str(path))
        return None
    finally:
        assert time.monotonic() - t0 < MAX_SECONDS


# --------------------------------------------------------------------------------------------------
# 1. safetensors headers


def check_read_header(path: Path) -> None:
    """The property: a header whose tensors all lie inside the file, or an InputError naming the file."""
    header = _load_or_input_error("safetensors", read_header, path)
    if header is None:
        return
    size = path.stat().st_size
    assert header.file_size == size
    assert header.data_start == 8 + header.header_len <= size
    for name, e in header.tensors.items():
        assert isinstance(name, str) and e.name == name
        assert e.dtype in DTYPES
        assert all(isinstance(d, int) and d >= 0 for d in e.shape)
        assert header.data_start <= e.start <= e.end <= size
        assert e.nbytes == e.numel * e.itemsize
    spans = sorted((e.start, e.end) for e in header.tensors.values() if e.nbytes)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "overlapping tensors accepted"
    if header.metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


@settings(FUZZ, max_examples=700)
@given(safetensors_bytes())
def test_read_header_fuzz(raw: bytes) -> None:
    path = _ROOT / "fuzz.safetensors"
    path.write_bytes(raw)
    check_read_header(path)


# The inputs that broke read_header before it was fixed, kept as plain regression cases.
_HEADER_REGRESSIONS = {
    "unhashable dtype": {"a": {"dtype": [], "shape": [], "data_offsets": [0, 0]}},
    "lone surrogate name": '{"\\ud800": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("case", sorted(_HEADER_REGRESSIONS))
def test_read_header_regressions(case: str) -> None:
    header = _HEADER_REGRESSIONS[case]
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path = _ROOT / "regression.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(4))
    with pytest.raises(InputError):
        read_header(path)
    check_read_header(path)


# --------------------------------------------------------------------------------------------------
# 1b. PyTorch .bin checkpoints (torch.save zip archives)


def _torch_saves() -> list[bytes]:
    """A few real torch.save files: dtypes, a view at an offset, a tied storage, a nested state_dict, a number,
    untyped storages."""
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    docs = [
        {"a": w, "b": w.to(torch.bfloat16), "row": w[1], "tied": w},
        {"state_dict": {"x": torch.ones(2, dtype=torch.int64), "y": torch.zeros(0)}},
        {"s": torch.tensor(3.0, dtype=torch.float16), "n": 1},
        *([{"f8": torch.ones(5).to(torch.float8_e4m3fn), "u": torch.ones(2, dtype=torch.uint16)}]  # _rebuild_tensor_v3
          if hasattr(torch, "float8_e4m3fn") and hasattr(torch, "uint16") else []),
    ]
    out = []
    for doc in docs:
        buf = io.BytesIO()
        torch.save(doc, buf)
        out.append(buf.getvalue())
    return out


_TORCH_SAVES = _torch_saves()


def _rezip(raw: bytes, pickle_bytes: bytes) -> bytes:
    """`raw`'s archive with its data.pkl replaced (a valid zip, so the unpickler sees the bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info))
    return buf.getvalue()


@st.composite
def torch_bin_bytes(draw: st.DrawFn) -> bytes:
    """A torch.save file, then perhaps damaged: its bytes anywhere, or its pickle (re-zipped with a valid CRC)."""
    raw = draw(st.sampled_from(_TORCH_SAVES))
    how = draw(st.integers(0, 5))
    if how == 0:
        return b"PK\x03\x04" + draw(st.binary(max_size=64))
    if how == 1:
        return raw[: draw(st.integers(0, len(raw)))]
    if how in (2, 3):
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1) if how == 2 else st.integers(0, 400))  # 3: the pickle, first
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        pkl = bytearray(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    if how == 4:
        for _ in range(draw(st.integers(1, 3))):
            pkl[draw(st.integers(0, len(pkl) - 1))] = draw(st.integers(0, 255))
    else:
        cut = draw(st.integers(0, len(pkl)))
        pkl = pkl[:cut] + draw(st.binary(max_size=8)) + pkl[cut:]
    return _rezip(raw, bytes(pkl))


def check_read_bin_header(path: Path) -> None:
    """The property: tensors that all lie inside the file, or an InputError naming the file."""
    header = _load_or_input_error("torch_bin", read_bin_header, path)
    if header is None:
        return
    size = path.stat().st_size
    for name, e in header.tensors.items():
        assert isinstance(name, str) and e.name == name and e.dtype in DTYPES
        assert all(isinstance(d, int) and d >= 0 for d in e.shape)
        assert 0 < e.start <= e.end <= size
        assert e.nbytes == e.numel * e.itemsize


@settings(FUZZ, max_examples=400)
@given(torch_bin_bytes())
def test_read_bin_header_fuzz(raw: bytes) -> None:
    path = _ROOT / "fuzz.bin"
    path.write_bytes(raw)
    check_read_bin_header(path)


# --------------------------------------------------------------------------------------------------
# 2. model directories


def _tiny_shard(names: list[str]) -> bytes:
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(4 * len(names))


_shard_files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "extra.safetensors"]
_shard_refs = st.sampled_from([
    *_shard_files, "missing.safetensors", "../x.safetensors", "", ".", "..", "a/b.safetensors", "a\x00b", "s\nx",
    "\ud800.safetensors",
])


@st.composite
def model_dirs(draw: st.DrawFn) -> dict[str, bytes]:
    """The files of a model directory: shards (some shared tensor names), perhaps an index and a config.json."""
    files: dict[str, bytes] = {}
    tensor_names = st.lists(st.sampled_from(["a", "b", "c", "model.layers.0.w", "\ud800"]), unique=True, max_size=3)
    for name in draw(st.lists(st.sampled_from(_shard_files), unique=True, max_size=3)):
        files[name] = _tiny_shard(draw(tensor_names)) if draw(st.integers(0, 4)) else draw(safetensors_bytes())
    layout = draw(st.sampled_from(["index", "index", "single", "glob"]))
    if layout == "single":
        files["model.safetensors"] = _tiny_shard(draw(tensor_names))
    elif layout == "index":
        how = draw(st.integers(0, 9))
        if how == 0:
            index: bytes = draw(st.binary(max_size=32))
        elif how == 1:
            index = json.dumps(draw(json_values)).encode()
        else:
            keys = st.sampled_from(["a", "b", "c", "d", "\ud800"])
            weight_map = draw(st.dictionaries(keys, _shard_refs | json_values))
            doc = {"metadata": draw(json_values), "weight_map": weight_map}
            index = json.dumps(doc).encode()
            if how == 2:
                index = index[: draw(st.integers(0, len(index)))]
        files["model.safetensors.index.json"] = index
    how = draw(st.integers(0, 5))
    if how == 1:
        files["config.json"] = draw(st.binary(max_size=16))
    elif how == 2:
        files["config.json"] = json.dumps(draw(json_values)).encode()
    elif how == 3:
        config = {"architectures": draw(json_values), "num_hidden_layers": draw(json_values), "torch_dtype": "x"}
        files["config.json"] = json.dumps(config).encode()
    return files


def _write_dir(files: dict[str, bytes]) -> Path:
    d = _fresh_dir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def check_open_model(path: Path) -> None:
    """The property: a model whose tensors all lie inside its files, or an InputError naming the directory."""
    model = _load_or_input_error("model_dir", open_model, path)
    if model is None:
        return
    assert isinstance(model, ModelIndex)
    for name, e in model.tensors.items():
        assert e.name == name and e.file in model.files
        assert e.file.parent == path
        assert 0 < e.start <= e.end <= e.file.stat().st_size
        assert e.nbytes == e.numel * e.itemsize
    assert model.config is None or isinstance(model.config, dict)


@settings(FUZZ, max_examples=250)
@given(model_dirs())
def test_open_model_fuzz(files: dict[str, bytes]) -> None:
    path = _write_dir(files)
    try:
        check_open_model(path)
    finally:
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------
# 3. config YAML

_MERGEKIT_KEYS = ["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "weight", "density",
                  "gamma", "epsilon", "lambda", "normalize", "rescale", "trim_scope", "int8_mask", "filter", "value",
                  "slices", "modules", "model", "tokenizer", "tokenizer_source", "source", "chat_template", "name",
                  "nuslerp_flatten", "nuslerp_row_wise"]
_yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**64])
    | st.floats()
    | st.sampled_from(["ties", "dare_ties", "linear", "task_arithmetic", "breadcrumbs", "slerp", "nuslerp", "bf16",
                       "torch.float16", "mlp", "*", "union", "base", "inverse", "tensor", "global", "./m", "a+b", "~",
                       "", " "])
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
)
_yaml_keys = st.sampled_from(_MERGEKIT_KEYS) | st.text(max_size=4) | st.integers(-2, 2) | st.none()
yaml_values = st.recursive(
    _yaml_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(_yaml_keys, c, max_size=4),
    max_leaves=14,
)
_config_docs = st.dictionaries(st.sampled_from(_MERGEKIT_KEYS[:6] + ["slices", "tokenizer", "name", "x"]), yaml_values)
_fragments = st.sampled_from([
    "merge_method: ", "ties", "base_model: ", "models:\n", "  - model: ./a\n", "    parameters: ", "{", "}", "[", "]",
    ", ", ": ", "\n", "  ", "- ", "density: ", "weight: ", "0.5", "1e-3", "._e5", "1_0e5", ".5e1", "0x1F", "0b2",
    "1:20", "2020-13-45", "2001-12-14t21:59:43.10-05:00", "!!binary AB=", "!!python/object:os.system", "!!float x",
    "&a ", "*a", "*b", "<<: ", "<<: *a", "? ", "|\n", ">-\n", "'", '"', '"\\x"', "%YAML 1.1\n", "---\n", "...\n", "#",
    "\t", "\x00", "\x85", "\ufeff", "é", "9" * 5000, "0x" + "F" * 4000, "[" * 2000,
    "dtype: ", "slices:\n", "nan", ".inf", "~", "null",
])


def check_load_config(path: Path) -> None:
    """The property: a MergeConfig, or an InputError naming the config file on every line."""
    cfg = _load_or_input_error("config", load_config, path)
    if cfg is None:
        return
    assert isinstance(cfg, MergeConfig)


@settings(FUZZ, max_examples=350)
@given(_config_docs)
def test_load_config_documents_fuzz(doc: dict) -> None:
    path = _ROOT / "fuzz.yml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    check_load_config(path)
    tried("config")
    try:  # the already-parsed mapping goes through the same validation
        assert isinstance(load_config(doc), MergeConfig)
    except InputError as e:
        _assert_input_error(e, "config")


@settings(FUZZ, max_examples=350)
@given(st.lists(_fragments | st.text(max_size=4), max_size=12).map("".join) | st.binary(max_size=40))
def test_load_config_text_fuzz(text: str | bytes) -> None:
    path = _ROOT / "fuzz-text.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_load_config(path)


# The inputs that broke load_config before it was fixed (ValueError, OverflowError, RecursionError, ReaderError).
_CONFIG_REGRESSIONS = {
    "control char": "\x1f",
    "nested": "[" * 3000,
    "int digits": "merge_method: " + "9" * 5000,
    "hex int": "merge_method: 0x" + "F" * 4000,
    "bad date": "merge_method: 2020-13-45",
    "bad float": "merge_method: ._e5",
    "weights overflow fsum": "merge_method: linear\nmodels:\n- {model: a, parameters: {weight: 1.7e308}}\n"
    "- {model: b, parameters: {weight: 1.7e308}}\nparameters: {normalize: true}",
    "huge weight": "merge_method: ties\nbase_model: b\nmodels:\n- model: e\n  parameters: {weight: 1" + "0" * 400 + "}",
}


@pytest.mark.parametrize("case", sorted(_CONFIG_REGRESSIONS))
def test_load_config_regressions(case: str) -> None:
    path = _ROOT / "regression.yml"
    path.write_text(_CONFIG_REGRESSIONS[case], encoding="utf-8")
    if case != "weights overflow fsum":  # a valid config: it used to crash with OverflowError, now it loads
        with pytest.raises(InputError):
            load_config(path)
    check_load_config(path)


# --------------------------------------------------------------------------------------------------
# 4. the CLI on broken inputs


def check_cli(*args: str) -> None:
    """The property: exit 0, or exit 2 with one-line `fusemerge: error:` messages; never a traceback."""
    tried("cli")
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and "internal error" not in result.output
    if result.exit_code == 2:
        assert result.stderr.strip(), "exit 2 without a message"


@settings(FUZZ, max_examples=60)
@given(model_dirs())
def test_cli_inspect_fuzz(files: dict[str, bytes]) -> None:
    path = _write_dir(files)
    try:
        check_cli("inspect", str(path))
    finally:
        shutil.rmtree(path)


@settings(FUZZ, max_examples=40)
@given(st.lists(_fragments, max_size=10).map("".join) | _config_docs.map(lambda d: yaml.safe_dump(d)))
def test_cli_plan_fuzz(text: str) -> None:
    path = _ROOT / "cli-fuzz.yml"
    path.write_text(text, encoding="utf-8")
    check_cli("plan", str(path))


def test_cli_broken_inputs_exit_2() -> None:
    d = _fresh_dir()
    cases = {
        "empty.yml": b"",
        "binary.yml": b"\xff\xfe\x00",
        "bad.yml": b"merge_method: ties\nmodels: [\n",
        "list.yml": b"- 1\n- 2\n",
        "huge.yml": b"merge_method: ties\nbase_model: b\nmodels:\n- model: e\n  parameters: {weight: 1"
        + b"0" * 400
        + b"}\n",
        "date.yml": b"merge_method: 2020-13-45\n",
        "nul.yml": b"merge_method: ties\x00\n",
    }
    for name, content in cases.items():
        (d / name).write_bytes(content)
        result = CliRunner().invoke(main, ["plan", str(d / name)])
        tried("cli")
        assert result.exit_code == 2, (name, result.output)
        assert "Traceback" not in result.output
    for name, content in {"x.safetensors": b"\x00" * 3, "y.safetensors": (2**64 - 1).to_bytes(8, "little")}.items():
        (d / name).write_bytes(content)
        result = CliRunner().invoke(main, ["inspect", str(d / name)])
        tried("cli")
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert str(d / name) in result.stderr
