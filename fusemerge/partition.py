"""One merge split across processes or machines by output shard (`run --partition I/N`), and the step that joins
the parts into OUT_DIR (`fusemerge finalize`).

The output layout (shard names, headers, every tensor's offset) is a pure function of the config and the inputs'
headers, so part i of n merges and writes the output shards s with s % n == i (`planner.part_shards`) and needs
nothing from the other parts: every statistic is per tensor, and `trim_scope: global` thresholds, which are not,
are found once by the first part to start and read by the others from a file beside the parts
(`streaming/global_cuts.py`). Each part is an ordinary run (lock, temporary directory, journal, `--resume`, atomic
rename) into its own directory beside OUT_DIR, on any scheduler (a Slurm array, Ray tasks, Kubernetes jobs) that
shares a file system:

    parent/out.fusemerge-parts/
        .fusemerge-global-cuts.json, .fusemerge-global-cuts.lock     (trim_scope: global only)
        part-0-of-3/    model-00001-of-00007.safetensors, model-00004-of-00007.safetensors,
                        model-00007-of-00007.safetensors, fusemerge_part.json, config.json, tokenizer files,
                        fusemerge_config.yml, README.md
        part-1-of-3/    model-00002-..., model-00005-..., fusemerge_part.json, ...
        part-2-of-3/    ...

`fusemerge_part.json` holds the part's (i, n), its shards' SHA-256 and sizes, those of its other files
(`extras`), the absolute paths of the models, the inputs' modification times as the part read them
(`input_mtimes`), and `merge`: what fixes the bytes of the whole merge (the fusemerge
version, the config, the seed, the whole output layout and index, each input's size and `sampled_digest`; not the
inputs' modification times, which copies on other machines do not share; the config names the models, so every
part needs the same config).

`finalize(out)` checks that all n parts are there, finished, of one merge, with each shard at its size and
header, and part 0's other files (config.json, tokenizer files, fusemerge_config.yml, README.md) as its manifest
hashed them; links (or, where links are refused, moves) the shards into OUT_DIR's temporary directory; writes the
index and the manifest from the parts' hashes (the shards are not read again); copies part 0's other files; and
renames it into place: the same files, byte for byte, as one `run` of the whole merge. Then it removes the parts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusemerge import __version__
from fusemerge.errors import InputError
from fusemerge.options import opt, opt_name, run_command
from fusemerge.planner import part_shards
from fusemerge.streaming.digest import file_digest
from fusemerge.streaming.global_cuts import identity_digest
from fusemerge.streaming.journal import (
    header_digest,
    input_files,
    layout_entries,
    refuse_changed_inputs,
    refuse_rewritten_inputs,
)
from fusemerge.streaming.lock import out_dir_lock
from fusemerge.streaming.model_index import INDEX_NAME
from fusemerge.streaming.writer import (
    check_out_dir,
    make_temp_dir,
    move_into_place,
    remove_replaced,
    replaced_outputs,
    temp_dir_path,
    write_index,
)
from fusemerge.verify import MANIFEST_NAME, hash_files, is_files_map, read_json, write_json, write_manifest

if TYPE_CHECKING:
    from fusemerge.planner import MergePlan
    from fusemerge.streaming.digest import PrefixDigest

log = logging.getLogger("fusemerge")

PART_MANIFEST = "fusemerge_part.json"
JOIN_MARKER = ".fusemerge-join"  # in OUT_DIR's temporary directory while a join fills it (see _recover_moved)
FORMAT = "fusemerge-part/1"
_PART_RE = re.compile(r"part-(\d+)-of-(\d+)")

def _identity_words() -> dict[str, str]:
    """What `merge` entries mean, for the one line that says why two parts do not belong to one merge (the
    fusemerge version is checked apart, when each part manifest is read)."""
    return {"config": "the merge config", "seed": opt_name("seed"),
            "layout": f"the output layout ({opt_name('out_shard_size')} or the output dtype)",
            "index": "the output index", "inputs": "the input models"}


def parts_root(out_dir: str | os.PathLike) -> Path:
    """Where the parts of a partitioned merge into `out_dir` are written: `{name}.fusemerge-parts` beside it."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f"{out_dir.name}.fusemerge-parts"


