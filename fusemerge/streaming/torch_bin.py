"""PyTorch `.bin` checkpoints (`torch.save` of a state dict, e.g. `pytorch_model.bin`) read like safetensors.

Since torch 1.6, `torch.save` writes a zip archive with no compression: `<archive>/data.pkl` pickles the state
dict, and every tensor storage is a member `<archive>/data/<key>` whose raw bytes lie in the file as they are.
So a tensor is a byte range of the `.bin` file, exactly as in a safetensors file: `read_bin_header` returns the
same `TensorEntry`s (absolute byte offsets), and `ChunkReader` memory-maps and streams them unchanged. Nothing
is loaded, and no `torch.load` runs.

The pickle is not executed. A restricted unpickler resolves only the names a state dict of plain tensors uses
(`torch._utils._rebuild_tensor_v2` / `_v3`, the storage classes, the dtypes, `collections.OrderedDict`) and
builds descriptors from them, not tensors; any other name (code, modules, custom classes, quantized or sparse
tensors) is refused, and so is setting state on anything but an `OrderedDict` (pickle's BUILD; a state dict's
`_metadata`, which is dropped). Its work is bounded: only the opcodes torch.save writes run, calls take a short
tuple, dict keys are strings or ints, at most OPS_PER_MEMBER opcodes run per member of the zip, and every size,
stride and offset must be an int64; so no opcode costs more than what the ones before it pushed.
Also refused, each with its reason: the legacy non-zip format (torch < 1.6), compressed members, big-endian
data, dtypes fusemerge does not read (complex, the float8 `fnuz` kinds) and tensors whose elements are not
contiguous in row-major order (a saved transposed view). Tensors that share a storage (tied weights) are entries
over the same bytes.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fusemerge.errors import InputError
from fusemerge.streaming.safetensors_header import DTYPES, SafetensorsHeader, TensorEntry

ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 64 << 20  # a state dict's data.pkl is ~110 bytes a tensor (90 KB for 800)
OPS_PER_MEMBER = 256  # torch.save's pickle takes ~20-30 opcodes a tensor (a storage member each), ~10 a module
MAX_DIMS = 64
MAX_PROBLEMS = 20  # reported per file
_INT64 = 1 << 63
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length (30 bytes)

# torch's typed storage classes, as `torch.save` pickles them for the dtypes it has had long -> safetensors code
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
}
# the dtypes `_rebuild_tensor_v3` names (float8, uint16-64: saved as an untyped storage and a torch.<dtype>)
TORCH_DTYPES = {str(torch_dtype).removeprefix("torch."): code for code, (torch_dtype, _) in DTYPES.items()}
UNREAD_DTYPES = {"ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "complex32": "complex32",
                 "complex64": "complex64", "complex128": "complex128", "float8_e4m3fnuz": "float8_e4m3fnuz",
                 "float8_e5m2fnuz": "float8_e5m2fnuz", "ComplexHalfStorage": "complex32"}


@dataclass(frozen=True)
class _Storage:
    """A `persistent_load`ed storage: its member key in the archive, dtype code (None: untyped, bytes) and
    size in bytes."""

    key: str
    dtype: str | None
    nbytes: int


@dataclass(frozen=True)
class _Tensor:
    """What `_rebuild_tensor_v2` / `_v3` would build: a view of `storage` (offset in elements of `dtype`)."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StorageType:
    """A storage class the pickle named (`torch.FloatStorage`, `torch.storage.UntypedStorage`): its dtype code,
    None for untyped. A new one at each GLOBAL, so that nothing a pickle does reaches the next file."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None):
        self.dtype = dtype


class _Dtype:
    """A `torch.<dtype>` the pickle named (for `_rebuild_tensor_v3`)."""

    __slots__ = ("code",)

    def __init__(self, code: str):
        self.code = code


class _Refused(Exception):
    """The pickle names or does something a state dict of plain tensors does not."""


class _Unread(Exception):
    """The pickle holds a tensor of a dtype fusemerge does not read."""


class _TooLarge(Exception):
    """The pickle runs more opcodes than a state dict of its archive's size could."""


def _ints(values: object) -> bool:
    """Whether `values` is a tuple of at most MAX_DIMS int64 values >= 0 (what sizes, strides and offsets are)."""
    return (isinstance(values, tuple) and len(values) <= MAX_DIMS
            and all(type(v) is int and 0 <= v < _INT64 for v in values))


