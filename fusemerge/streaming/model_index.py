"""A model on disk as one map: tensor name -> (file, dtype, shape, byte range), over however many shards it has.

Shard boundaries differ between models (a base in 2 shards, a fine-tune in 4): nothing downstream looks at
`files`, only at `tensors`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fusemerge.errors import InputError, raise_if
from fusemerge.streaming.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from fusemerge.streaming.torch_bin import read_bin_header

SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"  # torch.save checkpoints (streaming/torch_bin.py), when there is no safetensors file
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class ModelIndex:
    """Every tensor of one model. `path` is what the user gave; `config` is the parsed config.json, if any;
    `index` the index file its shards were found through, if any (of the two a directory may hold, the one
    read)."""

    path: Path
    files: list[Path]
    tensors: dict[str, TensorEntry]
    config: dict | None
    index: Path | None = None

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(e.numel for e in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Total bytes of tensor data over all tensors."""
        return sum(e.nbytes for e in self.tensors.values())

    def dtype_counts(self) -> dict[str, int]:
        """Number of tensors per safetensors dtype code, most common first, e.g. `{"BF16": 290, "F32": 1}`."""
        return dict(Counter(e.dtype for e in self.tensors.values()).most_common())


def open_model(path: str | os.PathLike) -> ModelIndex:
    """Index the model at `path`: a directory, or a single `.safetensors` or `.bin` file. Reads headers only.

    A directory holds `model.safetensors`; else the shards listed in `model.safetensors.index.json`
    (`weight_map`: tensor -> shard file name); else any `*.safetensors` files; else, the same way, PyTorch
    checkpoints: `pytorch_model.bin`, the shards of `pytorch_model.bin.index.json`, or shards named
    `pytorch_model-00001-of-00002.bin` (never other `.bin` files, such as `training_args.bin`). Tensors present
    in a listed shard but missing from `weight_map` are included, as transformers loads whole shards. Raises
    `InputError` with every problem found over all shards and config.json.

    >>> model = open_model("models/llama-7b")  # doctest: +SKIP
    >>> model.num_parameters, model.dtype_counts()  # doctest: +SKIP
    (6738415616, {'BF16': 291})
    """
    path = Path(path)
    problems: list[str] = []
    files, weight_map, index_name = _weight_files(path, problems)
    headers: dict[Path, SafetensorsHeader] = {}
    for file in files:
        try:
            headers[file] = read_bin_header(file) if file.suffix == ".bin" else read_header(file)
        except InputError as e:
            problems += e.problems

    tensors: dict[str, TensorEntry] = {}
    for header in headers.values():
        for name, entry in header.tensors.items():
            if name in tensors:
                problems.append(f"{entry.file}: tensor {name!r} is also in {tensors[name].file}; which one is meant?")
            else:
                tensors[name] = entry
    if weight_map is not None:
        for name, shard in weight_map.items():
            header = headers.get(path / shard)
            if header is not None and name not in header.tensors:
                problems.append(f"{path / index_name}: maps tensor {name!r} to {shard!r}, which has no such tensor")

    config = _read_config((path if path.is_dir() else path.parent) / CONFIG_NAME, problems)
    raise_if(problems)
    return ModelIndex(path, list(headers), tensors, config, path / index_name if weight_map is not None else None)