def part_dir(out_dir: str | os.PathLike, i: int, n: int) -> Path:
    """The directory of part `i` of `n` of the merge into `out_dir`."""
    return parts_root(out_dir) / f"part-{i}-of-{n}"


def merge_identity(plan: MergePlan) -> dict:
    """What fixes the bytes of the whole merge `plan` belongs to (a part's plan or the whole plan), the same on
    every machine that runs a part: equal for two parts exactly when they are parts of one merge."""
    whole = plan.whole or plan
    return {
        "fusemerge_version": __version__,
        "config": whole.config.to_yaml(),
        "seed": whole.seed if whole.method.sparsifier in ("dare", "della") else None,
        "layout": layout_entries(whole.layout),
        "index": whole.layout.index_json(),
        "inputs": [{"bytes": f["bytes"], "sha256": f["sha256"], "hashed": f["hashed"]} for f in input_files(whole)],
    }


def write_part_manifest(directory: Path, plan: MergePlan, partial: dict[str, PrefixDigest],
                        extras: list[str], input_mtimes: dict[str, int] | None = None) -> Path:
    """Hash the part's shards in `directory` (finishing `partial`, the writer's digests) and its other files
    `extras` (config.json, tokenizer files, ...), and write `fusemerge_part.json` there, flushed to disk.
    `input_mtimes`: the inputs' modification times this part read (not part of the merge's identity: copies on
    other machines have their own), for `run --resume` of this part on this machine."""
    assert plan.partition is not None
    names = [s.filename for s in plan.layout.shards]
    digests = hash_files(directory, names, partial)
    manifest = {
        "format": FORMAT,
        "part": plan.partition[0],
        "parts": plan.partition[1],
        "files": _files_map(digests),
        "extras": _files_map(hash_files(directory, extras)),
        "models": [str(Path(os.path.abspath(m.path))) for m in _models(plan)],
        "merge": merge_identity(plan),
    }
    if input_mtimes is not None:
        manifest["input_mtimes"] = input_mtimes
    path = Path(directory) / PART_MANIFEST
    write_json(path, manifest, indent=1)
    return path


def _files_map(digests: dict[str, tuple[str, int]]) -> dict[str, dict]:
    return {name: {"sha256": digest, "bytes": size} for name, (digest, size) in digests.items()}


def finished_part(out_dir: str | os.PathLike, plan: MergePlan) -> Path | None:
    """The directory of `plan`'s part if a run already finished it, for this same merge, with every shard in place
    (`run --partition I/N --resume` then has nothing to do); else None."""
    assert plan.partition is not None
    directory = part_dir(out_dir, *plan.partition)
    try:
        manifest = _read_part(directory)
    except InputError:
        return None
    if manifest["merge"] != merge_identity(plan):
        refuse_rewritten_inputs(directory, manifest.get("input_mtimes"), plan)
        return None
    if _part_problems(directory, manifest):
        return None
    refuse_changed_inputs(directory, manifest.get("input_mtimes"), plan)
    return directory


@dataclass
class FinalizeResult:
    """What `finalize` did: the merged model's directory, how many parts and shards it joined, its bytes."""

    out_dir: Path
    parts: int
    shards: int
    output_bytes: int
    files: list[str]
    seconds: float