def _tensor(storage, offset, size, stride, dtype: str) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a plain saved storage")
    if not (_ints(size) and _ints(stride) and _ints((offset,))) or len(size) != len(stride):
        raise ValueError("a tensor whose size, stride or offset is not int64s")
    return _Tensor(storage, dtype, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, *_rest) -> _Tensor:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None)`
    (and the older `_rebuild_tensor(storage, offset, size, stride)`), as a descriptor."""
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise _Refused("a tensor whose storage is not a typed saved storage")
    return _tensor(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, _requires_grad, _hooks, dtype, *_rest) -> _Tensor:
    """`torch._utils._rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata)`:
    an untyped storage and the dtype (torch >= 2.1 saves float8 and uint16-64 tensors so)."""
    if not isinstance(dtype, _Dtype):
        raise _Refused("a tensor whose dtype is not a torch dtype")
    return _tensor(storage, offset, size, stride, dtype.code)


def _rebuild_parameter(data, *_rest):
    """`torch._utils._rebuild_parameter(data, requires_grad, hooks)`: an `nn.Parameter` is its data here."""
    return data


_CALLABLE = (collections.OrderedDict, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _allowed(module: str, name: str):
    """What the pickle gets for the global `module.name`, made anew; raises _Refused / _Unread otherwise."""
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_tensor_v3":
        return _rebuild_tensor_v3
    if module == "torch._utils" and name == "_rebuild_parameter":
        return _rebuild_parameter
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(STORAGE_DTYPES[name])
    if module == "torch.storage" and name == "UntypedStorage":
        return _StorageType(None)
    if module == "torch" and name in TORCH_DTYPES:
        return _Dtype(TORCH_DTYPES[name])
    if module == "torch" and name in UNREAD_DTYPES:
        raise _Unread(UNREAD_DTYPES[name])
    full = f"{module}.{name}"
    raise _Refused(full if full.isprintable() else ascii(full))


# The opcodes `torch.save` writes (protocols 2-5), and the wider integer and memo forms of those: no others run,
# so no opcode does work beyond its own arguments (no copy of a container, no object made from a class).
OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1",
    "BININT2", "LONG1", "NEWFALSE", "NEWTRUE", "NONE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
})
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
MAX_REDUCE_ARGS = 8  # _rebuild_tensor_v3's, with its metadata


def _refuse_opcode(name: str):
    def refuse(self):
        raise _Refused(f"the opcode {name}, which torch.save does not write")
    return refuse


def _check_keys(keys) -> None:
    """Dict keys must be strings or ints: a tuple's hash recurses as deep as it nests (a crash of the C stack)."""
    if not all(type(k) is str or type(k) is int for k in keys):
        raise _Refused("a dict key that is not a string or an int")


def _counted(load):
    """`load` (one opcode's method of pickle's unpickler), counted against the unpickler's budget."""
    def step(self):
        self.ops_left -= 1
        if self.ops_left < 0:
            raise _TooLarge
        load(self)
    return step


class _StateDictUnpickler(pickle._Unpickler):
    """Unpickles `data.pkl` into descriptors, resolving only the names `_allowed` gives, in at most `max_ops`
    opcodes.

    The pure-Python unpickler, not the C one: a damaged pickle must not make it allocate what a length or index
    in it claims (the C one sizes its memo by the largest index it is given, and preallocates counted bytes).
    Only the OPCODES run; REDUCE calls only the allowed functions, with a tuple of at most MAX_REDUCE_ARGS
    arguments (an OrderedDict with none), and dict keys are strings or ints (never a tuple, whose hash recurses
    as deep as it nests), so each opcode's cost is bounded by what the earlier ones pushed. A 90 KB pickle of
    800 tensors takes ~30 ms.
    """

    dispatch = {op: _counted(load) if _OPCODE_NAMES[op] in OPCODES else _refuse_opcode(_OPCODE_NAMES[op])
                for op, load in pickle._Unpickler.dispatch.items()}

    def __init__(self, file, max_ops: int):
        super().__init__(file)
        self.ops_left = max_ops

    def find_class(self, module: str, name: str):
        return _allowed(module, name)

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if type(args) is not tuple or len(args) > MAX_REDUCE_ARGS:
            raise _Refused("a call with other than a short tuple of arguments (pickle REDUCE)")
        if func is collections.OrderedDict and args:
            raise _Refused("an OrderedDict made from another object (pickle REDUCE)")
        if not any(func is f for f in _CALLABLE):
            raise _Refused("a call of something other than a tensor rebuild (pickle REDUCE)")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = _counted(load_reduce)

    def load_setitem(self):
        _check_keys(self.stack[-2:-1])
        pickle._Unpickler.load_setitem(self)

    dispatch[pickle.SETITEM[0]] = _counted(load_setitem)

    def load_setitems(self):
        _check_keys(self.stack[0::2])  # the items since the MARK (the stack before it is on the metastack)
        pickle._Unpickler.load_setitems(self)

    dispatch[pickle.SETITEMS[0]] = _counted(load_setitems)

    def load_build(self):
        """BUILD sets an object's state: allowed on an OrderedDict alone (a state dict's `_metadata`, dropped)."""
        state = self.stack.pop()
        if type(self.stack[-1]) is not collections.OrderedDict or not isinstance(state, dict):
            raise _Refused("state set on an object (pickle BUILD)")

    dispatch[pickle.BUILD[0]] = _counted(load_build)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused("a persistent id other than a storage's")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Refused("a storage of another type")
        if not (isinstance(key, str) and _ints((numel,))):
            raise ValueError("a storage whose key is not a string or whose size is not an int64")
        itemsize = DTYPES[storage_type.dtype][1] if storage_type.dtype is not None else 1
        return _Storage(key, storage_type.dtype, numel * itemsize)


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


def _read_stored(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A small member's bytes, read whole (its CRC checked); it must be stored (torch.save compresses nothing)
    and at most `limit` bytes."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(f"{path}: its {info.filename} is compressed, which torch.save never does: not a torch "
                         "checkpoint, or a repacked one; save it again with torch.save")
    if info.file_size > limit:
        raise InputError(f"{path}: its {info.filename} has {info.file_size} bytes, over the {limit}-byte limit: "
                         "not a torch checkpoint of a state dict, or a damaged file")
    return zf.read(info)


def _unpickle(path: Path, raw: bytes, members: int):
    try:
        return _StateDictUnpickler(io.BytesIO(raw), OPS_PER_MEMBER * (members + 64)).load()
    except _Refused as e:
        raise InputError(f"{path}: holds more than plain tensors (its pickle has {e}), which fusemerge does not "
                         "run; save the state dict of tensors alone, or convert it to safetensors") from e
    except _Unread as e:
        raise InputError(f"{path}: holds {e} tensors, a dtype fusemerge does not read") from e
    except _TooLarge as e:
        raise InputError(f"{path}: its data.pkl runs more than {OPS_PER_MEMBER} steps per stored tensor, far more "
                         "than a state dict's: not a state dict, or a damaged file") from e
    except Exception as e:  # a damaged pickle fails in many ways; each one means unreadable
        raise InputError(f"{path}: its data.pkl cannot be read as a state dict ({type(e).__name__}: "
                         f"{_one_line(e)})") from e


def _parse_archive(path: Path, f, zf: zipfile.ZipFile) -> SafetensorsHeader:
    members = {info.filename: info for info in zf.infolist()}
    pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise InputError(f"{path}: a zip file, but not a torch checkpoint (no <archive>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and _read_stored(path, zf, order, 16).strip() != b"little":
        raise InputError(f"{path}: saved with big-endian byte order; load it with torch and save it again here")
    state = _unpickle(path, _read_stored(path, zf, members[pickles[0]], MAX_PICKLE_BYTES), len(members))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's weights (what mergekit also accepts)
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")

    file_size = f.seek(0, 2)
    # where each stored member's data must end: before the next member's local header, or the zip directory
    bounds = sorted({i.header_offset for i in members.values()} | {zf.start_dir})
    problems: list[str] = []
    offsets: dict[str, tuple[int, int]] = {}  # storage key -> (absolute data offset, bytes)
    tensors: dict[str, TensorEntry] = {}
    for name, value in state.items():
        if len(problems) >= MAX_PROBLEMS:
            break
        if not isinstance(name, str):
            problems.append(f"{path}: a key of type {type(name).__name__} is not a tensor name (a string)")
            continue
        where = f"{path}: tensor {name!r}"
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
            start = _data_offset(f, info)
            if start + info.file_size > file_size:
                problems.append(f"{path}: truncated: the storage of tensor {name!r} ends at byte "
                                f"{start + info.file_size} but the file has {file_size} bytes")
                continue
            limit = next((b for b in bounds if b > info.header_offset), file_size)
            if start + info.file_size > limit:
                problems.append(f"{where}: its storage runs into the zip's next header (byte {limit}): a damaged "
                                "zip directory")
                continue
            offsets[storage.key] = (start, min(info.file_size, storage.nbytes))
        start, size = offsets[storage.key]
        itemsize = DTYPES[value.dtype][1]
        numel = math.prod(value.shape)
        first, nbytes = value.offset * itemsize, numel * itemsize
        if first + nbytes > size:
            span = (f"elements [{value.offset}, {value.offset + numel})" if value.offset + numel < _INT64
                    else "more elements than an int64 counts")
            problems.append(f"{where}: {span} run past its storage of {size // itemsize}")
            continue
        if numel and not _dense(value.shape, value.stride):
            problems.append(f"{where}: saved as a non-contiguous view (shape {list(value.shape)}, stride "
                            f"{list(value.stride)}); save .contiguous() tensors, or convert to safetensors")
            continue
        tensors[name] = TensorEntry(name, value.dtype, value.shape, path, start + first, start + first + nbytes)
    if len(problems) >= MAX_PROBLEMS:
        problems.append(f"{path}: (the first {MAX_PROBLEMS} problems; there may be more)")
    if problems:
        raise InputError(problems)
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
    on dimensions of size 1 (whose stride is never used). Called once the elements are known to fit a storage,
    so the products stay small."""
    return all(s == r for d, s, r in zip(shape, stride, _row_major(shape), strict=True) if d != 1)
