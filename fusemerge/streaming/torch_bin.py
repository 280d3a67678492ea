"""PyTorch `.bin` checkpoints (`torch.save` of a state dict, e.g. `pytorch_model.bin`) read like safetensors.

Since torch 1.6, `torch.save` writes a zip archive with no compression: `<archive>/data.pkl` pickles the state
dict, and every tensor storage is a member `<archive>/data/<key>` whose raw bytes lie in the file as they are.
So a tensor is a byte range of the `.bin` file, exactly as in a safetensors file: `read_bin_header` returns the
same `TensorEntry`s (absolute byte offsets), and `ChunkReader` memory-maps and streams them unchanged. Nothing
is loaded, and no `torch.load` runs.

The pickle is not executed: a restricted unpickler accepts only the few names a state dict of plain tensors
uses (`torch._utils._rebuild_tensor_v2`, the typed storage classes, `collections.OrderedDict`) and builds
descriptors, not tensors; anything else (code, custom classes, quantized or sparse tensors) is refused. So
reading a `.bin` from an untrusted source is as safe as reading a safetensors file. Also refused, each with its
reason: the legacy non-zip format (torch < 1.6), compressed members, big-endian data and tensors whose elements
are not contiguous in row-major order (a saved transposed view). Tensors that share a storage (tied weights)
are entries over the same bytes.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fusemerge.errors import InputError
from fusemerge.streaming.safetensors_header import DTYPES, SafetensorsHeader, TensorEntry

ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 256 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length (30 bytes)

# torch's typed storage classes, as `torch.save` pickles them -> safetensors dtype code
STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "Float8_e4m3fnStorage": "F8_E4M3",
    "Float8_e5m2Storage": "F8_E5M2",
}


@dataclass(frozen=True)
class _Storage:
    """A `persistent_load`ed storage: its member key in the archive, dtype code and size in elements."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    """What `_rebuild_tensor_v2` would build: a view of `storage`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: str


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest) -> _Tensor:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None)`
    (and the older `_rebuild_tensor(storage, offset, size, stride)`), as a descriptor."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a plain saved storage")
    if not (_ints(size) and _ints(stride) and _ints((storage_offset,))):
        raise ValueError(f"a tensor of size {size!r}, stride {stride!r}, offset {storage_offset!r}")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _ints(values) -> bool:
    """Whether `values` is a tuple of non-negative ints (what sizes, strides and offsets are)."""
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


def _rebuild_parameter(data, *_rest):
    """`torch._utils._rebuild_parameter(data, requires_grad, hooks)`: an `nn.Parameter` is its data here."""
    return data


class _Refused(Exception):
    """The pickle names something a state dict of plain tensors does not need."""


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(code) for name, code in STORAGE_DTYPES.items() if code in DTYPES},
}


class _StateDictUnpickler(pickle._Unpickler):
    """Unpickles `data.pkl` into descriptors, resolving only the names in `_ALLOWED`.

    The pure-Python unpickler, not the C one: a damaged pickle must not make it allocate what a length or index
    in it claims (the C one sizes its memo by the largest index it is given, and preallocates counted bytes),
    so that memory stays bounded by the pickle's own size. The one opcode that still would (BYTEARRAY8) and the
    out-of-band buffers are taken out: a state dict uses neither. A 90 KB pickle of 800 tensors takes ~30 ms.
    """

    dispatch = {op: load for op, load in pickle._Unpickler.dispatch.items()
                if op not in (pickle.BYTEARRAY8[0], pickle.NEXT_BUFFER[0], pickle.READONLY_BUFFER[0])}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            name = f"{module}.{name}"
            raise _Refused(name if name.isprintable() else ascii(name)) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"storage type {storage_type!r}")
        if not (isinstance(key, str) and _ints((numel,))):
            raise ValueError(f"a storage {key!r} of {numel!r} elements")
        return _Storage(key, storage_type.dtype, numel)


def is_torch_zip(path: Path) -> bool:
    """Whether `path` starts like a zip archive (a `torch.save` file of torch >= 1.6)."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def read_bin_header(path: str | Path) -> SafetensorsHeader:
    """The tensors of the `torch.save` checkpoint at `path` as byte ranges of it, read from its zip directory and
    pickle only (a few KB). Raises `InputError` with every problem found.

    >>> read_bin_header("pytorch_model.bin").tensors["lm_head.weight"].shape  # doctest: +SKIP
    (32000, 4096)
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # closed by the `with f` below
        magic = f.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        if magic != ZIP_MAGIC:
            raise InputError(
                f"{path}: not a zip-format torch checkpoint (saved by torch < 1.6, or not a torch file): "
                "load it with torch and save it again with torch.save or as safetensors"
            )
        try:
            with zipfile.ZipFile(f) as zf:
                return _parse_archive(path, f, zf)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError,
                OSError) as e:
            # the zip's directory or a member's local header is damaged (NotImplementedError: an unknown
            # compression; RuntimeError: an encrypted member; OSError: an offset before the file's start, or the
            # disk failing under it)
            raise InputError(f"{path}: not a readable torch checkpoint (a damaged or truncated zip: "
                             f"{_one_line(e)})") from e


def _parse_archive(path: Path, f, zf: zipfile.ZipFile) -> SafetensorsHeader:
    members = {info.filename: info for info in zf.infolist()}
    pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise InputError(f"{path}: a zip file, but not a torch checkpoint (no <archive>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and zf.read(order).strip() != b"little":
        raise InputError(f"{path}: saved with big-endian byte order; load it with torch and save it again here")
    info = members[pickles[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise InputError(f"{path}: its data.pkl has {info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte limit "
                         "(a state dict's is a few hundred KB): not a state dict, or a damaged file")
    raw = zf.read(info)  # whole (and its CRC checked) before unpickling: the pickle reads from memory
    try:
        state = _StateDictUnpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        raise InputError(f"{path}: holds more than plain tensors (its pickle names {e}), which fusemerge does not "
                         "run; save the state dict of tensors alone, or convert it to safetensors") from e
    except Exception as e:  # a damaged pickle fails in many ways; each one means unreadable
        raise InputError(f"{path}: its data.pkl cannot be read as a state dict ({type(e).__name__}: "
                         f"{_one_line(e)})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's weights (what mergekit also accepts)
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")

    problems: list[str] = []
    offsets: dict[str, tuple[int, int]] = {}  # storage key -> (absolute data offset, bytes)
    tensors: dict[str, TensorEntry] = {}
    for name, value in state.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(name, str):
            problems.append(f"{path}: key {name!r} is not a tensor name (a string)")
            continue
        if not isinstance(value, _Tensor):
            problems.append(f"{where}: is a {type(value).__name__}, not a tensor")
            continue
        storage = value.storage
        if storage.key not in offsets:
            info = members.get(f"{prefix}data/{storage.key}")
            if info is None:
                problems.append(f"{where}: its storage {prefix}data/{storage.key} is not in the archive")
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                problems.append(f"{where}: its storage is compressed in the zip; save it again with torch.save")
                continue
            offsets[storage.key] = (_data_offset(f, info), info.file_size)
        start, size = offsets[storage.key]
        itemsize = DTYPES[storage.dtype][1]
        numel = math.prod(value.shape)
        if numel and not _dense(value.shape, value.stride):
            problems.append(f"{where}: saved as a non-contiguous view (shape {list(value.shape)}, stride "
                            f"{list(value.stride)}); save .contiguous() tensors, or convert to safetensors")
            continue
        first, nbytes = value.offset * itemsize, numel * itemsize
        if value.offset < 0 or first + nbytes > min(size, storage.numel * itemsize):
            problems.append(f"{where}: elements [{value.offset}, {value.offset + numel}) run past its storage "
                            f"of {size // itemsize}")
            continue
        tensors[name] = TensorEntry(name, storage.dtype, value.shape, path, start + first, start + first + nbytes)
    if problems:
        raise InputError(problems)
    file_size = f.seek(0, 2)
    return SafetensorsHeader(path, 0, 0, file_size, tensors, None)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Absolute offset of the first byte of a stored member's data: after its local header, whose name and
    extra field lengths may differ from the central directory's."""
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) < _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"member {info.filename} is cut short")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != ZIP_MAGIC:
        raise zipfile.BadZipFile(f"bad local header of member {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a view's elements are contiguous in row-major order: its strides are row-major ones, except maybe
    on dimensions of size 1 (whose stride is never used)."""
    return len(stride) == len(shape) and all(
        s == r for d, s, r in zip(shape, stride, _row_major(shape), strict=True) if d != 1)
