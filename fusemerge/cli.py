"""The `fusemerge` command line: thin click commands over the library.

Exit codes: 0 success, 2 bad input (one line per problem on stderr), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, handled as Ctrl-C), 1 anything else.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from fusemerge import __version__, startup
from fusemerge.errors import FusemergeError, InputError
from fusemerge.methods import METHODS
from fusemerge.options import spelled_for_cli
from fusemerge.sizes import format_size

log = logging.getLogger("fusemerge")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler preempting the job: Slurm, Kubernetes), handled as Ctrl-C is: the run stops at
    once, keeps what it wrote for `--resume`, and exits with 143 (128 + SIGTERM)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _fail(problems: list[str], code: int) -> None:
    for p in problems:
        click.echo(f"fusemerge: error: {p}", err=True)
    sys.exit(code)


def _handle_errors(fn):
    """Turn library errors into the documented exit codes and one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", 0) or kwargs.get("verbose", 0)
        try:
            with spelled_for_cli():  # messages name --options, not the API's keywords
                _end_startup()
                return fn(*args, **kwargs)
        except BrokenPipeError:  # `fusemerge inspect DIR | head`: the reader has gone, nothing to say
            sys.stdout = None  # no flush of the closed pipe at exit
            os._exit(0)
        except InputError as e:
            _fail(e.problems, 2)
        except FusemergeError as e:
            _fail([str(e)], 1)
        except MemoryError:
            _fail(["out of memory: lower --max-memory or use a machine with more memory"], 1)
        except OSError as e:
            _fail([f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"], 1)
        except KeyboardInterrupt as e:
            command = click.get_current_context().info_name
            how, code = startup.STOPPED[signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT]
            _fail([{"run": f"{how}; nothing was written to the output directory (run the same command with "
                           "--resume to continue)",
                    "finalize": f"{how}; the parts are as they were (run the same command again)"}.get(
                        command, how)], code)
        except Exception as e:  # a bug: say so, with the traceback when asked
            if verbose:
                traceback.print_exc()
                if getattr(e, "worker_traceback", None):  # raised in a CPU worker process (streaming/processes.py)
                    click.echo(f"in the worker process:\n{e.worker_traceback}", err=True)
            _fail([f"internal error: {type(e).__name__}: {e} (run with -v for the traceback; please report it)"], 1)

    return wrapper


def _end_startup() -> None:
    """The command's work begins: from here Ctrl-C raises KeyboardInterrupt, for `_handle_errors` (until here it
    exited at once: fusemerge/startup.py). torch is imported first, inside start-up: a KeyboardInterrupt raised
    while its C++ calls back into Python aborts the process (pybind11: terminate called ...)."""
    if startup.active():
        import torch  # noqa: F401

        startup.end()


def forget_caught_interrupt() -> None:
    """CPython (3.11 at least) remembers a KeyboardInterrupt that ended a string `exec` (dataclasses and namedtuple
    make their methods so: torch's import runs hundreds), caught or not, and `python -m fusemerge` then ends by
    SIGINT (status -2) in place of our exit code (130). Every string exec starts by forgetting it: this one last."""
    exec("pass", {})


def _plan_options(fn):
    options = [
        click.option("--device", default="auto", show_default=True,
                     help="Where the math runs: auto (first GPU, else CPU), cpu, cuda, cuda:N, or several GPUs: "
                          "cuda:0,cuda:1,... (they share the tensors; --max-memory applies to each)."),
        click.option("--cuda", "cuda_flag", is_flag=True, help="mergekit's alias for --device cuda."),
        click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
                     help="auto: Triton kernels on CUDA, torch elsewhere; triton on CPU runs the interpreter (slow)."),
        click.option("--max-memory", default=None,
                     help="Working-memory bound on the compute device, e.g. 512MiB, 8GiB (default: a safe "
                          "fraction of what is free). Tensors larger than fits are processed in chunks."),
        click.option("--out-shard-size", default="5GB", show_default=True,
                     help="Bytes per output shard: 5GB, 2GiB, or mergekit's forms (an integer; 500M, 5B with k/M/B "
                          "= thousand / million / billion bytes)."),
        click.option("--seed", type=int, default=None, help="DARE's and DELLA's seed (default 0)."),
        click.option("--random-seed", type=int, default=None, help="mergekit's alias for --seed."),
        click.option("--workers", type=int, default=None, help="Tensors merged at once (default: 2 on CPU, 1 on GPU)."),
        click.option("--max-pinned-memory", default=None,
                     help="Pinned host memory of the GPU pipeline's read-ahead and write-back buffers (default 1GiB)."),
        click.option("--partition", default=None, metavar="I/N",
                     help="Only part I of N (I from 0), split by output shard (run: written into "
                          "OUT_DIR.fusemerge-parts/; run the N parts anywhere that shares the file system, then "
                          "`fusemerge finalize OUT_DIR`)."),
        click.option("--allow-crimes", is_flag=True,
                     help="mergekit's flag (mix architectures); accepted with a note: fusemerge checks tensor "
                          "names, shapes and dtypes, never architecture names."),
        click.option("--lazy-unpickle/--no-lazy-unpickle", "lazy_unpickle", default=False,
                     help="mergekit's flag; accepted, does nothing (fusemerge maps safetensors and .bin files; "
                          "it never unpickles more than plain tensors)."),
        click.option("--trust-remote-code/--no-trust-remote-code", "trust_remote_code", default=False,
                     help="mergekit's flag; accepted with a note: fusemerge never runs model code."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


MERGEKIT_FLAG_NOTES = {
    "allow_crimes": "--allow-crimes is accepted for mergekit compatibility and changes nothing: fusemerge checks "
                    "tensor names, shapes and dtypes, not architecture names",
    "trust_remote_code": "--trust-remote-code is accepted for mergekit compatibility and changes nothing: "
                         "fusemerge reads config.json and tensor files only and never runs model code",
}


def _plan_kwargs(device, cuda_flag, backend, max_memory, out_shard_size, seed, random_seed, workers,
                 max_pinned_memory=None, partition=None, allow_crimes=False, lazy_unpickle=False,
                 trust_remote_code=False) -> dict:
    """The build_plan arguments of the shared options; mergekit-only flags print their one-line note here."""
    for flag, on in (("allow_crimes", allow_crimes), ("trust_remote_code", trust_remote_code)):
        if on:
            click.echo(f"fusemerge: note: {MERGEKIT_FLAG_NOTES[flag]}", err=True)
    if cuda_flag and device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"--cuda and --device {device} disagree")
    if seed is not None and random_seed is not None and seed != random_seed:
        raise InputError(f"--seed {seed} and --random-seed {random_seed} disagree")
    return dict(device="cuda" if cuda_flag and device == "auto" else device, backend=backend, max_memory=max_memory,
                out_shard_size=out_shard_size, seed=seed if seed is not None else (random_seed or 0), workers=workers,
                max_pinned_memory=max_pinned_memory, partition=partition)


# click >= 8.2 raises this (a UsageError) for a group called without a command; older click prints the help itself
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """click's own usage errors (a missing argument, an unknown option, OUT_DIR that is a file) as the one line
    every other input error is (exit 2), not click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_HELP as e:  # `fusemerge` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"fusemerge: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("fusemerge: error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusemerge")
@click.option("-v", "--verbose", count=True, help="More logging (debug messages); `run -v` prints per-stage times.")
def main(verbose: int) -> None:
    """Merge fine-tuned LLM checkpoints from mergekit YAML configs, streaming, in bounded memory."""
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                        format="%(message)s")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@_plan_options
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy tokenizer files from the base model (or tokenizer_source).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty OUT_DIR.")
@click.option("--resume", is_flag=True,
              help="Continue a merge into OUT_DIR that was killed or interrupted, merging only the tensors it had "
                   "not written; same bytes as an uninterrupted run. Refused (exit 2) if the config, --seed (DARE, "
                   "DELLA), --out-shard-size or an input changed since. With nothing to resume, starts from the "
                   "beginning; into a finished merge of the same config and inputs, does nothing but write again a "
                   "file deleted from it since (refused if an input was rewritten since it was read; --overwrite "
                   "then merges again).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge inputs that hold NaN or Inf (default: stop, naming the tensor and the input files).")
@click.option("-v", "--verbose", count=True, help="Print per-stage times.")
@_handle_errors
def run(config, out_dir, copy_tokenizer, overwrite, resume, allow_nonfinite, quiet, verbose, **opts) -> None:
    """Merge the models of CONFIG (mergekit YAML) into OUT_DIR (Hugging Face layout).

    The merge is written into .OUT_DIR.fusemerge-tmp next to OUT_DIR and renamed into place when complete. A run
    that is killed leaves it behind: --resume continues it; a run without --resume removes it and starts over.
    """
    from fusemerge.merge import already_merged
    from fusemerge.merge import run as run_merge
    from fusemerge.planner import build_plan

    plan = build_plan(config, **_plan_kwargs(**opts))
    for w in plan.warnings:
        click.echo(f"fusemerge: warning: {w}", err=True)
    if verbose:
        click.echo(plan.summary(), err=True)
    done = resume and already_merged(out_dir, plan, overwrite) is not None  # run() says so, in one note
    bar = None if quiet or done else _progress_bar(plan.input_bytes)
    try:
        result = run_merge(config, out_dir, plan=plan, copy_tokenizer=copy_tokenizer, overwrite=overwrite,
                           resume=resume, allow_nonfinite=allow_nonfinite, progress=bar.update if bar else None,
                           notify=_note)
    finally:
        if bar:
            bar.close()
    try:
        _report(plan, result, out_dir, quiet, verbose)
    except KeyboardInterrupt:  # the merge is in place: an interrupt now only cuts the summary short
        sys.exit(0)


def _report(plan, result, out_dir, quiet: bool, verbose: int) -> None:
    """What `run` prints once the merge is in place."""
    for line in result.nonfinite:
        click.echo(f"fusemerge: warning: {line} (merged: --allow-nonfinite)", err=True)
    if verbose:
        t = result.times
        gpu = plan.device.type == "cuda"
        over = ("reader threads" + (f" and {len(plan.compute_devices)} GPUs" if len(plan.compute_devices) > 1 else "")
                if gpu else f"{plan.workers} worker(s)")
        click.echo(f"stage seconds (summed over {over}): "
                   f"read {t.read:.2f}, " + (f"H2D {t.h2d:.2f}, " if gpu else "") + f"statistics {t.stats:.2f}, "
                   f"merge {t.merge:.2f}" + (" (kernels)" if gpu else "") + f", write {t.write:.2f}; then fsync "
                   f"{t.flush:.2f}, shard SHA-256 {t.manifest:.2f}", err=True)
        if t.firsts:
            click.echo(f"first piece of each stage done (seconds after the executor started): {t.startup_line()}",
                       err=True)
        if t.masks_drawn or t.masks_reused:
            click.echo(t.masks_line(), err=True)
    if not quiet and not result.finished_before:
        resumed = (f", {result.resumed_tensors} of them ({format_size(result.resumed_bytes)} in) already written "
                   "by the interrupted run") if result.resumed_tensors else ""
        part = f"part {plan.partition[0]}/{plan.partition[1]}: " if plan.partition else ""
        click.echo(f"merged {part}{len(plan.tensors)} tensors ({format_size(result.input_bytes)} in, "
                   f"{format_size(result.output_bytes)} out{resumed}) in {result.seconds:.1f} s "
                   f"({result.input_gbps:.2f} GB/s) -> {result.out_dir}")
    if not quiet and plan.partition:
        click.echo(f"when all {plan.partition[1]} parts are merged: fusemerge finalize {out_dir}")


def _note(line: str) -> None:
    click.echo(f"fusemerge: note: {line}", err=True)


class _Progress:
    """A thread-safe tqdm byte counter (bytes/s and ETA)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                         dynamic_ncols=True, file=sys.stderr)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(total: int) -> _Progress:
    return _Progress(total)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_plan_options
@_handle_errors
def plan(config, **opts) -> None:
    """Validate CONFIG and every input it names, print the plan, merge nothing."""
    from fusemerge.planner import build_plan

    p = build_plan(config, **_plan_kwargs(**opts))
    click.echo(p.summary())
    click.echo("plan OK: every model, tensor, shape, dtype and parameter checked")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty OUT_DIR.")
@click.option("--keep-parts", is_flag=True,
              help="Keep OUT_DIR.fusemerge-parts/ afterwards (its shards become hard links to OUT_DIR's).")
@click.option("--verify", is_flag=True,
              help="Read every part's shards and check their SHA-256 against the part manifests before joining.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
@_handle_errors
def finalize(out_dir, overwrite, keep_parts, verify, quiet) -> None:
    """Join the parts of a merge run with --partition I/N into OUT_DIR.

    Checks that every part is finished and of one merge, then puts their shards, the index, the manifest and the
    model's other files into OUT_DIR (the same files as one run of the whole merge) and removes the parts.
    """
    from fusemerge.partition import finalize as join_parts

    result = join_parts(out_dir, overwrite=overwrite, keep_parts=keep_parts, verify=verify,
                        notify=(lambda line: None) if quiet else _note)
    if not quiet:
        click.echo(f"joined {result.parts} part(s): {result.shards} shard(s), {format_size(result.output_bytes)} "
                   f"in {result.seconds:.1f} s -> {result.out_dir} (`fusemerge verify {result.out_dir}` re-hashes "
                   "every shard)")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@_handle_errors
def inspect(path, tensors) -> None:
    """Show the tensors, dtypes, shapes, shards and parameter count of a model directory or file."""
    from fusemerge.streaming.model_index import open_model

    model = open_model(Path(path))
    entries = sorted(model.tensors.values(), key=lambda e: e.name)
    if tensors:
        width = max((len(e.name) for e in entries), default=4)
        many = len(model.files) > 1
        for e in entries:
            shard = f"  {e.file.name}" if many else ""
            click.echo(f"{e.name:<{width}}  {e.dtype:<5} {str(list(e.shape)):<20}{shard}")
        click.echo("")
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(model.dtype_counts().items()))
    click.echo(f"model       {model.path}")
    click.echo(f"shards      {len(model.files)}")
    click.echo(f"tensors     {len(entries)} ({dtypes})")
    click.echo(f"parameters  {model.num_parameters:,}")
    click.echo(f"size        {format_size(model.total_bytes)}")
    if model.config:
        arch = model.config.get("architectures")
        arch = arch[0] if isinstance(arch, list) and arch else model.config.get("model_type", "?")
        click.echo(f"config      {arch}, {model.config.get('num_hidden_layers', '?')} layers, "
                   f"torch_dtype {model.config.get('torch_dtype', '?')}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@_handle_errors
def verify(out_dir) -> None:
    """Check every shard of a merge's OUT_DIR against its fusemerge_manifest.json (size, SHA-256, header)."""
    from fusemerge.verify import read_manifest
    from fusemerge.verify import verify as verify_dir

    problems = verify_dir(out_dir)
    if problems:
        raise InputError(problems)
    shards = [name for name in read_manifest(out_dir) if name.endswith(".safetensors")]
    click.echo(f"OK: {len(shards)} shards verified")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False), default="fusemerge-demo")
