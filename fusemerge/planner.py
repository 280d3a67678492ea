"""Validate every input at once and decide what the merge will do, before any tensor is merged.

`build_plan` opens every model's safetensors headers (never the data), checks that every model has
every tensor with the same shape and dtype, resolves every parameter for every tensor, lays out the
output shards and sizes the chunks from the memory budget. Every problem found is reported together
in one InputError (CLI exit code 2); nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fusemerge.config import (
    FLOAT32_MAX,
    LAYER_NAME_RE,
    MergeConfig,
    OutputSlice,
    SliceSource,
    infer_num_layers,
    layer_index,
    load_config,
    slice_t,
    sums_to_zero,
)
from fusemerge.errors import InputError
from fusemerge.kernels.della import check_epsilon, rank_layout, unit
from fusemerge.kernels.layout import dim0_columns, row_length, whole_units
from fusemerge.kernels.params import MAX_EXPERTS
from fusemerge.methods import Method
from fusemerge.options import opt, opt_name
from fusemerge.sizes import format_size, parse_shard_size, parse_size
from fusemerge.streaming.model_index import ModelIndex, open_model
from fusemerge.streaming.processes import use_processes
from fusemerge.streaming.safetensors_header import TensorEntry
from fusemerge.streaming.writer import OutputLayout, OutputTensor, plan_layout

FLOAT_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_NAMES = {v: k for k, v in DTYPE_NAMES.items()}

# The files `run` copies from the tokenizer's model (--copy-tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)

# Tied embeddings: where a model without lm_head.weight keeps the matrix it ties to.
TIED_ALIASES = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}

# CPU chunk cap: 2^18 elements keeps each float32 temporary at 1 MiB, inside L2/L3, where torch's
# elementwise ops run several times faster than from DRAM; bigger chunks only add memory.
CPU_CHUNK_CAP = 1 << 18
GPU_CHUNK_CAP = 1 << 26
MIN_CHUNK = 1 << 8  # below this, per-chunk overhead dominates; only tests go near it
DEFAULT_CPU_BUDGET = 2 << 30


@dataclass
class TensorPlan:
    """One output tensor: its inputs and its resolved parameters."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the reference model's safetensors dtype code (float inputs may differ: `mixed_dtypes`)
    out_dtype: str
    base: TensorEntry | None
    inputs: list[TensorEntry]  # the experts, or for linear the averaged models
    weights: list[float]
    density: list[float]
    gamma: list[float]
    lam: float
    normalize: bool
    rescale: object  # True / False / "inverse"
    copy_only: bool = False  # a non-float tensor: copied from the reference model unchanged
    t: float | None = None  # slerp's interpolation factor (inputs: the base's tensor, then the other model's)
    karcher: tuple[int, float] | None = None  # karcher's (max_iter, tol)
    eps: float | None = None  # multislerp's (normalize: its normalize_weights)
    epsilon: list[float] | None = None  # DELLA's, per expert
    select_topk: float | None = None  # SCE's
    ram: tuple[float, tuple[float, float] | None] | None = None  # RAM's epsilon and RAM+'s (r, alpha) or None
    filter_wise: bool = False  # model_stock's per-row weights
    nuslerp_rows: bool = False  # nuslerp_flatten: false: one arc per row
    nuslerp_cols: bool = False  # and nuslerp_row_wise: true: one arc per column (the vectors along dimension 0)

    @property
    def unit(self) -> int:
        """Entries a chunk holds whole (kernels/layout.py): DELLA's rank units (kernels/della.py), the rows of
        model_stock's filter_wise and nuslerp's per-row arcs, the rows of a per-column nuslerp's columns; else 1."""
        if self.epsilon is not None:
            return unit(rank_layout(self.shape))
        if self.filter_wise or self.nuslerp_rows:
            return self.row_length
        if self.nuslerp_cols:
            return self.columns
        return 1

    @property
    def columns(self) -> int:
        """A per-column nuslerp's columns: the vectors along dimension 0 (1 for a 1-D tensor)."""
        return dim0_columns(self.shape)

    @property
    def row_length(self) -> int:
        """model_stock filter_wise's and a per-row nuslerp's row length: the last dimension's."""
        return row_length(self.shape)

    def chunk(self, elems: int) -> int:
        """Elements per chunk of this tensor for a chunk size of `elems`: a whole number of units, at least one."""
        return whole_units(self.unit, elems)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def entries(self) -> list[TensorEntry]:
        """The experts' entries, then the base's."""
        return self.inputs + ([self.base] if self.base is not None else [])

    @property
    def input_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def mixed_dtypes(self) -> bool:
        """Whether the inputs were saved in different float dtypes: the merge then reads float32 copies."""
        return len({e.dtype for e in self.entries}) > 1


