"""Integrity of a merge's output: the shard manifest written by `run`, and `verify`, which checks it.

`run` records the SHA-256 and size of every output shard (and of `model.safetensors.index.json`) in
`fusemerge_manifest.json`, and under `extras` those of the other files it writes (config.json, tokenizer files,
fusemerge_config.yml, README.md), which `verify` leaves alone (a model card is the user's to edit) and `run
--resume` writes again where one is missing. A shard's hash is fed with the bytes written to it while they are
written in file order (`PrefixDigest`: the GPU pipeline writes in file order, so its shards are hashed as the merge
runs); from the first byte not written in order, the rest is read back from the file once it is flushed. `verify`
re-reads them and reports every file that is missing, has another size or hash, or whose safetensors header does
not parse.

    $ fusemerge verify out/
    OK: 3 shards verified
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fusemerge import __version__
from fusemerge.errors import InputError
from fusemerge.streaming.digest import PrefixDigest, file_digest
from fusemerge.streaming.safetensors_header import read_header

MANIFEST_NAME = "fusemerge_manifest.json"
_HASH_THREADS = 4  # hashlib releases the GIL on large buffers, so shards hash in parallel


def hash_files(directory: Path, names: list[str],
               partial: dict[str, PrefixDigest] | None = None) -> dict[str, tuple[str, int]]:
    """(SHA-256, bytes) of the files `names` of `directory`, several at once; `partial` digests are finished."""
    partial = partial or {}

    def digest(name: str) -> tuple[str, int]:
        return partial[name].finish(directory / name) if name in partial else file_digest(directory / name)

    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(digest, names), strict=True))


def write_manifest(directory: str | os.PathLike, names: list[str],
                   partial: dict[str, PrefixDigest] | None = None,
                   known: dict[str, tuple[str, int]] | None = None, merge: str | None = None,
                   input_mtimes: dict[str, int] | None = None,
                   extras: dict[str, tuple[str, int]] | None = None) -> Path:
    """Hash the files `names` of `directory` and write `fusemerge_manifest.json` there (flushed to disk).

    The manifest maps each file name to `{"sha256", "bytes"}` and records the fusemerge version. `partial`
    holds digests fed while the files were written (`ShardedWriter.digests`); they are finished from the file.
    `known` holds (sha256, bytes) already computed (the parts' manifests, `fusemerge finalize`): not re-read.
    `merge`: the SHA-256 of the merge's identity (`partition.merge_identity`), so that `run --resume` of the
    same merge into a finished directory knows it has nothing to do; `input_mtimes`: the inputs' modification
    times it read (journal.input_mtimes), so that it knows when they were rewritten since; `extras`: (sha256,
    bytes) of the merge's other files (config.json, tokenizer files, ...), so that it knows when one is missing.
    """
    directory = Path(directory)
    known = known or {}
    digests = dict(known)
    digests.update(hash_files(directory, [n for n in names if n not in known], partial))
    digests = {name: digests[name] for name in names}
    files = {name: {"sha256": digest, "bytes": size} for name, (digest, size) in digests.items()}
    manifest = {"fusemerge_version": __version__, "algorithm": "sha256", "files": files}
    if merge is not None:
        manifest["merge"] = merge
    if input_mtimes is not None:
        manifest["input_mtimes"] = input_mtimes
    if extras is not None:
        manifest["extras"] = {name: {"sha256": digest, "bytes": size} for name, (digest, size) in extras.items()}
    path = directory / MANIFEST_NAME
    write_json(path, manifest)
    return path


def write_json(path: Path, obj: object, indent: int | None = 2) -> None:
    """`obj` as JSON (keys sorted, a final newline) in the file `path`, flushed to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=indent, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str, missing: str) -> object:
    """The JSON in `path`; InputError `"{path}: missing; {missing}"`, or naming `what` when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the {what}: {getattr(e, 'strerror', None) or e}") from e


def is_files_map(files: object) -> bool:
    """Whether `files` has a manifest's shape: {name: {"sha256": str, "bytes": int}}."""
    return isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in files.values())


def read_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """The `files` map of `directory`'s manifest; `InputError` if it is missing or malformed."""
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json(path, "manifest", "not a fusemerge output directory, or made before manifests")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not is_files_map(files):
        raise InputError(f"{path}: malformed manifest: expected files: {{name: {{sha256, bytes}}}}")
    return files


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Every problem with the files listed in `out_dir`'s manifest, one message each naming the file; [] if none.

    Each listed file must exist, have the recorded size and SHA-256, and each `.safetensors` file must have a
    header that parses; a `.safetensors` file in `out_dir` that the manifest does not list is a problem too.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return [f"{out_dir}: not a directory"]
    try:
        files = read_manifest(out_dir)
    except InputError as e:
        return e.problems
    problems: list[str] = []
    present = []
    for name, expected in sorted(files.items()):
        path = out_dir / name
        if Path(name).name != name:
            problems.append(f"{path}: the manifest names a file outside the directory")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != expected["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or changed)")
        else:
            present.append(name)
    try:
        digests = hash_files(out_dir, present)
    except OSError as e:
        return problems + [f"{e.filename or out_dir}: cannot read: {e.strerror or e}"]
    for name in present:
        path = out_dir / name
        if digests[name][0] != files[name]["sha256"]:
            problems.append(f"{path}: SHA-256 {digests[name][0]} differs from the manifest's {files[name]['sha256']}"
                            " (corrupted or changed)")
        elif name.endswith(".safetensors"):
            try:
                read_header(path)
            except InputError as e:
                problems += e.problems
    problems += [f"{out_dir / p.name}: not listed in the manifest"
                 for p in sorted(out_dir.glob("*.safetensors")) if p.name not in files]
    return problems