def finalize(out_dir: str | os.PathLike, *, overwrite: bool = False, keep_parts: bool = False, verify: bool = False,
             notify: Callable[[str], None] | None = None) -> FinalizeResult:
    """Join the parts of a merge run with `--partition I/N` into `out_dir` (see the module docstring).

    Raises InputError, listing every problem and changing nothing, when a part is missing or unfinished, parts
    of different merges or partitions are mixed, a shard is missing or has another size or header, or `out_dir`
    exists and is not empty (without `overwrite`). With `keep_parts`, the parts' directories stay (their shards
    then share their data with `out_dir`'s: hard links). With `verify`, every shard is also read and its SHA-256
    compared with its part's manifest first (without it, a shard changed after its part finished keeps its size
    and header, is joined, and only `fusemerge verify` finds it). `notify(line)` receives the notes (default: the
    "fusemerge" logger's warnings, as for `run`).

    >>> fusemerge.run("config.yml", "out/", partition="0/2")  # on one machine  # doctest: +SKIP
    >>> fusemerge.run("config.yml", "out/", partition="1/2")  # on another  # doctest: +SKIP
    >>> fusemerge.finalize("out/")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    note = notify or log.warning
    out = Path(os.path.abspath(out_dir))  # "." names its directory only once absolute
    root = parts_root(out)
    if not root.is_dir():
        if (out / MANIFEST_NAME).is_file():  # finalized before: the parts were moved into it
            if replaced_outputs(out):  # the output an earlier --overwrite replaced, left behind
                with out_dir_lock(out, note):
                    remove_replaced(out, note)
            raise InputError(f"{root}: not found, and {out} holds a finished merge (finalized already?; "
                             f"`fusemerge verify {out}` checks it)")
        raise InputError(f"{root}: not found: no parts of a partitioned merge into {out} (merge each part with "
                         f"{run_command(out, ('partition', 'I/N'))} first)")
    warned: list[str] = []

    def lock_note(line: str) -> None:  # a file system without locks: said once, not once per part
        if not warned:
            warned.append(line)
            (notify or log.warning)(line)

    with out_dir_lock(out, lock_note):
        remove_replaced(out, note)
        with ExitStack() as locks:
            found = sorted((int(m.group(1)), int(m.group(2)), p) for p in root.iterdir()
                           if p.is_dir() and (m := _PART_RE.fullmatch(p.name)))
            for _, _, directory in found:
                # no part run may write while the parts are joined
                locks.enter_context(out_dir_lock(directory, lock_note))
            _recover_moved(out, found)
            parts = _check_parts(out, root, found)
            first = parts[0][1]
            problems = check_out_dir(out, overwrite, [Path(m) for m in first["models"]])
            if problems:
                raise InputError(problems)
            if verify:  # after the cheap checks: reading every shard is the slow one
                _verify_parts(parts)
            if temp_dir_path(out).exists():
                note(f"removed the partial merge an interrupted run into {out} left in {temp_dir_path(out)}")
            files, moved = _join(out, parts, overwrite)
        if not keep_parts:
            shutil.rmtree(root, ignore_errors=True)
    if not keep_parts:
        note(f"removed the parts in {root}")
    else:
        note(f"kept the parts in {root} (" + (f"their shards are hard links to {out}'s)" if not moved else
             f"without their shards: this file system refuses hard links, so they were moved into {out})"))
    layout = first["merge"]["layout"]
    return FinalizeResult(out, len(parts), len(layout), first["merge"]["index"]["metadata"]["total_size"], files,
                          time.perf_counter() - t0)


def _recover_moved(out: Path, found: list[tuple[int, int, Path]]) -> None:
    """A join killed after moving shards (where links are refused) left them in OUT_DIR's temporary directory:
    move each back into its part (the part manifest names it and it is not there), so the join can start over.
    From a join's directory (it holds JOIN_MARKER, removed once every shard is in), or, killed after that and
    before its rename, from any: then a shard goes back only when its size and SHA-256 are the manifest's, so
    what an interrupted `run` into OUT_DIR left there is never taken for a part's shard."""
    temp = temp_dir_path(out)
    if not temp.is_dir():
        return
    joining = (temp / JOIN_MARKER).is_file()
    for _, _, directory in found:
        try:
            files = _read_part(directory)["files"]
        except InputError:
            continue
        for name, entry in files.items():
            if not (temp / name).is_file() or (directory / name).exists():
                continue
            if joining or ((temp / name).stat().st_size == entry["bytes"]
                           and file_digest(temp / name) == (entry["sha256"], entry["bytes"])):
                shutil.move(temp / name, directory / name)


def _verify_parts(parts: list[tuple[Path, dict]]) -> None:
    """Every part's shards read whole, their SHA-256 against the part's manifest (finalize's `verify`)."""
    problems = [f"{directory / name}: its SHA-256 differs from {directory / PART_MANIFEST} (changed after the part "
                f"was merged; merge that part again with {opt('overwrite')})"
                for directory, manifest in parts for name, entry in manifest["files"].items()
                if file_digest(directory / name) != (entry["sha256"], entry["bytes"])]
    if problems:
        raise InputError(problems)