@dataclass
class MergePlan:
    """Everything `run` needs; `summary()` is what `fusemerge plan` prints."""

    config: MergeConfig
    method: Method
    base: ModelIndex | None
    models: list[ModelIndex]  # experts (linear: averaged models), in order
    reference: ModelIndex  # where config.json, tokenizer and the tensor layout come from
    tensors: list[TensorPlan]
    layout: OutputLayout
    out_dtype_name: str | None
    device: torch.device
    backend: str
    budget: int
    chunk_elems: int
    workers: int
    resident_bytes: int  # per worker: a tensor whose inputs fit (`kept_bytes`) is read once for all its passes
    seed: int
    num_layers: int | None
    warnings: list[str] = field(default_factory=list)
    pinned_bytes: int | None = None  # pinned host memory of the CUDA pipeline (None: its default, 1 GiB)
    devices: tuple[torch.device, ...] = ()  # every GPU of `--device cuda:0,cuda:1,...` (device is the first)
    partition: tuple[int, int] | None = None  # (i, n): this plan merges part i of n only (fusemerge/partition.py)
    whole: MergePlan | None = None  # a part's plan: the plan of the whole merge (every tensor, the whole layout)

    @property
    def compute_devices(self) -> tuple[torch.device, ...]:
        """The devices the merge runs on: several GPUs share the tensors (one pipeline each)."""
        return self.devices or (self.device,)

    @property
    def input_bytes(self) -> int:
        return sum(t.input_bytes for t in self.tensors)

    @property
    def all_tensors(self) -> list[TensorPlan]:
        """Every tensor of the whole merge, also in a part's plan (`trim_scope: global` needs them all)."""
        return (self.whole or self).tensors

    def part(self, i: int, n: int) -> MergePlan:
        """The plan of part `i` of `n` (0 <= i < n) of this merge, split by output shard: it merges and writes the
        shards `s` (0-based, in file order) with `s % n == i`, and nothing else. Raises InputError when the output
        has fewer than `n` shards."""
        i, n = parse_partition((i, n))
        shards = self.layout.shards
        if n > len(shards):
            raise InputError(f"{opt('partition', f'{i}/{n}')}: the output has {len(shards)} shard(s) and each part is "
                             f"made of whole shards; use at most {len(shards)} parts, or a smaller "
                             f"{opt_name('out_shard_size')} for "
                             "more shards")
        layout = self.layout.subset([s.filename for s in part_shards(shards, i, n)])
        names = {name for shard in layout.shards for name in shard.tensor_names}
        return replace(self, tensors=[t for t in self.tensors if t.name in names], layout=layout, partition=(i, n),
                       whole=self)

    @property
    def native_cpu(self) -> bool:
        """Whether CPU chunks stay in the files' dtype: the compiled loops of kernels/cpu_fused.py read bf16 / fp16
        as they are (the torch operations take float32 copies)."""
        from fusemerge.kernels import cpu_fused

        return self.device.type == "cpu" and self.backend == "torch" and cpu_fused.available()

    def kept_bytes(self, t: TensorPlan) -> int:
        """Bytes tensor `t`'s inputs take when kept in memory for all its passes: on the GPU, one row per input of
        the widest input's itemsize (the pipeline's resident copy); on the CPU, as in the files where the compiled
        loops read them, else (the torch operations, or inputs of different dtypes) as float32 copies."""
        if self.device.type != "cpu":
            return len(t.entries) * max(e.itemsize for e in t.entries) * t.numel
        if not self.native_cpu or t.mixed_dtypes:
            return len(t.entries) * 4 * t.numel
        return t.input_bytes

    @property
    def output_bytes(self) -> int:
        return self.layout.total_size

    @property
    def global_trim(self) -> bool:
        """`trim_scope: global`: one threshold per expert over the whole model, found before any tensor merges."""
        return self.method.needs_thresholds and self.config.trim_scope == "global"

    @property
    def global_workers(self) -> int:
        """How many workers share `trim_scope: global`'s passes over the whole model (CPU: one per chunk at most)."""
        chunks = -(-sum(t.numel for t in self.all_tensors if not t.copy_only) // self.chunk_elems)
        return max(1, min(self.workers if self.device.type == "cpu" else 1, chunks))

    @property
    def radix_passes(self) -> int:
        """Reads of a tensor's inputs the radix select takes where they are not kept: 1 on the CPU path, whose
        first pass also collects the entries the second would read (`select._collecting_histograms`; a chunk
        whose estimate missed, the first at least, is read once more), where the passes run in one worker;
        else 2 (`trim_scope: global` split among workers, the GPU)."""
        one_worker = not self.global_trim or self.global_workers == 1
        return 1 if self.device.type == "cpu" and self.backend == "torch" and one_worker else 2

    def needs_statistics(self, t: TensorPlan) -> bool:
        """Whether t's parameters come from a statistics pass over its inputs (thresholds, an L1 rescale, DARE's,
        DELLA's or a trim's, the angles of slerp, model_stock, nuslerp, multislerp and karcher)."""
        m = self.method
        if t.filter_wise or t.nuslerp_rows:  # each row's weights from the row itself, in the merge pass
            return False
        if m.is_ram:  # RAM+'s counts; ram has no statistics
            return t.ram is not None and t.ram[1] is not None
        return m.tensor_weights or m.is_sce or (not m.is_linear and (m.needs_thresholds or (
            m.sparsifier in ("dare", "della") and t.rescale is True)))

    def reads(self, t: TensorPlan) -> int:
        """How often tensor `t`'s inputs are read: once, or with the statistics passes first (thresholds: the
        radix select's `radix_passes`; an L1 rescale, DARE's or a trim's: max |d|, then the sums) when `t` does
        not fit a worker's resident share (a tensor that fits, `kept_bytes`, is read once and kept: in host memory
        on CPU, on the GPU in the pipeline). With `trim_scope: global` the thresholds are not kept: every tensor
        is read by the whole-model passes, its rescale's if any, and its merge. (A tie cut whose kept entries
        overflowed their room adds a counting pass: rare.)"""
        m = self.method
        if t.copy_only or not self.needs_statistics(t):
            return 1
        if m.is_ram:  # RAM+'s counting pass, then the merge
            return 1 if self.kept_bytes(t) <= self.resident_bytes else 2
        # angles, SCE's weights: max |x| (SCE: and its non-zero count), then the sums, as an L1 rescale
        l1 = 2 if t.rescale is True or m.tensor_weights or m.is_sce else 0
        if self.global_trim:
            return 1 + self.radix_passes + l1
        select = self.radix_passes if m.needs_thresholds or (m.is_sce and t.select_topk < 1.0) else 0
        return 1 if self.kept_bytes(t) <= self.resident_bytes else 1 + select + l1

    def read_bytes(self) -> int:
        """Input bytes read by the whole run (`reads` of every tensor); for a part, its own tensors only (the
        whole-model passes of `trim_scope: global` read every part's: `whole.input_bytes` more, once per pass)."""
        own = sum(t.input_bytes * self.reads(t) for t in self.tensors)
        if self.whole is not None and self.global_trim:
            own += self.radix_passes * (self.whole.input_bytes - self.input_bytes)
        return own

    def summary(self) -> str:
        cfg = self.config
        lines = [
            f"method        {self.method.name} ({self.method.paper})",
            f"base model    {self.base.path if self.base else '-'}",
        ]
        label = "models" if self.method.combines_models else "experts"
        for i, m in enumerate(self.models):
            lines.append(f"{label + ' ' * (13 - len(label)) if i == 0 else ' ' * 13} {m.path}")
        chunked = sum(1 for t in self.tensors if t.numel > self.chunk_elems)
        params = sum(t.numel for t in self.tensors)
        lines += [
            f"tensors       {len(self.tensors)} ({params:,} parameters, {chunked} larger than one chunk)",
            f"input         {format_size(self.input_bytes)}" + _reads_note(self),
            f"output        {format_size(self.output_bytes)} in {len(self.layout.shards)} shard(s),"
            f" dtype {self.out_dtype_name or 'as the inputs'}",
            f"device        {', '.join(str(d) for d in self.compute_devices)} (backend {self.backend}, "
            + (f"{len(self.compute_devices)} GPUs, one pipeline each)" if len(self.compute_devices) > 1
               else f"{self.workers} worker processes)" if use_processes(self, self.device.type == "cuda")
               else f"{self.workers} worker(s))"),
            f"memory        budget {format_size(self.budget)}"
            + (" per GPU" if len(self.compute_devices) > 1 else "") + f", chunks of {self.chunk_elems:,} elements",
        ]
        if self.device.type == "cuda":
            twice = [t for t in self.tensors if self.reads(t) > 1]
            shared = f" shared by {len(self.compute_devices)} GPUs" if len(self.compute_devices) > 1 else ""
            pinned = format_size(self.pinned_bytes or (1 << 30))
            lines.append(f"pipeline      pinned host memory {pinned}{shared}; "
                         + ("trim_scope: global's passes read the whole model ahead, then every tensor merges as "
                            "it streams" if self.global_trim else
                            "tensors needing statistics are kept on the GPU and read once"
                            + (f", except {len(twice)} larger than {format_size(self.resident_bytes)} (read 3x)"
                               if twice else "")))
        if cfg.trim_scope == "global":
            lines.append("trim scope    global (one threshold per expert over the whole model)")
        if self.partition is not None and self.whole is not None:
            i, n = self.partition
            whole = self.whole
            files = ", ".join(str(whole.layout.shards.index(s) + 1) for s in self.layout.shards)
            lines.append(f"partition     part {i}/{n}: output shard(s) {files} of {len(whole.layout.shards)}, "
                         f"{format_size(self.output_bytes)} of {format_size(whole.output_bytes)}; "
                         "`fusemerge finalize` joins the parts")
            if self.global_trim:
                lines.append(f"              the global thresholds read the whole model's "
                             f"{format_size(whole.input_bytes)} first, in the first part to start; the others "
                             "wait for them and read them from OUT_DIR.fusemerge-parts/")
        lines += [f"warning       {w}" for w in self.warnings]
        return "\n".join(lines)


def parse_partition(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """`--partition I/N` as (i, n), 0 <= i < n: "0/4" is the first of four parts. None stays None.

    >>> parse_partition("1/4")
    (1, 4)
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if m is None:
            raise InputError(f"{opt('partition', spec)}: expected I/N, the part I (counted from 0) of N parts, "
                             "e.g. 0/4")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        i, n = (int(x) for x in spec)
    if n < 1 or not 0 <= i < n:
        raise InputError(f"{opt('partition', f'{i}/{n}')}: I must be 0 to N - 1 (parts are counted from 0), N at "
                         "least 1")
    return i, n


def part_shards(shards: list, i: int, n: int) -> list:
    """The output shards of part `i` of `n`: every n-th, from the i-th (0-based, in file order). Round-robin, so
    the parts get about equal bytes when the shards have equal size, as `--out-shard-size` makes them."""
    return [shard for s, shard in enumerate(shards) if s % n == i]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{opt('device', device)}: expected auto, cpu, cuda, cuda:N or cuda:0,cuda:1,...") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{opt('device', device)}: expected auto, cpu, cuda, cuda:N or cuda:0,cuda:1,...")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{opt('device', device)}: no CUDA device is available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{opt('device', device)}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_devices(device: str | None) -> tuple[torch.device, ...]:
    """`--device`: one device, or several GPUs as a comma-separated list (cuda:0,cuda:1 or 0,1 after cuda:)."""
    if device is None or "," not in device:
        return (resolve_device(device),)
    names = [d.strip() for d in device.split(",")]
    names = [n if n.startswith("cuda") or not n.isdigit() else f"cuda:{n}" for n in names]
    devs = [resolve_device(n) for n in names]
    if any(d.type != "cuda" for d in devs):
        raise InputError(f"{opt('device', device)}: a list of devices must be GPUs (cuda:0,cuda:1,...)")
    devs = [torch.device("cuda", d.index if d.index is not None else 0) for d in devs]
    if len(set(devs)) != len(devs):
        raise InputError(f"{opt('device', device)}: a GPU is listed twice")
    return tuple(devs)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend in (None, "auto"):
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("torch", "triton"):
        raise InputError(f"{opt('backend', backend)}: expected auto, torch or triton")
    return backend


def layer_count(reference: ModelIndex) -> int | None:
    """L of the model's layer stack: config.json's num_hidden_layers, else its largest layer index + 1 (the
    same layer names, `layers.N.` at the start of a name too, as gradients and slices read)."""
    return infer_num_layers(reference.tensors, reference.config)


def _entry(model: ModelIndex, name: str) -> TensorEntry | None:
    entry = model.tensors.get(name)
    if entry is None and (model.config or {}).get("tie_word_embeddings"):
        for alias in TIED_ALIASES.get(name, ()):
            if alias in model.tensors:
                return model.tensors[alias]
    return entry


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _reads_note(plan: MergePlan) -> str:
    """`input` line's tail: how many bytes the run reads, when that is more than the inputs once."""
    total = plan.read_bytes()
    if total <= plan.input_bytes:
        return ", each byte read once"
    passes = "once" if plan.radix_passes == 1 else "twice"
    rescale = any(t.rescale is True for t in plan.tensors if not t.copy_only)
    global_why = (f"trim_scope: global reads the whole model {passes} for its thresholds"
                  + (", and each tensor twice more for its L1 rescale" if rescale else ""))
    if plan.whole is not None and plan.global_trim:
        return (f", {format_size(total)} read in all by the first part to start ({global_why}), "
                f"{format_size(plan.input_bytes)} by the others")
    again = [t for t in plan.tensors if plan.reads(t) > 1]
    why = global_why if plan.global_trim else (
        f"the statistics passes re-read {len(again)} tensor(s) larger than a worker's resident share "
        f"({format_size(plan.resident_bytes)})")
    return f", {format_size(total)} read in all ({total / plan.input_bytes:.1f}x: {why})"


def build_plan(
    config: str | Path | dict | MergeConfig,
    *,
    device: str | None = "auto",
    backend: str | None = "auto",
    max_memory: str | int | None = None,
    out_shard_size: str | int = "5GB",
    seed: int = 0,
    workers: int | None = None,
    max_pinned_memory: str | int | None = None,
    partition: str | tuple[int, int] | None = None,
) -> MergePlan:
    """Validate everything and return the plan; raises InputError listing every problem.

    `partition` ("i/n" or (i, n)): the plan of part i of n of the merge only (`MergePlan.part`).
    """
    problems: list[str] = []  # the options' first, then the config's and the models'
    o = _run_options(problems, device, backend, max_memory, out_shard_size, seed, workers, max_pinned_memory,
                     partition)
    dev = o.devices[0]
    try:
        cfg = config if isinstance(config, MergeConfig) else load_config(config)
    except InputError as e:  # still check the models the config names, to report everything at once
        raise InputError(problems + e.problems + _model_problems(config)) from None
    method = cfg.method
    problems.extend(_tokenizer_problems(cfg))

    # Open every model once (a model listed twice is one index).
    opened: dict[Path, ModelIndex | None] = {}

    def open_once(path: Path) -> ModelIndex | None:
        key = Path(os.path.abspath(path))
        if key not in opened:
            try:
                opened[key] = open_model(path)
            except InputError as e:
                problems.extend(e.problems)
                opened[key] = None
        return opened[key]

    base = open_once(cfg.base_model.path) if cfg.base_model is not None else None
    out_code = _out_code(cfg)
    if cfg.slices is not None:
        sliced = _SlicePlanner(cfg, method, open_once, base, out_code, problems)
        tensors, warnings, models, reference = sliced.plan()
        num_layers, checked_only = cfg.num_output_layers, False
    else:
        tensors, warnings, models, reference, num_layers, checked_only = _models_plan(
            cfg, method, open_once, base, out_code, problems)
    n_inputs = max([len(t.inputs) + (t.base is not None) for t in tensors] + [2])  # what a chunk reads
    problems.extend(_global_trim_problems(cfg, tensors))
    warnings = [*cfg.notes, *warnings, *_output_warnings(cfg, [reference, *models], tensors)]
    if cfg.tokenizer_source and not problems:
        _vocabulary_checks(cfg, reference, [*models, *([base] if base is not None else [])], tensors, problems,
                           warnings)
    backend_name = _backend_for(o.backend, backend, tensors, dev, problems, warnings)
    if problems or checked_only:
        raise InputError(_collapse_repeats(problems))

    out_tensors = [OutputTensor(t.name, t.out_dtype, t.shape) for t in tensors]
    layout = plan_layout(out_tensors, o.shard_bytes)
    n_workers = o.workers or (min(2, os.cpu_count() or 1) if dev.type == "cpu" else 1)
    chunk = _chunk_elems(o.budget, n_inputs, n_workers, dev)
    if chunk < MIN_CHUNK:
        need = format_size(2 * MIN_CHUNK * n_workers * _bytes_per_elem(n_inputs))
        raise InputError(f"{opt('max_memory', format_size(o.budget))} is too small: {n_workers} worker(s) x "
                         f"{n_inputs} inputs need at least {need}")
    wide = [t for t in tensors if t.unit > chunk]
    if wide:  # DELLA ranks a row's entries together, filter-wise model_stock weighs them: a chunk holds whole rows
        t = max(wide, key=lambda t: t.unit)
        verb = "ranks" if t.epsilon is not None else "weighs"
        raise InputError(f"{opt('max_memory', format_size(o.budget))} is too small for {method.name}: it {verb} "
                         f"the {t.unit:,} entries of each row of tensor '{t.name}' (shape "
                         f"{list(t.shape)}) together, and a chunk holds {chunk:,}; raise {opt_name('max_memory')}")

    plan = MergePlan(cfg, method, base, models, reference, tensors, layout,
                     CODE_NAMES.get(out_code) if out_code else None, dev, backend_name, o.budget, chunk, n_workers,
                     o.budget // (2 * n_workers), o.seed, num_layers, warnings, o.pinned,
                     o.devices if len(o.devices) > 1 else ())
    return plan.part(*o.part) if o.part is not None else plan


@dataclass(frozen=True)
class _RunOptions:
    """build_plan's options, checked; where one is wrong, a stand-in that lets the rest be checked too."""

    part: tuple[int, int] | None
    devices: tuple[torch.device, ...]
    backend: str
    shard_bytes: int
    budget: int
    workers: int | None
    seed: int
    pinned: int | None


def _run_options(problems: list[str], device, backend, max_memory, out_shard_size, seed, workers,
                 max_pinned_memory, partition) -> _RunOptions:
    """Check every option of build_plan, adding what is wrong to `problems`."""
    try:
        part = parse_partition(partition)
    except InputError as e:
        problems.extend(e.problems)
        part = None
    try:
        devices = resolve_devices(device)
    except InputError as e:
        problems.extend(e.problems)
        devices = (torch.device("cpu"),)  # to check the other options
    dev = devices[0]
    try:
        backend_name = resolve_backend(backend, dev)
    except InputError as e:
        problems.extend(e.problems)
        backend_name = "torch"
    try:
        shard_bytes = parse_shard_size(out_shard_size)
    except ValueError as e:
        problems.append(f"{opt_name('out_shard_size')}: {e}")
        shard_bytes = 5 * 10**9
    try:
        budget = (parse_size(max_memory) if max_memory not in (None, "auto")
                  else min(_default_budget(d) for d in devices))
    except ValueError as e:
        problems.append(f"{opt_name('max_memory')}: {e}")
        budget = DEFAULT_CPU_BUDGET
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        problems.append(f"{opt('workers', workers)}: must be a whole number of at least 1")
        workers = None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):  # 1.5 or "1" would key other DARE masks
        problems.append(f"{opt('seed', seed)}: expected an integer")
        seed = 0
    pinned = None
    if max_pinned_memory is not None:
        try:
            pinned = parse_size(max_pinned_memory)
        except ValueError as e:
            problems.append(f"{opt_name('max_pinned_memory')}: {e}")
    return _RunOptions(part, devices, backend_name, shard_bytes, budget, workers, int(seed), pinned)


def _global_trim_problems(cfg: MergeConfig, tensors: list[TensorPlan]) -> list[str]:
    """trim_scope: global ranks each expert over the whole model, so every merged tensor needs one density."""
    merged = [t for t in tensors if not t.copy_only]
    if cfg.trim_scope != "global" or not merged:
        return []
    first = merged[0]
    for t in merged:
        if t.density != first.density:
            return [f"{cfg.label}: trim_scope: global needs one density per model for every tensor, "
                    f"but '{t.name}' resolves to {t.density} and '{first.name}' to {first.density}"]
    return []


def _output_warnings(cfg: MergeConfig, inputs: list[ModelIndex], tensors: list[TensorPlan]) -> list[str]:
    """What the output will lack, or how it is made where one might not expect it, said before the merge."""
    warnings = []
    mixed = [t for t in tensors if not t.copy_only and t.mixed_dtypes]
    if mixed:
        codes = sorted({e.dtype for t in mixed for e in t.entries})
        outs = sorted({t.out_dtype for t in mixed})
        warnings.append(f"{len(mixed)} tensor(s) have copies in different dtypes ({', '.join(codes)}; e.g. "
                        f"'{mixed[0].name}'): merged from float32 copies of every input (exact), written as "
                        f"{', '.join(outs)} (out_dtype / dtype, else the base model's)")
    if all(m.config is None for m in inputs):
        warnings.append("no input model has a config.json: the output will have none (Transformers needs one to "
                        "load it)")
    if cfg.chat_template:
        warnings.append("chat_template: kept in fusemerge_config.yml, not written into the output's tokenizer "
                        "(mergekit writes it)")
    return warnings


def _backend_for(backend_name: str, asked: str | None, tensors: list[TensorPlan], dev: torch.device,
                 problems: list[str], warnings: list[str]) -> str:
    """The backend after counting models per tensor: the Triton kernels take at most MAX_EXPERTS."""
    most = max([len(t.inputs) for t in tensors if not t.copy_only] + [0])
    if backend_name != "triton" or most <= MAX_EXPERTS:
        return backend_name
    if asked in (None, "auto"):
        warnings.append(f"{most} models per tensor, more than the Triton kernels take ({MAX_EXPERTS}): the torch "
                        f"backend merges them on {dev}")
        return "torch"
    problems.append(f"{opt('backend', 'triton')}: {most} models per tensor, more than the Triton kernels "
                    f"take ({MAX_EXPERTS}); {opt('backend', 'torch')} merges any number")
    return backend_name

def _models_plan(cfg: MergeConfig, method: Method, open_once: Callable[[Path], ModelIndex | None],
                 base: ModelIndex | None, out_code: str | None, problems: list[str]):
    """The TensorPlans of a `models:` config: output tensor X merges tensor X of every model."""
    # cfg.models: the experts (base excluded), or for linear every averaged model (base appended if unlisted)
    members = [(open_once(ref.path), i) for i, ref in enumerate(cfg.models)]
    if not members:
        problems.append(f"{cfg.label}: models: no model to merge besides the base model")
    usable = [(m, i) for m, i in members if m is not None]
    if not usable or (cfg.base_model is not None and base is None):
        raise InputError(problems)
    if len(usable) < len(members):  # check the models that did open against each other, then stop
        members = usable
        checked_only = True
    else:
        checked_only = False

    models = [m for m, _ in members]
    reference = base if base is not None else models[0]
    num_layers = layer_count(reference)

    tensors: list[TensorPlan] = []
    warnings: list[str] = []
    unmergeable: dict[str, list[str]] = {}
    for name in sorted(reference.tensors, key=_natural_key):
        ref_entry = reference.tensors[name]
        entries = [_entry(m, name) for m in models]
        base_entry = base.tensors[name] if base is not None and not method.combines_models else None
        missing = [str(m.path) for m, e in zip(models, entries, strict=True) if e is None]
        if missing:
            problems.append(f"tensor '{name}' is missing in {', '.join(missing)} (present in {reference.path})")
            continue
        labelled = [(str(m.path), e) for m, e in zip(models, entries, strict=True)]
        if not _same_shape_and_dtype(name, str(reference.path), ref_entry, labelled, problems):
            continue
        if _unmergeable(method, name, ref_entry, unmergeable):
            continue
        if ref_entry.dtype not in FLOAT_CODES and not _passthrough_float(method, ref_entry):
            tensors.append(_copy_plan(name, ref_entry))
            warnings.append(f"tensor '{name}' has dtype {ref_entry.dtype}: copied from {reference.path} unchanged")
            continue

        def per_model(pname: str, name: str = name) -> list[float]:
            return [float(cfg.param(pname, name, idx, num_layers)) for _, idx in members]

        def global_param(pname: str, default: object, name: str = name) -> object:
            return cfg.param(pname, name, None, num_layers) if pname in method.params else default

        try:
            tensors.append(_tensor_plan(method, name, ref_entry, base_entry, entries, per_model, global_param,
                                        out_code or ref_entry.dtype))
        except InputError as e:
            problems.extend(e.problems)

    problems.extend(_unmergeable_lines(unmergeable, str(reference.path)))
    for m in models:
        extra = [n for n in m.tensors if n not in reference.tensors and not _is_alias_source(n, reference)]
        depth = infer_num_layers(reference.tensors) or 0  # from the names: what the reference's files hold
        stack = {_with_layer(n, 0) for n in reference.tensors if layer_index(n) is not None}
        # layers of the reference's own stack past its depth (not another stack's: a vision tower's layers.5)
        deeper = [n for n in extra if layer_index(n) is not None and layer_index(n) >= depth
                  and _with_layer(n, 0) in stack]
        if deeper:  # a deeper stack (a depth-upscaled fine-tune): merging its first layers only would be a guess
            problems.append(f"{m.path}: {len(deeper)} tensor(s) of layers {reference.path} does not have (first: "
                            f"'{sorted(deeper, key=_natural_key)[0]}'): it has {infer_num_layers(m.tensors)} "
                            f"layers, {reference.path} {depth}; models: merges models with one layer stack "
                            f"(slices: with layer_range picks the layers of each)")
        elif extra:
            warnings.append(f"{m.path}: {len(extra)} tensor(s) not in {reference.path} are ignored "
                            f"(first: '{extra[0]}')")
    return tensors, warnings, models, reference, num_layers, checked_only


class _SlicePlanner:
    """The TensorPlans of a `slices:` config, following mergekit/plan.py (plan_module / plan_slice).

    Output layers are the slices' layer ranges one after another, renumbered from 0: output layer
    `n + offset` (n = the layers of the slices before) merges layer `source.layer_range[0] + offset` of
    every source of its slice, under the same tensor name with that layer number. A gradient is read at
    `t = offset / (slice length - 1)` (1 for a one-layer slice). Tensors outside the layer stack come
    from the first slice's sources when they are embeddings (mergekit's "pre" weights: `embed_tokens`,
    `wte`, ...) and from the last slice's sources otherwise ("post" weights: final norm, `lm_head`), at
    t = 0 and with that slice's parameters.
    """

    def __init__(self, cfg: MergeConfig, method: Method, open_once: Callable[[Path], ModelIndex | None],
                 base: ModelIndex | None, out_code: str | None, problems: list[str]):
        self.cfg, self.method, self.open_once, self.base = cfg, method, open_once, base
        self.out_code, self.problems = out_code, problems
        self.tensors: list[TensorPlan] = []
        self.warnings: list[str] = []
        self.unmergeable: dict[str, list[str]] = {}
        self._templates: dict[Path, set[str]] = {}

    def plan(self) -> tuple[list[TensorPlan], list[str], list[ModelIndex], ModelIndex]:
        cfg = self.cfg
        assert cfg.slices is not None
        indices = {src.ref.path: self.open_once(src.ref.path) for sl in cfg.slices for src in sl.sources}
        if any(m is None for m in indices.values()) or (cfg.base_model is not None and self.base is None):
            raise InputError(self.problems)
        self.indices: dict[Path, ModelIndex] = indices  # type: ignore[assignment]
        self._check_ranges()
        if self.problems:
            raise InputError(self.problems)
        first = cfg.slices[0].sources[0]
        reference = self.base if self.base is not None else self.indices[first.ref.path]
        out_layer = 0
        for i, sl in enumerate(cfg.slices):
            for offset in range(sl.num_layers):
                self._plan_layer(i, sl, offset, out_layer)
                out_layer += 1
        # Non-layer tensors: the names the first source model has outside the layer stack, the post weights of
        # the last slice's first model (with a tied first model, the last slice's lm_head.weight)
        last = cfg.slices[-1].sources[0]
        names = {n for n in self.indices[first.ref.path].tensors if layer_index(n) is None}
        names |= {n for n in self.indices[last.ref.path].tensors if layer_index(n) is None and not _is_pre_weight(n)}
        # and the reference's, whose config.json the output takes, where the slice's sources have them: an untied
        # base listed after a tied model would otherwise lose its lm_head.weight (a random head on load)
        kept = len(cfg.slices[0].sources)
        for name in sorted(n for n in reference.tensors if layer_index(n) is None and n not in names):
            at = 0 if _is_pre_weight(name) else len(cfg.slices) - 1
            if all(_entry(self.indices[src.ref.path], name) is not None for src in cfg.slices[at].sources[:kept]):
                names.add(name)
            else:
                self.warnings.append(f"tensor '{name}' of {reference.path} is not in every source of slices[{at}], "
                                     "which it would come from: not written")
        if len(cfg.slices[-1].sources) > kept:
            dropped = ", ".join(src.ref.model for src in cfg.slices[-1].sources[kept:])
            self.warnings.append(f"slices[{len(cfg.slices) - 1}]: the tensors after the layers (final norm, lm_head) "
                                 f"merge the first {kept} of its sources, as many as slices[0] has, as mergekit "
                                 f"does; not {dropped}")
        for name in sorted(names, key=_natural_key):
            sl = cfg.slices[0] if _is_pre_weight(name) else cfg.slices[-1]
            sources = sl.sources[:kept]  # mergekit zips post weights with slice 0's count
            self._plan_tensor(name, sl, [(src, name) for src in sources], t=0.0)
        self.problems.extend(_unmergeable_lines(self.unmergeable, "the slices' models"))
        self.tensors.sort(key=lambda t: _natural_key(t.name))
        models = [self.indices[ref.path] for ref in cfg.models]
        return self.tensors, self.warnings, models, reference

    def _check_ranges(self) -> None:
        assert self.cfg.slices is not None
        for i, sl in enumerate(self.cfg.slices):
            for j, src in enumerate(sl.sources):
                model = self.indices[src.ref.path]
                n = layer_count(model) or 0
                if src.layer_range[1] > n:
                    self.problems.append(
                        f"{self.cfg.label}: slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is past "
                        f"the {n} layers of {model.path}")

    def _layer_names(self, path: Path) -> set[str]:
        """The names a layer of this model has, with layer number 0 (over all its layers: a tensor missing from
        one layer is reported missing, not silently left out)."""
        if path not in self._templates:
            model = self.indices[path]
            self._templates[path] = {_with_layer(n, 0) for n in model.tensors if layer_index(n) is not None}
        return self._templates[path]

    def _plan_layer(self, i: int, sl: OutputSlice, offset: int, out_layer: int) -> None:
        names = set().union(*(self._layer_names(src.ref.path) for src in sl.sources))
        t = slice_t(offset, sl.num_layers)
        for name in sorted(names, key=_natural_key):
            out_name = _with_layer(name, out_layer)
            inputs = [(src, _with_layer(name, src.layer_range[0] + offset)) for src in sl.sources]
            self._plan_tensor(out_name, sl, inputs, t)

    def _plan_tensor(self, out_name: str, sl: OutputSlice, inputs: list[tuple[SliceSource, str]], t: float) -> None:
        cfg, method = self.cfg, self.method
        base_path = cfg.base_model.path if cfg.base_model is not None and method.needs_base else None
        found: list[tuple[SliceSource, str, TensorEntry]] = []
        missing = []
        for src, in_name in inputs:
            entry = _entry(self.indices[src.ref.path], in_name)
            if entry is None:
                missing.append(f"'{in_name}' in {self.indices[src.ref.path].path}")
            else:
                found.append((src, in_name, entry))
        if missing:
            self.problems.append(f"tensor '{out_name}': input tensor {', '.join(missing)} is missing")
            return
        base_at = [k for k, (src, _, _) in enumerate(found) if src.ref.path == base_path]
        if base_path is not None and not base_at:
            self.problems.append(f"tensor '{out_name}': the base model {cfg.base_model.model!r} is not among "
                                 "its sources")
            return
        base_entry = found[base_at[0]][2] if base_at else None
        members = [f for k, f in enumerate(found) if k not in base_at]
        if method.combines_models and base_at:  # slerp, model_stock: the base's tensor is the first input
            members.insert(0, found[base_at[0]])
        ref_src, ref_name, ref_entry = found[0]
        labelled = [(f"{self.indices[src.ref.path].path} ('{n}')", e) for src, n, e in found[1:]]
        ref_label = f"{self.indices[ref_src.ref.path].path} ('{ref_name}')"
        if not _same_shape_and_dtype(out_name, ref_label, ref_entry, labelled, self.problems):
            return
        if _unmergeable(method, out_name, ref_entry, self.unmergeable):
            return
        if ref_entry.dtype not in FLOAT_CODES and not _passthrough_float(method, ref_entry):
            self.tensors.append(_copy_plan(out_name, ref_entry))
            self.warnings.append(f"tensor '{out_name}' has dtype {ref_entry.dtype}: copied from {ref_label} unchanged")
            return

        def per_model(pname: str) -> list[float]:
            return [float(cfg.slice_param(pname, sl, src, in_name, t)) for src, in_name, _ in members]

        def global_param(pname: str, default: object) -> object:
            return cfg.slice_param(pname, sl, None, out_name, t) if pname in method.params else default

        try:
            self.tensors.append(_tensor_plan(method, out_name, ref_entry,
                                             None if method.combines_models else base_entry,
                                             [e for _, _, e in members], per_model, global_param,
                                             self.out_code or (base_entry or ref_entry).dtype))  # the base's
        except InputError as e:
            self.problems.extend(e.problems)


# mergekit's architecture files' pre weights: embed_tokens / embeddings / embed_in (GPT-NeoX), wte / wpe (GPT-2),
# word_embeddings(_layernorm) (Falcon, BLOOM), tok_embeddings (InternLM2); GPT-NeoX's embed_out is its head
_PRE_WEIGHT_RE = re.compile(
    r"(?:^|\.)(?!embed_out(?:\.|$))(?:embed\w*|wte|wpe|word_embeddings\w*|tok_embeddings)(?:\.|$)")


def _is_pre_weight(name: str) -> bool:
    """Embeddings come before the layer stack (mergekit's pre_weights); other non-layer tensors after it."""
    return _PRE_WEIGHT_RE.search(name) is not None


def _with_layer(name: str, layer: int) -> str:
    """`name` with its layer number replaced: _with_layer("model.layers.3.mlp.w", 7) == "model.layers.7.mlp.w"."""
    match = LAYER_NAME_RE.search(name)
    assert match is not None, name
    return f"{name[:match.start(1)]}{layer}{name[match.end(1):]}"


def _same_shape_and_dtype(name: str, ref_label: str, ref_entry: TensorEntry, others: list[tuple[str, TensorEntry]],
                          problems: list[str]) -> bool:
    bad = [f"{label} has {list(e.shape)}" for label, e in others if e.shape != ref_entry.shape]
    if bad:
        hint = " (the vocabularies differ: merging models with different vocabularies is not supported)" if (
            "embed" in name or "lm_head" in name or "wte" in name) else ""
        problems.append(f"tensor '{name}': shape mismatch: {ref_label} has {list(ref_entry.shape)}, "
                        f"{'; '.join(bad)}{hint}")
        return False
    bad = [f"{label} has {e.dtype}" for label, e in others if e.dtype != ref_entry.dtype]
    if bad and not all(e.dtype in FLOAT_CODES for e in [ref_entry, *(e for _, e in others)]):
        # float32 / float16 / bfloat16 copies may differ (models saved in different dtypes: each delta is taken
        # between float32 copies, which are exact); other dtypes are copied as they are, so they must agree
        problems.append(f"tensor '{name}': dtype mismatch: {ref_label} has {ref_entry.dtype}, {'; '.join(bad)}")
        return False
    return True


def _copy_plan(name: str, entry: TensorEntry) -> TensorPlan:
    """A tensor copied byte for byte (non-float tensors; passthrough without scale or dtype change)."""
    return TensorPlan(name, entry.shape, entry.dtype, entry.dtype, None, [entry], [1.0], [], [], 1.0, False, False,
                      copy_only=True)


def _model_problems(config: object) -> list[str]:
    """Problems with the models a config names, read from the raw YAML (used when the config is invalid, so that
    one run reports them too): each model that cannot be opened, and, for a `models:` config, each tensor of the
    base (else the first model) that another model lacks or holds with another shape or dtype. These do not
    depend on the method or its parameters; a `slices:` config's tensors do (its layer ranges), so its models
    are only opened."""
    import yaml

    try:
        raw = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text())
    except (OSError, ValueError, yaml.YAMLError, TypeError, RecursionError):
        return []  # load_config has said what is wrong with the file
    paths = []
    if isinstance(raw, dict):
        if isinstance(raw.get("base_model"), str):
            paths.append(raw["base_model"])
        models = raw.get("models")
        for m in models if isinstance(models, list) else []:
            if isinstance(m, dict) and isinstance(m.get("model"), str):
                paths.append(m["model"])
    problems: list[str] = []
    opened: list[ModelIndex] = []
    for p in dict.fromkeys(paths):
        if "+" in p and not Path(p).expanduser().exists():  # MODEL+LORA: load_config has said it is not supported
            continue
        try:
            opened.append(open_model(Path(p).expanduser()))  # as load_config takes the path
        except InputError as e:
            problems.extend(e.problems)
    if opened and "slices" not in raw:
        reference, others = opened[0], opened[1:]  # paths[0]: the base when there is one
        for name in sorted(reference.tensors, key=_natural_key):
            entries = [(m, _entry(m, name)) for m in others]
            missing = [str(m.path) for m, e in entries if e is None]
            if missing:
                problems.append(f"tensor '{name}' is missing in {', '.join(missing)} (present in {reference.path})")
                continue
            _same_shape_and_dtype(name, str(reference.path), reference.tensors[name],
                                  [(str(m.path), e) for m, e in entries], problems)
    return problems


