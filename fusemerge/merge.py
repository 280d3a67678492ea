"""`run`: plan, merge into a temporary directory (journaled, resumable), write the Hugging Face extras, rename
into place."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusemerge import __version__
from fusemerge.config import MergeConfig
from fusemerge.errors import FusemergeError, InputError
from fusemerge.options import opt
from fusemerge.partition import (
    PART_MANIFEST,
    finished_part,
    merge_identity,
    part_dir,
    parts_root,
    write_part_manifest,
)
from fusemerge.planner import CODE_NAMES, TOKENIZER_FILES, MergePlan, build_plan, tokenizer_dir
from fusemerge.streaming.executor import Executor, StageTimes
from fusemerge.streaming.global_cuts import CUTS_NAME, CutsFile, identity_digest
from fusemerge.streaming.journal import (
    JOURNAL_NAME,
    Journal,
    KillSwitch,
    input_mtimes,
    refuse_changed_inputs,
    refuse_rewritten_inputs,
)
from fusemerge.streaming.lock import out_dir_lock
from fusemerge.streaming.model_index import INDEX_NAME
from fusemerge.streaming.writer import (
    ShardedWriter,
    check_out_dir,
    make_temp_dir,
    move_into_place,
    remove_replaced,
    replaced_outputs,
    temp_dir_path,
    write_index,
)
from fusemerge.verify import MANIFEST_NAME, hash_files, is_files_map, write_manifest

log = logging.getLogger("fusemerge")

# errno of a full disk or quota: a merge stopped by one keeps what it wrote for --resume
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# config.json keys holding the number of layers (Llama / Mistral / Qwen ..., GPT-2, GPT-NeoX-style).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergeResult:
    """What `run` did: where, how long, how many bytes, and the per-stage times. A resumed merge also says how
    many tensors (and input bytes) were already written by the interrupted run and not merged again."""

    out_dir: Path
    seconds: float
    input_bytes: int
    output_bytes: int
    files: list[str]
    times: StageTimes
    plan: MergePlan
    resumed_tensors: int = 0
    resumed_bytes: int = 0
    finished_before: bool = False  # resume=True found the merge (or part) already finished: nothing was done
    nonfinite: list[str] = field(default_factory=list)  # with allow_nonfinite: one line per tensor with NaN / Inf

    @property
    def input_gbps(self) -> float:
        """Input bytes merged by this run (not counting resumed ones) per second, in GB/s."""
        return (self.input_bytes - self.resumed_bytes) / max(self.seconds, 1e-9) / 1e9


def run(
    config: str | Path | dict | MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "auto",
    backend: str = "auto",
    max_memory: str | int | None = None,
    out_shard_size: str | int = "5GB",
    seed: int = 0,
    copy_tokenizer: bool = True,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    partition: str | tuple[int, int] | None = None,
    max_pinned_memory: str | int | None = None,
    progress: Callable[[int], None] | None = None,
    notify: Callable[[str], None] | None = None,
    plan: MergePlan | None = None,
) -> MergeResult:
    """Merge the models of a mergekit-style config into `out_dir` (Hugging Face layout).

    Every input is validated first (InputError lists every problem); the output is written into the temporary
    directory `.{name}.fusemerge-tmp` next to `out_dir` and renamed into place only when complete. A lock next to
    `out_dir` refuses a second run into it while this one writes; `fusemerge_manifest.json` records each shard's
    SHA-256 (see `fusemerge.verify`).

    A run killed (or interrupted with Ctrl-C, or stopped by a full disk) leaves its temporary directory and
    journal behind. With `resume`, the next run continues from them, merging only the tensors not yet durably
    written, into the same bytes an uninterrupted run writes; it refuses (InputError) if the config, seed, output
    layout or an input changed (`streaming/journal.py`). With `resume` and nothing to resume, it starts from the
    beginning. Without `resume`, a partial merge left behind is removed first. `notify(line)` receives those
    notes (default: the "fusemerge" logger's warnings).

    `partition` ("i/n" or (i, n), 0 <= i < n): merge only part i of n, the output shards s with s % n == i, into
    its own directory beside `out_dir` (`fusemerge/partition.py`); `fusemerge.finalize(out_dir)` joins the n parts
    once all are done. With `resume`, a part already finished is left as it is.

    `plan`: a plan `build_plan` made of this config, run as it is (the options that make a plan, `device` to
    `max_pinned_memory`, are then refused: they are the plan's). `progress(nbytes)` is called as input bytes are
    merged. The result's `finished_before` says that `resume` found the merge already done.

    >>> import fusemerge
    >>> fusemerge.run("config.yml", "out/", device="cpu", max_memory="2GiB")  # doctest: +SKIP
    >>> fusemerge.run("config.yml", "out/", device="cpu", resume=True)  # after a kill  # doctest: +SKIP
    """
    options = dict(device=device, backend=backend, max_memory=max_memory, out_shard_size=out_shard_size, seed=seed,
                   workers=workers, partition=partition, max_pinned_memory=max_pinned_memory)
    if plan is None:
        plan = build_plan(config, **options)
    elif given := [name for name, value in options.items() if value != _RUN_DEFAULTS[name]]:
        raise InputError(f"run: {', '.join(given)} given with plan=, which already fixes them; pass them to "
                         "build_plan instead")
    notify = notify or log.warning
    out = Path(os.path.abspath(out_dir))  # "." or "out/.." name their directory only once made absolute
    inputs = [m.path for m in plan.models] + ([plan.base.path] if plan.base is not None else [])
    config_file = plan.config.source_path
    t0 = time.perf_counter()
    if resume and (done := already_merged(out, plan, overwrite)) is not None:  # a requeued job of a merge done
        # what an --overwrite into it stopped before deleting, and files deleted from it since it finished; the
        # lock only where there is one (a finished merge may lie where this user cannot write)
        if (missing := _missing_files(done, plan)) or replaced_outputs(done):
            with out_dir_lock(done, notify):
                remove_replaced(done, notify)
                missing = _missing_files(done, plan)  # again, under the lock: another run may have changed it
                if missing and (written := _write_missing(done, plan, copy_tokenizer, missing)):
                    notify(f"wrote {', '.join(written)} into {done} again: missing from the finished merge there")
        if plan.partition is not None:
            notify(f"part {plan.partition[0]}/{plan.partition[1]} is already merged in {done}; nothing to resume")
        else:
            notify(f"{out} already holds this merge, finished; nothing to resume")
        return MergeResult(done, time.perf_counter() - t0, plan.input_bytes, plan.output_bytes,
                           sorted(p.name for p in done.iterdir()), StageTimes(), plan,
                           resumed_tensors=len(plan.tensors), resumed_bytes=plan.input_bytes, finished_before=True)
    if plan.partition is not None:  # this run writes one part, into its own directory; finalize fills `out`
        # the final directory: found out now, not at finalize
        problems = check_out_dir(out, overwrite, inputs, config_file)
        out = part_dir(out, *plan.partition)
        problems += [p for p in check_out_dir(out, overwrite, inputs, config_file) if p not in problems]
    else:
        problems = check_out_dir(out, overwrite, inputs, config_file)
    if problems:
        raise InputError(problems)

    kill = KillSwitch.from_env()
    with out_dir_lock(out, notify):
        remove_replaced(out, notify)
        temp = temp_dir_path(out)
        resumed = Journal.resume(temp, plan, out, kill) if resume and temp.is_dir() else None
        if resumed is None:
            if resume:
                notify(f"no interrupted merge into {out} to resume; starting from the beginning")
            elif temp.exists():
                notify(f"removed the partial merge an interrupted run left in {temp} ({opt('resume')} would have "
                       "continued it)")
            temp = make_temp_dir(out)
        journal: Journal | None = None
        try:
            skipped: list = []
            skipped_bytes = 0
            if resumed is not None:
                journal, dropped = resumed
                _keep_only_shards(temp, plan)
                skipped = [t for t in plan.tensors if t.name in journal.done]
                skipped_bytes = sum(t.input_bytes for t in skipped)
                notify(f"resuming the interrupted merge into {out}: {len(skipped)} of {len(plan.tensors)} tensors "
                       "already written and verified"
                       + (f"; {dropped} journal entries did not match the written bytes and are redone"
                          if dropped else ""))
            executor = None
            read_mtimes = input_mtimes(plan)  # what this run reads, recorded in its manifest
            cuts_file = _cuts_file(plan, out_dir, temp, notify)
            writer = ShardedWriter(temp, plan.layout, resume=resumed is not None, index=plan.partition is None)
            try:
                if journal is None:
                    journal = Journal.create(temp, plan, kill)
                kill.wrap_write(writer)
                kill.stage("started")
                if progress is not None and skipped_bytes:
                    progress(skipped_bytes)  # the progress bar counts resumed bytes as done
                executor = Executor(plan, writer, progress, skip=journal.done, on_tensor_done=journal.record,
                                    allow_nonfinite=allow_nonfinite, cuts_file=cuts_file)
                times = executor.times
                executor.run()
            finally:
                t1 = time.perf_counter()
                writer.close()  # flushes the shards to disk (fsync) before anything is renamed
                if executor is not None:
                    executor.times.add(flush=time.perf_counter() - t1)
            journal.close(flush=True)
            kill.stage("merged")
            if cuts_file is not None and not cuts_file.shared:
                cuts_file.remove()  # this run's own thresholds file is not part of its output
            extras = _write_extras(plan, temp, copy_tokenizer)  # before a part's manifest, which hashes them
            t1 = time.perf_counter()
            shards = [s.filename for s in plan.layout.shards]
            if plan.partition is None:
                write_manifest(temp, shards + ([INDEX_NAME] if len(shards) > 1 else []), writer.digests,
                               merge=identity_digest(merge_identity(plan)), input_mtimes=read_mtimes,
                               extras=hash_files(temp, extras))
            else:  # the part's hashes; finalize writes the manifest and index of the whole merge
                write_part_manifest(temp, plan, writer.digests, extras, read_mtimes)
            times.add(manifest=time.perf_counter() - t1)
            kill.stage("extras")
            journal.remove()  # killed between here and the rename, a resume starts over: no work is left to lose
            files = sorted(p.name for p in temp.iterdir())
            move_into_place(temp, out, overwrite)
        except KeyboardInterrupt:  # keep the partial merge for --resume, with every finished tensor journaled
            _keep(journal)
            raise
        except OSError as e:
            if e.errno in FULL_DISK and journal is not None and journal.path.is_file():
                # the tensors written so far are worth keeping: once space is freed, --resume continues them
                _keep(journal)
                raise FusemergeError(_write_error(out, e, kept=temp)) from e
            _discard(journal, temp)
            raise FusemergeError(_write_error(out, e)) from e
        except BaseException:
            _discard(journal, temp)
            raise
    return MergeResult(out, time.perf_counter() - t0, plan.input_bytes, plan.output_bytes, files, times, plan,
                       resumed_tensors=len(skipped), resumed_bytes=skipped_bytes, nonfinite=executor.nonfinite)


def _keep(journal: Journal | None) -> None:
    """A merge stopped with its temporary directory kept for --resume: journal every tensor finished so far (a
    journal that cannot be written, on a full disk, loses only those: --resume redoes them)."""
    if journal is not None:
        try:
            journal.close(flush=True)
        except OSError:
            pass


def _discard(journal: Journal | None, temp: Path) -> None:
    """A failed merge: stop the journal and remove the temporary directory."""
    if journal is not None:
        try:
            journal.close()
        except OSError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _cuts_file(plan: MergePlan, out_dir: str | os.PathLike, temp: Path, notify: Callable[[str], None]
               ) -> CutsFile | None:
    """Where `trim_scope: global` thresholds are kept (streaming/global_cuts.py): shared by the parts of a
    partitioned merge beside OUT_DIR, in its temporary directory for one run (for --resume); None without them."""
    if not plan.global_trim:
        return None
    merge = identity_digest(merge_identity(plan))
    if plan.partition is None:
        return CutsFile(temp, merge, len(plan.models), shared=False, notify=notify)
    return CutsFile(parts_root(out_dir), merge, len(plan.models), shared=True, notify=notify)


def _keep_only_shards(temp: Path, plan: MergePlan) -> None:
    """Before resuming into `temp`: remove what the interrupted run wrote besides its shards and journal (an
    index, a manifest, config and tokenizer files), so only what this run writes ends up in the output."""
    keep = {s.filename for s in plan.layout.shards} | {JOURNAL_NAME, CUTS_NAME}
    for p in temp.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _write_error(out: Path, e: OSError, kept: Path | None = None) -> str:
    """One line for an OSError met while writing the output; disk full and file too large said plainly, and
    where the partial merge is `kept` for --resume."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in FULL_DISK:
        then = (f"; the partial merge is kept in {kept}: free some space, then run the same command with "
                f"{opt('resume')} to continue it (without {opt('resume')} it is removed and the merge starts over)"
                if kept is not None else "")
        return f"writing {out}{where}: the disk is full ({e.strerror}); nothing was written to {out}{then}"
    if e.errno == errno.EFBIG:
        return (f"writing {out}{where}: file too large ({e.strerror}) for the file system or the file-size limit; "
                f"nothing was written to {out}")
    return f"writing {out}{where}: {e.strerror or e}"


def _write_extras(plan: MergePlan, directory: Path, copy_tokenizer: bool) -> list[str]:
    """config.json (dtype updated), tokenizer files, fusemerge_config.yml and a README model card; returns the
    names of the files written."""
    written = []
    # the base's config.json, else the first model's that has one (CLI.md)
    source = next((m for m in [plan.reference, *plan.models] if m.config is not None), None)
    if source is not None:  # else the plan warned
        cfg = dict(source.config)
        out_dtype = plan.out_dtype_name or _main_dtype(plan.whole or plan)  # a part's: the whole merge's
        if out_dtype:
            cfg["torch_dtype"] = out_dtype
            if "dtype" in cfg:
                cfg["dtype"] = out_dtype
        if (cfg.get("tie_word_embeddings") and "lm_head.weight" not in source.tensors
                and any(t.name == "lm_head.weight" for t in plan.all_tensors)):
            # the config's model ties its head, but the output has a head of its own (the last slice's untied
            # model): not tied. A tied model that also stores lm_head.weight stays tied, as it was.
            cfg["tie_word_embeddings"] = False
        if plan.config.slices is not None:  # layer stacking: the output's layer count (mergekit/merge.py)
            keys = [k for k in LAYER_COUNT_KEYS if k in cfg] or [LAYER_COUNT_KEYS[0]]
            for key in keys:
                cfg[key] = plan.config.num_output_layers
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        written.append("config.json")
    if copy_tokenizer:
        src = tokenizer_dir(plan.config, plan.reference)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                try:
                    shutil.copyfile(src / name, directory / name)
                except OSError as e:  # a full disk: name the file being written, not the tokenizer read
                    if e.errno not in (*FULL_DISK, errno.EFBIG):
                        raise
                    raise OSError(e.errno, e.strerror, str(directory / name)) from e
                written.append(name)
    (directory / "fusemerge_config.yml").write_text(plan.config.to_yaml())
    (directory / "README.md").write_text(_model_card(plan))
    return [*written, "fusemerge_config.yml", "README.md"]


# run's defaults, by name: what `run(plan=...)` compares the plan's options with
_RUN_DEFAULTS = {name: p.default for name, p in inspect.signature(run).parameters.items()}


def already_merged(out_dir: str | Path, plan: MergePlan, overwrite: bool = False) -> Path | None:
    """Where `plan`'s merge (or its part) into `out_dir` is already finished, with every shard in place: what
    `run(..., resume=True)` then leaves as it is, but for writing again the other files deleted from it; else
    None. InputError where it is finished but from inputs modified since, unless `overwrite` (then None: merged
    again)."""
    out = Path(os.path.abspath(out_dir))
    if plan.partition is not None:
        return _unless_overwritten(finished_part, out, plan, overwrite)
    return out if _unless_overwritten(_finished_run, out, plan, overwrite) else None


def _unless_overwritten(finished, out: Path, plan: MergePlan, overwrite: bool):
    """finished(out, plan), except that with --overwrite a finished merge of inputs modified since is not
    finished (it is merged again) where without it that is an input error."""
    try:
        return finished(out, plan)
    except InputError:
        if overwrite:
            return None
        raise


def _finished_run(out: Path, plan: MergePlan) -> bool:
    """Whether `out` is this very merge, finished (its manifest names this merge's identity, and every shard is
    there at its size): then `run --resume` has nothing to merge, and only writes again the other files it
    recorded that are missing (`_write_missing`). A manifest without the identity (an older fusemerge, a
    hand-made directory) is not. InputError if it is, but from inputs rewritten since (their modification times
    are not those it recorded: same sizes and headers, maybe other data)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not is_files_map(manifest.get("files")):
        return False
    files = manifest["files"]
    if manifest.get("merge") != identity_digest(merge_identity(plan)):
        refuse_rewritten_inputs(out, manifest.get("input_mtimes"), plan)
        return False
    shards = [s.filename for s in plan.layout.shards]
    if not all(name in files and (out / name).is_file() and (out / name).stat().st_size == files[name]["bytes"]
               for name in shards):
        return False
    refuse_changed_inputs(out, manifest.get("input_mtimes"), plan)
    return True

def _missing_files(done: Path, plan: MergePlan) -> dict[str, dict]:
    """The files besides its shards that the manifest of the finished merge (or part) in `done` records and that
    are missing (config.json, tokenizer files, fusemerge_config.yml, README.md; the index also where it has
    another size): name -> {"sha256", "bytes"}."""
    part = plan.partition is not None
    try:
        manifest = json.loads((done / (PART_MANIFEST if part else MANIFEST_NAME)).read_text())
    except (OSError, ValueError):
        return {}
    extras = manifest.get("extras") if is_files_map(manifest.get("extras")) else {}
    missing = {name: entry for name, entry in extras.items() if not (done / name).is_file()}
    if not part and INDEX_NAME in manifest["files"]:
        entry = manifest["files"][INDEX_NAME]
        if not (done / INDEX_NAME).is_file() or (done / INDEX_NAME).stat().st_size != entry["bytes"]:
            missing[INDEX_NAME] = entry
    if any(not name or Path(name).name != name or name in (".", "..") for name in missing):
        return {}
    return missing


def _write_missing(done: Path, plan: MergePlan, copy_tokenizer: bool, missing: dict[str, dict]) -> list[str]:
    """Write again into the finished merge (or part) in `done` the files `missing` (`_missing_files`); returns
    their names. Each is made as the merge made it, in a directory beside `done`, and renamed in once its
    SHA-256 is the recorded one; InputError (nothing written) where this run would write another one or none.
    Shards are not read. Hold `done`'s lock."""
    scratch = done.parent / f".{done.name}.fusemerge-missing"
    shutil.rmtree(scratch, ignore_errors=True)  # what a run killed here left
    scratch.mkdir()
    try:
        _write_extras(plan, scratch, copy_tokenizer)
        if INDEX_NAME in missing:
            write_index(scratch, plan.layout.index_json())
        made = hash_files(scratch, [name for name in missing if (scratch / name).is_file()])
        problems = []
        for name, entry in missing.items():
            if name in made and made[name] == (entry["sha256"], entry["bytes"]):
                continue
            if name not in made and name in TOKENIZER_FILES and not copy_tokenizer:
                why = f"this run copies no tokenizer files; resume with {opt('copy_tokenizer')} to write it again"
            else:
                why = ("the one this run writes differs from the one it wrote (its source changed since)"
                       if name in made else "this run does not write it (its source is gone)")
                why += f"; merge again with {opt('overwrite')}"
            problems.append(f"{done / name}: missing from the finished merge, and {why}")
        if problems:
            raise InputError(problems)
        for name in missing:
            os.replace(scratch / name, done / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return sorted(missing)


def _main_dtype(plan: MergePlan) -> str | None:
    """The output's floating-point dtype (the one most of its float elements have), as config.json names it."""
    counts: dict[str, int] = {}
    for t in plan.tensors:
        name = CODE_NAMES.get(t.out_dtype)
        if name:
            counts[name] = counts.get(name, 0) + t.numel
    return max(counts, key=counts.__getitem__) if counts else None




def _model_card(plan: MergePlan) -> str:
    lines = [
        "---",
        "tags: [merge, fusemerge]",
        "---",
        "# Merged model",
        "",
        f"Made with [fusemerge](https://github.com/fusemerge/fusemerge) {__version__} using the "
        f"`{plan.method.name}` method ({plan.method.paper}).",
        "",
    ]
    if plan.base is not None:
        lines.append(f"Base model: `{plan.base.path}`")
        lines.append("")
    lines.append("Models merged:")
    lines += [f"- `{m.path}`" for m in plan.models]
    lines += ["", "Configuration:", "", "```yaml", plan.config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