def _check_parts(out: Path, root: Path, found: list[tuple[int, int, Path]]) -> list[tuple[Path, dict]]:
    """Every part of one partition, in order, as (directory, manifest); InputError with every problem otherwise."""
    problems: list[str] = []
    counts = sorted({n for _, n, _ in found})
    if not counts:
        raise InputError(f"{root}: holds no finished part (a part appears there when its run completes)")
    if len(counts) > 1:
        raise InputError(f"{root}: holds parts of different partitions ("
                         + ", ".join(p.name for _, _, p in found) + "); remove the parts of the one not wanted")
    n = counts[0]
    by_index = {i: directory for i, _, directory in found}
    parts: list[tuple[Path, dict]] = []
    for i in range(n):
        directory = by_index.get(i)
        if directory is None:
            temp = temp_dir_path(part_dir(out, i, n))
            resume = run_command(out, ("partition", f"{i}/{n}"), ("resume", True))
            problems.append(f"part {i}/{n} is unfinished: {temp} holds its interrupted or running merge ({resume}, "
                            "with the other parts' options, continues it)" if temp.is_dir() else
                            f"part {i}/{n} is missing from {root} (merge it with "
                            f"{run_command(out, ('partition', f'{i}/{n}'))} and the other parts' options)")
            continue
        try:
            manifest = _read_part(directory)
        except InputError as e:
            problems += e.problems
            continue
        if (manifest["part"], manifest["parts"]) != (i, n):
            problems.append(f"{directory / PART_MANIFEST}: describes part {manifest['part']}/{manifest['parts']}, "
                            f"not {i}/{n}")
            continue
        parts.append((directory, manifest))
    if parts:
        ref_dir, ref = parts[0]
        for directory, manifest in parts[1:]:
            differ = [words for key, words in _identity_words().items()
                      if manifest["merge"].get(key) != ref["merge"].get(key)]
            if differ:
                problems.append(f"{directory.name} and {ref_dir.name} are parts of different merges: "
                                + ", ".join(differ) + (" differ" if len(differ) > 1 else " differs")
                                + "; merge every part with the same config, options and inputs")
                continue  # their model cards and config.json differ then too: that says nothing more
            extras = {name: e["sha256"] for name, e in manifest["extras"].items()}
            if extras != {name: e["sha256"] for name, e in ref["extras"].items()}:
                problems.append(f"{directory.name} and {ref_dir.name} hold different config.json, tokenizer or "
                                f"model card files: merge every part with the same {opt_name('copy_tokenizer')} option")
        if not problems:
            for directory, manifest in parts:
                problems += _part_problems(directory, manifest)
            problems += _extras_problems(ref_dir, ref)  # the ones the join copies
    if problems:
        raise InputError(problems)
    return parts


def _read_part(directory: Path) -> dict:
    """The part manifest of `directory`, checked for its shape; InputError if missing or malformed."""
    path = directory / PART_MANIFEST
    manifest = read_json(path, "part manifest", f"{directory} is not a finished part of a fusemerge merge")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} manifest")
    merge = manifest.get("merge")
    files = manifest.get("files")
    if not (isinstance(manifest.get("part"), int) and isinstance(manifest.get("parts"), int)
            and is_files_map(files) and is_files_map(manifest.get("extras")) and isinstance(merge, dict)
            and isinstance(manifest.get("models"), list)
            and isinstance(merge.get("layout"), list) and isinstance(merge.get("index"), dict)):
        raise InputError(f"{path}: malformed part manifest")
    if any(Path(name).name != name or name in (".", "..") or name in files for name in manifest["extras"]):
        raise InputError(f"{path}: malformed part manifest (its extras must be file names beside the shards)")
    if merge.get("fusemerge_version") != __version__:
        raise InputError(f"{path}: written by fusemerge {merge.get('fusemerge_version')}; this is {__version__} "
                         "(merge the parts and finalize them with one version)")
    return manifest