def _tokenizer_problems(cfg: MergeConfig) -> list[str]:
    """tokenizer_source: a model path must be a directory holding tokenizer files (mergekit fails on one that
    does not; a merge that copied nothing from it would be a model without the tokenizer asked for)."""
    source = cfg.tokenizer_source
    if not source or source == "base":
        return []
    directory = tokenizer_dir(cfg, None)
    if not directory.is_dir():
        return [f"{cfg.label}: tokenizer_source: {source!r}: no such directory"]
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return [f"{cfg.label}: tokenizer_source: {directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}"
                ", ...)"]
    return []


def _vocabulary_checks(cfg: MergeConfig, reference: ModelIndex, inputs: list[ModelIndex], tensors: list[TensorPlan],
                       problems: list[str], warnings: list[str]) -> None:
    """tokenizer_source: fusemerge copies that tokenizer and merges the embedding rows by index; mergekit rebuilds
    embed_tokens / lm_head for it, row by token, at the tokenizer's length. Those agree when every model numbers
    its tokens as the source does (checked here from tokenizer.json, where the models have one: else refused)
    and the rows are the tokenizer's (else a warning: padding rows are kept, where mergekit drops them)."""
    source_dir = tokenizer_dir(cfg, reference)
    vocab_file, source_bytes, want = _vocabulary_of(source_dir)
    if want is None:
        warnings.append(f"tokenizer_source: no readable tokenizer.json or vocab.json in {source_dir}: the models' "
                        "vocabularies were not compared (fusemerge merges the embedding rows by index)")
        return
    seen: set[Path] = set()
    unchecked: list[Path] = []
    for m in inputs:
        d = model_dir(m.path)
        if d in seen or d == source_dir:
            continue
        seen.add(d)
        data = _read_bytes(d / vocab_file)
        if data == source_bytes:  # the same file (the usual case): no 10 MB JSON parsed per model
            continue
        got = _vocabulary(data) if vocab_file == "tokenizer.json" else _plain_vocabulary(data)
        if got is None:
            unchecked.append(d)
            continue
        # every token of the source at its id (a model that only added tokens after them is fine)
        if any(got.get(tok) != i for tok, i in want.items()):
            token = next(tok for tok in sorted(want) if got.get(tok) != want[tok])
            problems.append(f"{cfg.label}: tokenizer_source: {d} numbers its tokens differently from {source_dir} "
                            f"(token {token!r}: id {got.get(token)} against {want.get(token)}); fusemerge merges "
                            "embedding rows by index (mergekit re-aligns them by token), so the models must share "
                            "one vocabulary")
    if unchecked:
        warnings.append(f"tokenizer_source: {', '.join(map(str, unchecked))} has no readable {vocab_file}: its "
                        f"vocabulary was not compared with {source_dir}'s (the embedding rows are merged by index)")
    size = max(want.values(), default=-1) + 1
    rows = {t.name: t.shape[0] for t in tensors if _is_vocab_tensor(t.name) and t.shape}
    padded = {name: r for name, r in rows.items() if r != size}
    if padded:
        name, r = next(iter(padded.items()))
        warnings.append(f"tokenizer_source: '{name}' has {r:,} rows and the tokenizer {size:,} tokens: fusemerge keeps "
                        f"the models' rows (mergekit resizes embed_tokens / lm_head to the tokenizer's length)")


