"""PyTorch `.bin` checkpoints (torch.save zip archives) are read in place, as byte ranges, like safetensors.

The files here are written by `torch.save` itself, so the reader is checked against the real format: every
tensor read back equals what was saved, a merge of a family saved as `.bin` (single file, sharded with an index,
sharded without one) writes the bytes of the same family's merge from safetensors, and what the reader does
not run (arbitrary pickles, legacy files, non-contiguous views) is refused with the reason.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import fusemerge
from fusemerge.errors import InputError
from fusemerge.streaming.journal import sampled_digest
from fusemerge.streaming.model_index import open_model
from fusemerge.streaming.reader import ChunkReader
from fusemerge.streaming.torch_bin import read_bin_header
from fusemerge.synthetic import make_llama_family, save_as_bin, write_config_yaml

SHAPE = dict(hidden=20, intermediate=52, layers=2, vocab=97)


class NotATensor:
    """A class the restricted unpickler must refuse to build (torch.save pickles it by reference)."""


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    model = open_model(path)
    with ChunkReader() as reader:
        return {name: reader.read_tensor(entry) for name, entry in model.tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                                   # saved as an untyped storage with the dtype (torch._utils._rebuild_tensor_v3)
                                   *[getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "uint16",
                                                                        "uint32", "uint64") if hasattr(torch, name)]])
def test_every_tensor_reads_back_as_saved(tmp_path, dtype) -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(11, 13, generator=g) * 50
    if dtype == torch.bool:
        value = base > 0
    elif dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or not dtype.is_floating_point:
        value = base.abs().to(torch.int64).to(dtype) if dtype.is_signed is False else base.to(dtype)
    else:
        value = base.to(dtype)
    state = {
        "w": value,
        "scalar": value[0, 0].clone(),
        "empty": value[:0].clone(),
        "row": value[3],  # a view into w's storage at an element offset
        "tail": value.reshape(-1)[5:100],
        "column": value[:1].t(),  # shape (13, 1), strides (1, 13): odd only on a size-1 dimension, so dense
    }
    state["tied"] = state["w"]  # one storage, two names
    torch.save(state, tmp_path / "pytorch_model.bin")
    got = _read_all(tmp_path)
    assert set(got) == set(state)
    for name, want in state.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    entries = open_model(tmp_path).tensors
    assert (entries["tied"].start, entries["tied"].end) == (entries["w"].start, entries["w"].end)


def test_parameters_and_a_nested_state_dict_are_read(tmp_path) -> None:
    layer = torch.nn.Linear(3, 2)
    torch.save({"weight": layer.weight, "bias": layer.bias}, tmp_path / "a.bin")  # nn.Parameter objects
    torch.save({"state_dict": layer.state_dict()}, tmp_path / "b.bin")  # a training checkpoint's weights
    for name in ("a.bin", "b.bin"):
        got = _read_all(tmp_path / name)
        assert torch.equal(got["weight"], layer.weight.detach()) and torch.equal(got["bias"], layer.bias.detach())


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict]:
    """The same family twice: as safetensors, and as .bin (base one file, experts sharded with and without an
    index)."""
    out = {}
    for name in ("st", "bin"):
        out[name] = make_llama_family(tmp_path_factory.mktemp(name), n_experts=3, seed=5, shard_bytes=6000,
                                      expert_shard_bytes=[6000, None, 9000], **SHAPE)
    fam = out["bin"]
    save_as_bin(fam["base"], "single")
    save_as_bin(fam["experts"][0], "index")
    save_as_bin(fam["experts"][1], "single")
    save_as_bin(fam["experts"][2], "shards")
    assert len(list(fam["experts"][2].glob("pytorch_model-*.bin"))) > 1
    return out


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("method, opts", [
    ("ties", dict(workers=1)),
    ("ties", dict(workers=2, max_memory="64KiB")),
    ("dare_ties", dict(workers=1)),
    ("task_arithmetic", dict(workers=1, backend="triton", max_memory="64KiB")),
])
def test_a_bin_family_merges_like_its_safetensors_copy(families, tmp_path, method, opts) -> None:
    if opts.get("backend") == "triton" and torch.cuda.is_available():
        pytest.skip("the Triton backend on device cpu needs the interpreter")
    outs = {}
    for name, fam in families.items():
        cfg = tmp_path / f"{name}.yml"
        params = dict(density=0.4) if method != "task_arithmetic" else {}
        write_config_yaml(cfg, method, fam["base"], fam["experts"], weight=(1.0, 0.6, 1.3), **params)
        outs[name] = tmp_path / f"out-{name}"
        fusemerge.run(cfg, outs[name], device="cpu", **opts)
    assert _shards(outs["bin"]) and _shards(outs["bin"]) == _shards(outs["st"])


def test_a_bin_merge_resumes_and_notices_rewritten_inputs(families, tmp_path) -> None:
    fam = families["bin"]
    cfg = tmp_path / "c.yml"
    write_config_yaml(cfg, "ties", fam["base"], fam["experts"], density=0.4)
    out = tmp_path / "out"
    fusemerge.run(cfg, out, device="cpu")
    digest = sampled_digest(fam["base"] / "pytorch_model.bin")
    assert len(digest) == 64
    fusemerge.run(cfg, out, device="cpu", resume=True)  # finished: nothing to do
    # the base saved again with one value changed: same size, other data
    state = torch.load(fam["base"] / "pytorch_model.bin", weights_only=True)
    name = next(iter(state))
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1
    torch.save(state, fam["base"] / "pytorch_model.bin")
    assert sampled_digest(fam["base"] / "pytorch_model.bin") != digest
    with pytest.raises(InputError, match="modified after"):
        fusemerge.run(cfg, out, device="cpu", resume=True)


def test_safetensors_are_preferred_and_other_bin_files_ignored(tmp_path) -> None:
    fam = make_llama_family(tmp_path, n_experts=1, **SHAPE)
    torch.save({"only.in.bin": torch.zeros(2)}, fam["base"] / "pytorch_model.bin")
    torch.save({"lr": torch.zeros(1)}, fam["experts"][0] / "training_args.bin")
    assert "only.in.bin" not in open_model(fam["base"]).tensors  # model.safetensors wins, as in mergekit
    save_as_bin(fam["experts"][0], "single")
    (fam["experts"][0] / "pytorch_model.bin").rename(fam["experts"][0] / "weights.bin")
    with pytest.raises(InputError, match="nor pytorch_model.bin"):
        open_model(fam["experts"][0])  # training_args.bin and weights.bin are not taken as the model


def test_a_missing_bin_shard_is_named(tmp_path) -> None:
    fam = make_llama_family(tmp_path, n_experts=1, shard_bytes=6000, **SHAPE)
    save_as_bin(fam["base"], "shards")
    victim = sorted(fam["base"].glob("pytorch_model-*.bin"))[1]
    victim.unlink()
    with pytest.raises(InputError, match=f"{victim.name} missing .*no pytorch_model.bin.index.json"):
        open_model(fam["base"])


def test_what_is_not_a_state_dict_of_plain_tensors_is_refused(tmp_path) -> None:
    cases = {
        "code.bin": ({"w": torch.zeros(2), "x": NotATensor()}, "its pickle has tests.test_torch_bin.NotATensor"),
        "module.bin": (torch.nn.Linear(2, 2), "its pickle has torch.nn.modules.linear.Linear"),
        "view.bin": ({"w": torch.zeros(4, 3).t()}, r"tensor 'w': saved as a non-contiguous view \(shape \[3, 4\]"),
        "number.bin": ({"w": torch.zeros(2), "step": 3}, "tensor 'step': is a int, not a tensor"),
        "list.bin": ([torch.zeros(2)], "holds a list, not a state dict"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError, match=message):
            read_bin_header(tmp_path / name)


def test_legacy_and_damaged_files_are_refused(tmp_path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="not a zip-format torch checkpoint"):
        read_bin_header(tmp_path / "legacy.bin")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "cut.bin")
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged or truncated zip"):
        read_bin_header(tmp_path / "cut.bin")
    with zipfile.ZipFile(tmp_path / "other.bin", "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(InputError, match="not a torch checkpoint"):
        read_bin_header(tmp_path / "other.bin")


def test_a_compressed_storage_is_refused(tmp_path) -> None:
    torch.save({"w": torch.arange(100.0)}, tmp_path / "plain.bin")
    with zipfile.ZipFile(tmp_path / "plain.bin") as src, zipfile.ZipFile(tmp_path / "deflated.bin", "w") as dst:
        for info in src.infolist():
            how = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=how)
    with pytest.raises(InputError, match="tensor 'w': its storage is compressed in the zip"):
        read_bin_header(tmp_path / "deflated.bin")


def test_the_unpickler_runs_no_code(tmp_path, monkeypatch) -> None:
    """A pickle that would call os.system when torch.load(weights_only=False) ran it is refused unread."""
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "good.bin")

    class Exploit:
        def __reduce__(self):
            return (eval, ("__import__('os').system('touch PWNED')",))

    with zipfile.ZipFile(tmp_path / "good.bin") as src, zipfile.ZipFile(tmp_path / "evil.bin", "w") as dst:
        for info in src.infolist():
            body = pickle.dumps(Exploit(), protocol=2) if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info.filename, body)
    with pytest.raises(InputError, match=r"its pickle has (__builtin__|builtins)\.eval"):
        read_bin_header(tmp_path / "evil.bin")
    assert not (tmp_path / "PWNED").exists()


def _with_pickle(src: Path, dst: Path, body: bytes) -> None:
    """`src` (a torch.save file) with its data.pkl replaced by `body`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, body if info.filename.endswith("/data.pkl") else zin.read(info))