@click.option("--method", default="ties", show_default=True, help="Merge method to demonstrate.")
@click.option("--device", default="auto", show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@_handle_errors
def demo(out_dir, method, device, quiet) -> None:
    """Make a small base model and three experts in OUT_DIR, merge them, print a summary."""
    from fusemerge.demo import run_demo

    run_demo(Path(out_dir), method=method, device=device, echo=(lambda s: None) if quiet else click.echo)


@main.command()
@click.option("--method", type=click.Choice([m for m in METHODS if m != "passthrough"]), default="ties",
              show_default=True, help="Merge method (passthrough merges nothing to time).")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=0.2, show_default=True,
              help="density of the methods that take one (sce: its select_topk).")
@click.option("--experts", type=click.IntRange(min=1), default=4, show_default=True,
              help="models besides the base (methods that take a fixed number, such as slerp's one, take that).")
@click.option("--hidden", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--intermediate", type=click.IntRange(min=1), default=2816, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--vocab", type=click.IntRange(min=1), default=32000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True)
@click.option("--max-memory", default=None)
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the synthetic models are made (default: a temporary directory, removed afterwards).")
@_handle_errors
def bench(method, density, experts, hidden, intermediate, layers, vocab, device, backend, max_memory, workdir) -> None:
    """End-to-end throughput on a synthetic Llama-shaped model (bench/ in the repository has the full benchmarks)."""
    import shutil
    import tempfile

    from fusemerge.merge import run as run_merge
    from fusemerge.synthetic import make_llama_family, write_config_yaml

    m = METHODS[method]
    lo, hi = m.others
    n = min(max(experts, lo), hi if hi is not None else max(experts, lo))
    if n != experts:
        click.echo(f"{method} merges {n if hi == lo else f'at least {lo}'} model(s) besides the base: "
                   f"{n} expert(s), not {experts}")
    params: dict[str, object] = {}
    if "density" in m.params:
        params["density"] = density
    if "select_topk" in m.params:
        params["select_topk"] = density
    if "t" in m.params:  # slerp's interpolation factor, nearswap's distance: required, no default
        params["t"] = 0.5 if m.is_slerp else 1e-3
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fusemerge-bench-"))
    try:
        fam = make_llama_family(root / "models", n_experts=n, hidden=hidden, intermediate=intermediate,
                                layers=layers, vocab=vocab, seed=0)
        write_config_yaml(root / "bench.yml", method, fam["base"], fam["experts"], **params)
        result = run_merge(root / "bench.yml", root / "out", device=device, backend=backend, max_memory=max_memory,
                           overwrite=True)
        p = result.plan
        click.echo(f"{method}, {n} experts + base, {fam['params']:,} parameters each, bf16, on {p.device} "
                   f"({p.backend}, {p.workers} worker(s))")
        click.echo(f"{format_size(result.input_bytes)} in, {format_size(result.output_bytes)} out in "
                   f"{result.seconds:.2f} s: {result.input_gbps:.3f} GB/s of input (page cache warm: just written)")
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()


def entry_point() -> None:
    """The `fusemerge` command (and `python -m fusemerge`, through fusemerge/__main__.py): main(), with SIGTERM
    handled as Ctrl-C is, and either exiting at once during start-up (fusemerge/startup.py)."""
    startup.begin()  # already begun by fusemerge/__main__.py, before this module was imported
    startup.after(signal.SIGTERM, _on_sigterm)
    try:
        main()
    finally:
        forget_caught_interrupt()