_VOCAB_TENSOR_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|lm_head|embed_out|word_embeddings)\.weight$")


def _is_vocab_tensor(name: str) -> bool:
    return _VOCAB_TENSOR_RE.search(name) is not None


def model_dir(path: str | Path) -> Path:
    """The directory of a model given as its directory or as one of its files."""
    path = Path(path)
    return path.parent if path.is_file() else path


def tokenizer_dir(cfg: MergeConfig, reference: ModelIndex | None) -> Path:
    """Where the tokenizer comes from: `tokenizer_source` (a path taken as mergekit takes it: `~` expanded,
    relative to the current directory), else the reference model (the base, else the first model)."""
    source = cfg.tokenizer_source
    if source and source != "base":
        return model_dir(Path(os.path.abspath(os.path.expanduser(source))))
    assert reference is not None
    return model_dir(reference.path)


def _vocabulary_of(directory: Path) -> tuple[str, bytes | None, dict[str, int] | None]:
    """(file, its bytes, token -> id) of a model's vocabulary: tokenizer.json, else vocab.json (a plain map)."""
    raw = _read_bytes(directory / "tokenizer.json")
    vocab = _vocabulary(raw)
    if vocab is not None:
        return "tokenizer.json", raw, vocab
    raw = _read_bytes(directory / "vocab.json")
    return "vocab.json", raw, _plain_vocabulary(raw)