def _part_problems(directory: Path, manifest: dict) -> list[str]:
    """Whether the part in `directory` holds exactly its shards of the layout, each at its size and header."""
    layout = manifest["merge"]["layout"]
    i, n = manifest["part"], manifest["parts"]
    expected = {entry["file"]: entry for entry in part_shards(layout, i, n)}
    problems = []
    if set(manifest["files"]) != set(expected):
        return [f"{directory / PART_MANIFEST}: lists shards {sorted(manifest['files'])}, part {i}/{n} of this "
                f"layout has {sorted(expected)}"]
    for name, entry in expected.items():
        path = directory / name
        try:
            size = path.stat().st_size
            digest = header_digest(path)
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
            continue
        if size != entry["bytes"] or manifest["files"][name]["bytes"] != entry["bytes"]:
            problems.append(f"{path}: {size} bytes, the layout says {entry['bytes']} (truncated or changed)")
        elif digest != entry["header_sha256"]:
            problems.append(f"{path}: its safetensors header differs from the merge's layout (changed)")
    return problems


def _extras_problems(directory: Path, manifest: dict) -> list[str]:
    """Whether `directory`'s other files (config.json, tokenizer files, ...) are those its part manifest hashed."""
    names = list(manifest["extras"])
    try:
        found = hash_files(directory, names)
    except OSError as e:
        return [f"{e.filename or directory}: cannot read: {e.strerror or e}"]
    return [f"{directory / name}: {'differs from' if found[name][1] == entry['bytes'] else 'has another size than'} "
            "the file its part wrote (changed since)" for name, entry in manifest["extras"].items()
            if found[name] != (entry["sha256"], entry["bytes"])]


def _join(out: Path, parts: list[tuple[Path, dict]], overwrite: bool) -> tuple[list[str], int]:
    """Put every part's shards, the index, the manifest and part 0's other files into `out` (temporary directory,
    then a rename); returns the files of `out` and how many shards were moved, not linked. On failure nothing is
    left in `out` and every part is as it was."""
    first_dir, first = parts[0]
    merge = first["merge"]
    temp = make_temp_dir(out)
    moved: list[tuple[Path, Path]] = []
    try:
        (temp / JOIN_MARKER).touch()
        known: dict[str, tuple[str, int]] = {}
        for directory, manifest in parts:
            for name, entry in manifest["files"].items():
                _link_or_move(directory / name, temp / name, moved)
                known[name] = (entry["sha256"], entry["bytes"])
        shards = [entry["file"] for entry in merge["layout"]]
        for name in first["extras"]:  # config.json, tokenizer files, fusemerge_config.yml, README.md
            shutil.copyfile(first_dir / name, temp / name)
        if len(shards) > 1:
            write_index(temp, merge["index"])
        # the inputs' modification times where every part read the same files (one machine, one file system);
        # parts that read copies on other machines have their own, and the joined merge records none
        mtimes = [manifest.get("input_mtimes") for _, manifest in parts]
        write_manifest(temp, shards + ([INDEX_NAME] if len(shards) > 1 else []), known=known,
                       merge=identity_digest(merge),
                       extras={name: (e["sha256"], e["bytes"]) for name, e in first["extras"].items()},
                       input_mtimes=mtimes[0] if isinstance(mtimes[0], dict) and mtimes.count(mtimes[0]) == len(mtimes)
                       else None)
        (temp / JOIN_MARKER).unlink()  # the shards are all in: a kill from here on leaves nothing to move back
        files = sorted(p.name for p in temp.iterdir())
        move_into_place(temp, out, overwrite)
    except BaseException:
        for src, dst in reversed(moved):
            if dst.exists() and not src.exists():  # (a failure after the rename leaves nothing to move back)
                shutil.move(dst, src)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return files, len(moved)


def _link_or_move(src: Path, dst: Path, moved: list[tuple[Path, Path]]) -> None:
    """A hard link `dst` to `src` (the part keeps its shard until the join is complete); where the file system
    refuses links, a move, recorded in `moved` so a failed join can move it back."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.move(src, dst)
        moved.append((src, dst))


def _models(plan: MergePlan) -> list:
    whole = plan.whole or plan
    return ([whole.base] if whole.base is not None else []) + list(whole.models)