def _hub_hint(path: Path) -> str:
    """What a missing model path that reads like a Hugging Face Hub id (`org/name`, mergekit's `@revision`) is."""
    rel = os.path.relpath(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", rel) and not rel.startswith("."):
        name, _, rev = rel.partition("@")
        return (f" (if it is a Hugging Face Hub id{f' at revision {rev!r}' if rev else ''}: fusemerge reads "
                f"local files only and downloads nothing; download it first, e.g. `huggingface-cli download {name}"
                f"{f' --revision {rev}' if rev else ''} --local-dir DIR`, and give DIR)")
    if "@" in path.name:
        return (f" ({path.name.partition('@')[0]!r} at a revision is mergekit's `path@revision`, for Hub models; "
                "give the directory of that revision's files)")
    return ""


def _weight_files(path: Path, problems: list[str]) -> tuple[list[Path], dict[str, str] | None, str]:
    """The weight files of the model at `path`, the index's weight_map if the model has one, and that index's
    file name. Safetensors files first; PyTorch `.bin` checkpoints only where there is no safetensors file.

    Raises `InputError` when there is nothing to read; records other problems (missing shards) and goes on.
    """
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise InputError(f"{path}: not a .safetensors or .bin file nor a model directory")
        return [path], None, INDEX_NAME
    if not path.exists():
        raise InputError(f"{path}: no such file or directory{_hub_hint(path)}")
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise InputError(f"{path}: cannot read directory: {e.strerror or e}") from e

    formats = [(SINGLE_FILE_NAME, INDEX_NAME, _SHARD_RE), (BIN_NAME, BIN_INDEX_NAME, _BIN_SHARD_RE)]
    for single, index, pattern in formats:
        if single in names and (path / single).is_file():
            return [path / single], None, index
        if index in names:
            weight_map = _read_weight_map(path / index)
            files = []
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    problems.append(f"{path / index}: shard {shard!r} is not a plain file name")
                elif not (path / shard).is_file():
                    problems.append(f"{path / index}: names shard {shard!r}, which does not exist in {path}")
                else:
                    files.append(path / shard)
            return files, weight_map, index
        if pattern is _SHARD_RE:
            files = [path / name for name in names if name.endswith(".safetensors") and (path / name).is_file()]
        else:  # only pytorch_model-*-of-*.bin: other .bin files are not weights (training_args.bin, optimizer.bin)
            files = [path / name for name in names if pattern.match(name) and (path / name).is_file()]
        if files:
            problems.extend(_missing_shards(path, [f.name for f in files], pattern, index))
            return files, None, index
    raise InputError(f"{path}: no {SINGLE_FILE_NAME}, {INDEX_NAME} or other .safetensors file in this directory "
                     f"(nor {BIN_NAME} or {BIN_INDEX_NAME})")


_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.safetensors)$")
_BIN_SHARD_RE = re.compile(r"^(?P<stem>pytorch_model)-(?P<i>\d+)-of-(?P<n>\d+)(?P<ext>\.bin)$")


def _missing_shards(path: Path, names: list[str], pattern: re.Pattern = _SHARD_RE,
                    index: str = INDEX_NAME) -> list[str]:
    """Without an index, the shards that names like model-00002-of-00003.safetensors (`pattern`) say should be
    there and are not (an interrupted download): one line per set of shards."""
    sets: dict[tuple[str, str], set[int]] = {}
    width: dict[tuple[str, str], int] = {}
    ext = ""
    for name in names:
        m = pattern.match(name)
        if m:
            key = (m["stem"], m["n"])
            sets.setdefault(key, set()).add(int(m["i"]))
            width[key] = len(m["i"])
            ext = m["ext"]
    problems = []
    for (stem, n), present in sets.items():
        first = 0 if 0 in present else 1  # some tools count shards from 0 (model-00000-of-00002)
        beyond = sorted(i for i in present if i >= first + int(n))
        if beyond:
            problems.append(f"{path}: {stem}-{beyond[0]:0{width[stem, n]}d}-of-{n}{ext} is beyond its set of "
                            f"{int(n)} (a stray shard of another download?)")
        absent = [i for i in range(first, first + int(n)) if i not in present]
        if absent and int(n) <= 100_000:
            names_absent = ", ".join(f"{stem}-{i:0{width[stem, n]}d}-of-{n}{ext}" for i in absent[:3])
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            problems.append(f"{path}: shard(s) {names_absent}{more} missing ({len(present)} of {int(n)} present, "
                            f"and no {index})")
    return problems


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The `weight_map` of a `model.safetensors.index.json`; raises `InputError` if the file is malformed."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{index_path}: cannot read: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{index_path}: not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: must be an object with a \"weight_map\" of tensor name -> shard file name")
    if not weight_map:
        raise InputError(f"{index_path}: weight_map is empty")
    return weight_map


def _read_config(config_path: Path, problems: list[str]) -> dict | None:
    """The parsed config.json, None if there is none; records a problem if it cannot be read or parsed."""
    if not config_path.exists():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as e:
        problems.append(f"{config_path}: cannot read: {e.strerror or e}")
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{config_path}: not valid JSON: {e}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{config_path}: must be a JSON object, got a {type(config).__name__}")
        return None
    return config