def _plain_vocabulary(raw: bytes | None) -> dict[str, int] | None:
    """token -> id of a vocab.json's bytes (a JSON object of ids); None without a readable one."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)} or None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _vocabulary(raw: bytes | None) -> dict[str, int] | None:
    """token -> id of a tokenizer.json's bytes (its model's vocab and its added tokens); None without a readable
    one."""
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    out: dict[str, int] = {}
    if isinstance(vocab, dict):
        out.update({str(k): v for k, v in vocab.items() if isinstance(v, int)})
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...] numbered by position
        out.update({str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, list) and p})
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int) and "content" in tok:
            out[str(tok["content"])] = tok["id"]
    return out or None


def _unmergeable(method: Method, name: str, entry: TensorEntry, found: dict[str, list[str]]) -> bool:
    """A floating-point tensor the kernels do not take (F64, the F8 formats): recorded in `found` by dtype, to be
    refused, unless the method copies it (passthrough). Integer and bool tensors are copied, as mergekit does."""
    if method.is_passthrough or entry.dtype in FLOAT_CODES or not entry.dtype.startswith("F"):
        return False
    found.setdefault(entry.dtype, []).append(name)
    return True


def _passthrough_float(method: Method, entry: TensorEntry) -> bool:
    """An F64 / FP8 tensor of a passthrough: planned as one (copied, or refused when it would need a change)."""
    return method.is_passthrough and entry.dtype.startswith("F")


def _unmergeable_lines(found: dict[str, list[str]], where: str) -> list[str]:
    return [f"{where}: {len(names)} tensor(s) of dtype {dtype} (first: '{names[0]}'): fusemerge merges F32, F16 "
            "and BF16 tensors; convert the checkpoints first" + (" (an FP8 checkpoint's weights also need their "
            "scales applied)" if dtype.startswith("F8") else "") for dtype, names in found.items()]


def _is_alias_source(name: str, reference: ModelIndex) -> bool:
    return any(name in aliases and src in reference.tensors for src, aliases in TIED_ALIASES.items())


def _out_code(cfg: MergeConfig) -> str | None:
    name = cfg.out_dtype or cfg.dtype
    return DTYPE_NAMES[name] if name else None


def _tensor_plan(method: Method, name: str, ref_entry: TensorEntry, base_entry: TensorEntry | None,
                 entries: list[TensorEntry], per_model_values: Callable[[str], list[float]],
                 global_value: Callable[[str, object], object], out_code: str) -> TensorPlan:
    """One float tensor's plan from its inputs and its parameters, resolved by the given callables."""
    if method.is_passthrough:
        scale = per_model_values("scale") if "scale" in method.params else []
        if scale == [1.0] and out_code == ref_entry.dtype:
            return _copy_plan(name, entries[0])
        if not all(abs(v) <= FLOAT32_MAX for v in scale):
            raise InputError(f"tensor '{name}': scale resolves to {scale}, beyond float32's range (the merge "
                             "computes in float32)")
        if ref_entry.dtype not in FLOAT_CODES:  # F64 / FP8: copied as they are, never scaled or converted
            raise InputError(f"tensor '{name}' has dtype {ref_entry.dtype}: passthrough copies it as it is, but the "
                             f"config asks for scale {scale} and output dtype {CODE_NAMES.get(out_code, out_code)}"
                             "; fusemerge converts and scales F32, F16 and BF16 tensors only")
        return TensorPlan(name=name, shape=ref_entry.shape, dtype=ref_entry.dtype, out_dtype=out_code, base=None,
                          inputs=entries, weights=scale, density=[], gamma=[], lam=1.0, normalize=False,
                          rescale=False)
    return TensorPlan(name=name, shape=ref_entry.shape, dtype=ref_entry.dtype, out_dtype=out_code, base=base_entry,
                      inputs=entries, **tensor_parameters(method, name, per_model_values, global_value))


