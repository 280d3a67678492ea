"""`run`: plan, merge into a temporary directory, write the Hugging Face extras, rename into place."""

from __future__ import annotations

import errno
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusemerge import __version__
from fusemerge.config import MergeConfig
from fusemerge.errors import FusemergeError, InputError
from fusemerge.planner import MergePlan, build_plan
from fusemerge.streaming.executor import Executor, StageTimes
from fusemerge.streaming.lock import out_dir_lock
from fusemerge.streaming.model_index import INDEX_NAME
from fusemerge.streaming.writer import ShardedWriter, check_out_dir, finalize, make_temp_dir
from fusemerge.verify import write_manifest

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


# config.json keys holding the number of layers (Llama / Mistral / Qwen ..., GPT-2, GPT-NeoX-style).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergeResult:
    """What `run` did: where, how long, how many bytes, and the per-stage times."""

    out_dir: Path
    seconds: float
    input_bytes: int
    output_bytes: int
    files: list[str]
    times: StageTimes
    plan: MergePlan
    nonfinite: list[str] = field(default_factory=list)  # with allow_nonfinite: one line per tensor with NaN / Inf

    @property
    def input_gbps(self) -> float:
        return self.input_bytes / max(self.seconds, 1e-9) / 1e9


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
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    plan: MergePlan | None = None,
) -> MergeResult:
    """Merge the models of a mergekit-style config into `out_dir` (Hugging Face layout).

    Every input is validated first (InputError lists every problem); the output is written into a
    temporary directory next to `out_dir` and renamed into place only when complete. A lock next to `out_dir`
    refuses a second run into it while this one writes; `fusemerge_manifest.json` records each shard's SHA-256
    (see `fusemerge.verify`).

    >>> import fusemerge
    >>> fusemerge.run("config.yml", "out/", device="cpu", max_memory="2GiB")  # doctest: +SKIP
    """
    plan = plan or build_plan(config, device=device, backend=backend, max_memory=max_memory,
                              out_shard_size=out_shard_size, seed=seed, workers=workers)
    out = Path(out_dir)
    inputs = [m.path for m in plan.models] + ([plan.base.path] if plan.base is not None else [])
    problems = check_out_dir(out, overwrite, inputs)
    if problems:
        raise InputError(problems)

    t0 = time.perf_counter()
    with out_dir_lock(out):
        temp = make_temp_dir(out)
        try:
            writer = ShardedWriter(temp, plan.layout)
            try:
                executor = Executor(plan, writer, progress, allow_nonfinite=allow_nonfinite)
                times = executor.times
                executor.run()
            finally:
                t1 = time.perf_counter()
                writer.close()  # flushes the shards to disk (fsync) before anything is renamed
                times.add(flush=time.perf_counter() - t1)
            t1 = time.perf_counter()
            shards = [s.filename for s in plan.layout.shards]
            write_manifest(temp, shards + ([INDEX_NAME] if len(shards) > 1 else []), writer.digests)
            times.add(manifest=time.perf_counter() - t1)
            _write_extras(plan, temp, copy_tokenizer)
            files = sorted(p.name for p in temp.iterdir())
            finalize(temp, out, overwrite)
        except OSError as e:
            shutil.rmtree(temp, ignore_errors=True)
            raise FusemergeError(_write_error(out, e)) from e
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return MergeResult(out, time.perf_counter() - t0, plan.input_bytes, plan.output_bytes, files, times, plan,
                       executor.nonfinite)


def _write_error(out: Path, e: OSError) -> str:
    """One line for an OSError met while writing the output; disk full and file too large said plainly."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"writing {out}{where}: the disk is full ({e.strerror}); nothing was written to {out}"
    if e.errno == errno.EFBIG:
        return (f"writing {out}{where}: file too large ({e.strerror}) for the file system or the file-size limit; "
                f"nothing was written to {out}")
    return f"writing {out}{where}: {e.strerror or e}"


def _write_extras(plan: MergePlan, directory: Path, copy_tokenizer: bool) -> None:
    """config.json (dtype updated), tokenizer files, fusemerge_config.yml and a README model card."""
    ref_dir = _model_dir(plan.reference.path)
    config_path = ref_dir / "config.json"
    if config_path.is_file() and plan.reference.config is not None:
        cfg = dict(plan.reference.config)
        if plan.out_dtype_name:
            cfg["torch_dtype"] = plan.out_dtype_name
            if "dtype" in cfg:
                cfg["dtype"] = plan.out_dtype_name
        if plan.config.slices is not None:  # layer stacking: the output's layer count (mergekit/merge.py)
            keys = [k for k in LAYER_COUNT_KEYS if k in cfg] or [LAYER_COUNT_KEYS[0]]
            for key in keys:
                cfg[key] = plan.config.num_output_layers
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if copy_tokenizer:
        src = _tokenizer_dir(plan)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, directory / name)
    (directory / "fusemerge_config.yml").write_text(plan.config.to_yaml())
    (directory / "README.md").write_text(_model_card(plan))


def _model_dir(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def _tokenizer_dir(plan: MergePlan) -> Path:
    source = plan.config.tokenizer_source
    if source and source != "base":
        return _model_dir(Path(source))
    return _model_dir(plan.reference.path)


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