def test_a_pickle_cannot_change_how_other_files_are_read(tmp_path) -> None:
    """pickle's BUILD sets an object's state: on a storage type it would change the dtype every later file's
    tensors of that type are read as. Refused, and a clean file read after it reads as saved."""
    torch.save({"w": torch.arange(6, dtype=torch.float16)}, tmp_path / "clean.bin")
    poison = (b"\x80\x02ctorch\nHalfStorage\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00BF16sb0"
              b"}X\x01\x00\x00\x00aK\x01s.")
    _with_pickle(tmp_path / "clean.bin", tmp_path / "poison.bin", poison)
    with pytest.raises(InputError, match=r"state set on an object \(pickle BUILD\)"):
        read_bin_header(tmp_path / "poison.bin")
    entry = read_bin_header(tmp_path / "clean.bin").tensors["w"]
    assert entry.dtype == "F16" and entry.nbytes == 12


def test_a_state_dicts_metadata_is_accepted(tmp_path) -> None:
    """module.state_dict() carries `_metadata` (set on the OrderedDict by BUILD): allowed, and dropped."""
    state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)).state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, tmp_path / "m.bin")
    assert set(read_bin_header(tmp_path / "m.bin").tensors) == set(state)


def test_work_and_sizes_are_bounded(tmp_path) -> None:
    torch.save({"w": torch.zeros(4)}, tmp_path / "small.bin")
    # a million empty dicts on the stack (a memory bomb of 1 MB): stopped after the opcode budget
    _with_pickle(tmp_path / "small.bin", tmp_path / "bomb.bin", b"\x80\x02" + b"}" * 1_000_000 + b".")
    with pytest.raises(InputError, match="more than 256 steps per stored tensor"):
        read_bin_header(tmp_path / "bomb.bin")
    # a compressed pickle (torch.save never compresses): refused before it is read
    with zipfile.ZipFile(tmp_path / "small.bin") as zin, \
            zipfile.ZipFile(tmp_path / "deflated.bin", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(InputError, match="is compressed, which torch.save never does"):
        read_bin_header(tmp_path / "deflated.bin")


def test_a_storage_past_the_end_of_the_file_is_refused(tmp_path) -> None:
    """A zip directory claiming more bytes for a storage than the file has, or than lie before the next member:
    refused when the header is read (plan, inspect), not when the merge reaches it."""
    torch.save({"w": torch.zeros(64)}, tmp_path / "w.bin")
    raw = bytearray((tmp_path / "w.bin").read_bytes())
    with zipfile.ZipFile(tmp_path / "w.bin") as zf:
        name = next(i.filename for i in zf.infolist() if i.filename.endswith("/data/0")).encode()
    entry = raw.index(b"PK\x01\x02")
    while raw[entry + 46:entry + 46 + len(name)] != name:  # the central directory entry of data/0
        entry = raw.index(b"PK\x01\x02", entry + 4)
    for size, message in [(1 << 22, r"truncated: the storage of tensor 'w' ends at byte \d+ but the file"),
                          (256 + 64, r"tensor 'w': its storage runs into the zip's next header")]:
        raw[entry + 20:entry + 28] = size.to_bytes(4, "little") * 2  # compressed and uncompressed size
        (tmp_path / "long.bin").write_bytes(bytes(raw))
        with pytest.raises(InputError, match=message):
            read_bin_header(tmp_path / "long.bin")


def test_complex_and_fnuz_dtypes_are_named(tmp_path) -> None:
    cases = [torch.complex64, *[getattr(torch, n) for n in ("float8_e4m3fnuz",) if hasattr(torch, n)]]
    for dtype in cases:
        torch.save({"w": torch.zeros(3, dtype=dtype)}, tmp_path / "c.bin")
        name = str(dtype).removeprefix("torch.")
        with pytest.raises(InputError, match=f"holds {name} tensors, a dtype fusemerge does not read"):
            read_bin_header(tmp_path / "c.bin")


@pytest.mark.parametrize("case, body, message", [
    # an OrderedDict made from a 3-key dict, twice: a copy of a container per opcode (quadratic memory)
    ("copy", b"\x80\x02ccollections\nOrderedDict\n}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02u\x85R.",
     r"an OrderedDict made from another object \(pickle REDUCE\)"),
    # a key nested 10,000 tuples deep (200,000 within the budget of a file with more members: its hash recursed
    # in C until the stack overflowed, SIGSEGV)
    ("deep key", b"\x80\x02}K\x00" + b"\x85" * 10_000 + b"K\x01s.", "a dict key that is not a string"),
    # a call whose arguments are a 1 MB string (unpacked into a million arguments)
    ("star args", b"\x80\x02ctorch._utils\n_rebuild_parameter\nX\x00\x00\x10\x00" + b"a" * (1 << 20) + b"R.",
     r"a call with other than a short tuple of arguments"),
    ("dup", b"\x80\x02}2.", "the opcode DUP, which torch.save does not write"),
])
def test_opcodes_and_calls_beyond_a_state_dicts_are_refused(tmp_path, case, body, message) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "src.bin")
    _with_pickle(tmp_path / "src.bin", tmp_path / "x.bin", body)
    with pytest.raises(InputError, match=message):
        read_bin_header(tmp_path / "x.bin")


def test_storages_saved_from_a_gpu_read_as_from_the_cpu(tmp_path) -> None:
    """torch.save of CUDA tensors writes the same storages with location 'cuda:0' (the pickle's persistent id);
    the reader ignores the location, so a GPU-saved checkpoint reads on a CPU-only machine. Made here by
    rewriting a CPU-saved file's locations (this machine may have no GPU)."""
    want = {"a": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.linspace(-1, 1, 5)}
    torch.save(want, tmp_path / "cpu.bin")
    with zipfile.ZipFile(tmp_path / "cpu.bin") as zf:
        body = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert body.count(b"X\x03\x00\x00\x00cpu") == 1  # BINUNICODE 'cpu', memoized: the second storage refers to it
    _with_pickle(tmp_path / "cpu.bin", tmp_path / "gpu.bin", body.replace(b"X\x03\x00\x00\x00cpu",
                                                                          b"X\x06\x00\x00\x00cuda:0"))
    got = _read_all(tmp_path / "gpu.bin")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8))