def tensor_parameters(method: Method, name: str, per_model_values: Callable[[str], list[float]],
                      global_value: Callable[[str, object], object]) -> dict[str, object]:
    """A merged tensor's parameters as TensorPlan (and merge_tensors) take them: weights, density, gamma (one
    per model), lam, normalize, rescale, resolved by the callables and checked (InputError)."""
    problems = []
    if method.is_slerp or method.is_nearswap:
        t = global_value("t", None)
        if t is None:
            raise InputError(f"tensor '{name}': t has no value here (no filter rule matches it); give "
                             f"{method.name}'s t a rule without filter: (or a plain value) for the tensors the others "
                             "leave out")
        if not abs(t) <= FLOAT32_MAX:  # the config refuses a plain t this large; a gradient may resolve to it
            raise InputError(f"tensor '{name}': t resolves to {t}, beyond float32's range (the merge computes in "
                             "float32)")
        return dict(weights=[], density=[], gamma=[], lam=1.0, normalize=False, rescale=False, t=float(t))
    if method.is_model_stock:  # its weights come from the tensors alone (per row with filter_wise)
        return dict(weights=[], density=[], gamma=[], lam=1.0, normalize=False, rescale=False,
                    filter_wise=bool(global_value("filter_wise", False)))

    def setting(pname: str) -> object:  # a method's own parameter: its value here, or its default (Method.params)
        return global_value(pname, method.params[pname].default)

    if method.is_ram:  # epsilon decides what counts as changed; RAM+'s scales come from the tensors
        plus = (float(setting("r")), float(setting("alpha"))) if "r" in method.params else None
        return dict(weights=[], density=[], gamma=[], lam=1.0, normalize=False, rescale=False,
                    ram=(float(setting("epsilon")), plus))
    if method.is_sce:  # its weights come from the tensors; select_topk picks the entries kept
        return dict(weights=[], density=[], gamma=[], lam=1.0, normalize=False, rescale=False,
                    select_topk=float(setting("select_topk")))
    if method.is_karcher:  # so do karcher's, by an iteration that these two settle
        return dict(weights=[], density=[], gamma=[], lam=1.0, normalize=False, rescale=False,
                    karcher=(int(setting("max_iter")), float(setting("tol"))))

    def per_model(pname: str) -> list[float]:
        return per_model_values(pname) if pname in method.params else []

    density = per_model("density")
    gamma = per_model("gamma")
    epsilon = per_model("epsilon")
    for i, d in enumerate(density):
        if not 0.0 < d <= 1.0:
            problems.append(f"tensor '{name}': density of model {i} resolves to {d}, outside (0, 1]")
        elif epsilon and check_epsilon(d, epsilon[i]) is not None:
            problems.append(f"tensor '{name}': model {i}'s {check_epsilon(d, epsilon[i])}")
    for i, g in enumerate(gamma):
        if not 0.0 <= g <= 1.0:
            problems.append(f"tensor '{name}': gamma of model {i} resolves to {g}, outside [0, 1]")
    weights = per_model("weight")
    lam = float(global_value("lambda", 1.0))
    for what, values in (("weight", weights), ("lambda", [lam])):
        for i, v in enumerate(values):
            if not abs(v) <= FLOAT32_MAX:  # the math is float32: 1e39 would be infinite there
                where = f" of model {i}" if what == "weight" else ""
                problems.append(f"tensor '{name}': {what}{where} resolves to {v}, beyond float32's range "
                                "(the merge computes in float32)")
    if method.is_multislerp:
        normalize = bool(setting("normalize_weights"))
        if normalize and sums_to_zero(weights):
            problems.append(f"tensor '{name}': the weights resolve to {weights}, which add up to 0, and "
                            "normalize_weights is true, so multislerp would divide by 0: give the models' "
                            "parameters.weight values that do not cancel there, or set normalize_weights: false")
        if problems:
            raise InputError(problems)
        return dict(weights=weights, density=[], gamma=[], lam=1.0, normalize=normalize, rescale=False,
                    eps=float(setting("eps")))
    normalize = bool(global_value("normalize", False))
    if normalize and method.consensus == "none" and weights and sums_to_zero(weights):
        # the config refuses scalar weights that do; gradients and filter rules resolve per tensor
        problems.append(f"tensor '{name}': the weights resolve to {weights}, which add up to 0, and normalize is "
                        f"true, so the merge would divide by 0{ZERO_SUM_HINT}")
    extra: dict[str, object] = {"epsilon": epsilon} if epsilon else {}
    if method.is_nuslerp and not setting("nuslerp_flatten"):  # one arc per row, or per column with row_wise
        extra["nuslerp_cols" if setting("nuslerp_row_wise") else "nuslerp_rows"] = True
    if problems:
        raise InputError(problems)
    return dict(weights=weights, density=density, gamma=gamma, lam=lam, normalize=normalize,
                rescale=global_value("rescale", False), **extra)


ZERO_SUM_HINT = ": give the models' parameters.weight values that do not cancel there, or set normalize: false"


def _collapse_repeats(problems: list[str]) -> list[str]:
    """One line for the tensors whose weights add up to 0 (a gradient may cancel on every tensor of a layer), and
    one per parameter for the tensors past the layer stack that a gradient has no value for (every tensor of
    that layer), where more than three tensors say the same; every other problem keeps its own line."""
    problems = _fold(problems, lambda p: p.endswith(ZERO_SUM_HINT), lambda p: "", "so do those of")
    return _fold(problems, lambda p: "where a gradient has no value" in p, lambda p: _TENSOR_RE.sub("tensor *", p),
                 "the same for")


_TENSOR_RE = re.compile(r"tensor '[^']*'")


def _fold(problems: list[str], belongs: Callable[[str], bool], key: Callable[[str], str], phrase: str) -> list[str]:
    """The problems `belongs` picks, grouped by `key`: a group of more than three is its first line, naming the
    other tensors after `phrase` (before the zero-sum hint where the line ends with it), at the first one's place."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        if belongs(p) and _TENSOR_RE.search(p):
            groups.setdefault(key(p), []).append(i)
    drop, merged = set(), {}
    for hits in groups.values():
        if len(hits) <= 3:
            continue
        others = [_TENSOR_RE.search(problems[i]).group(0)[len("tensor "):] for i in hits[1:]]
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        note = f" ({phrase} {len(others)} other tensors: {', '.join(others[:3])}{more})"
        first = problems[hits[0]]
        tail = ZERO_SUM_HINT if first.endswith(ZERO_SUM_HINT) else ""
        merged[hits[0]] = first[:len(first) - len(tail)] + note + tail
        drop.update(hits[1:])
    return [merged.get(i, p) for i, p in enumerate(problems) if i not in drop]


def _bytes_per_elem(n_inputs: int) -> int:
    # float32 copies of every input, one product per expert, ~6 float32 temporaries, the output.
    return 4 * (2 * n_inputs + 6) + 4


def _chunk_elems(budget: int, n_inputs: int, workers: int, dev: torch.device) -> int:
    """Elements per chunk: each worker's share of the budget is half chunk working memory, half resident inputs."""
    cap = CPU_CHUNK_CAP if dev.type == "cpu" else GPU_CHUNK_CAP
    return min(cap, budget // (2 * workers * _bytes_per_elem(n_inputs)))


def _default_budget(dev: torch.device) -> int:
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.8)
    avail = available_ram()
    if avail is None:
        return DEFAULT_CPU_BUDGET
    return max(64 << 20, min(DEFAULT_CPU_BUDGET, avail // 4))


def available_ram(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of RAM a new allocation can get: Linux's MemAvailable (free pages plus the page cache and other
    memory the kernel can reclaim; a merge's inputs fill the cache, and free pages alone would shrink the
    default budget on every later run), else the free pages (SC_AVPHYS_PAGES), else None."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


