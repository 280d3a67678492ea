"""mergekit YAML -> a validated `MergeConfig`, and per-tensor parameter resolution.

A config file is the one users already feed to `mergekit-yaml`:

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: [0.2, 0.6]}     # a gradient over the layers
      - model: ./code
        parameters:
          density:
            - {filter: mlp, value: 0.3}                      # first matching rule wins
            - value: 0.5                                     # no filter: matches every tensor
    parameters: {lambda: 1.0, normalize: true}
    dtype: bfloat16

`load_config` reports every problem it finds at once (an `InputError`, one line per problem, each
naming the key, e.g. `config.yml: models[1].parameters.density: 1.5 is outside (0, 1]`).

Parameter values follow mergekit (`mergekit/config.py`, `mergekit/parameter_resolver.py`):
a value is a scalar, a gradient (a list of scalars, interpolated over the layer stack) or a list of
`{filter, value}` rules (a single rule may also be written without the list). A per-model value
that does not apply to a tensor (no rule matches) falls back to the top-level `parameters:`, then
to the method's default.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fusemerge.errors import InputError
from fusemerge.methods import METHODS, Method, ParamDef

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
)

FLOAT32_MAX = float(np.finfo(np.float32).max)

# mergekit's own merge methods that fusemerge does not implement, for a clearer message than "unknown" (arcee_fusion's
# threshold comes from quantiles of a random sample of each tensor).
MERGEKIT_ONLY_METHODS = (
    "arcee_fusion",
)

# Every spelling a user may write for the supported dtypes -> the canonical torch name.
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

TRIM_SCOPES = ("tensor", "global")

# Parameters mergekit accepts that change nothing in fusemerge's float32 math. `int8_mask` only picks
# the dtype of mergekit's sign mask (mergekit/merge_methods/generalized_task_arithmetic.py:42, :127);
# it is accepted (global-only, a bool) so mergekit configs load unchanged, and otherwise ignored.
MERGEKIT_NOOP_PARAMS = ("int8_mask",)

LAYER_NAME_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
_UNSET: Any = object()


# --------------------------------------------------------------------------------------------------
# The config objects


@dataclass
class ModelRef:
    """One model of the config.

    model:      the path exactly as written in the YAML.
    path:       that path made absolute against the current working directory at load time (as
                mergekit does: it opens the string as written, mergekit/common.py:161), `~` expanded.
    parameters: the per-model `parameters:` as written (unresolved scalars, gradients, rules).
    """

    model: str
    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of a `slices:` entry: layers [start, end) of one model, with its own `parameters:`."""

    ref: ModelRef
    layer_range: tuple[int, int]

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass
class OutputSlice:
    """One `slices:` entry: output layers made from equally long layer ranges of its sources.

    Output layer `offset` of the slice takes layer `source.layer_range[0] + offset` of every source.
    """

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


@dataclass
class MergeConfig:
    """A validated merge config; build it with `load_config`.

    models are the inputs the method combines, in order: for delta methods the experts (the base is
    not one, even when listed under `models:`); for `linear` every listed model, then the base when
    it is given and not listed (mergekit appends it, mergekit/plan.py:143-156). `listed_models` keeps
    the `models:` list as written. `parameters` are the top-level parameters as written.

    A `slices:` config has `slices` set (and `listed_models` empty); `models` then lists every model its
    sources name, once, in order of first appearance (the base excluded for delta methods).

    >>> cfg = load_config({"merge_method": "ties", "base_model": "b",
    ...                    "models": [{"model": "b"}, {"model": "e", "parameters": {"density": 0.3}}]})
    >>> [m.model for m in cfg.models], cfg.param("density", "model.layers.0.mlp.weight", 0)
    (['e'], 0.3)
    """

    method: Method
    base_model: ModelRef | None
    models: list[ModelRef]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    name: str | None = None
    trim_scope: str = "tensor"
    listed_models: list[ModelRef] = field(default_factory=list)
    slices: list[OutputSlice] | None = None
    source_path: Path | None = field(default=None, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    notes: list[str] = field(default_factory=list, compare=False)  # keys ignored, as mergekit ignores them

    def param(self, name: str, tensor_name: str, expert: int | None = None,
              num_layers: int | None = None) -> float | bool | str:
        """The value of parameter `name` for one tensor and one input model.

        Looks up the model's own `parameters:` (models[expert], when the parameter may be set per
        model), then the top-level `parameters:`, then the method's default. A source whose rules do
        not match `tensor_name` counts as unset. Floats come back as Python floats. `expert=None`
        for whole-merge parameters such as `lambda` and `normalize`.

        >>> cfg = load_config({"merge_method": "task_arithmetic", "base_model": "b",
        ...                    "models": [{"model": "e", "parameters": {"weight": [0, 1]}}]})
        >>> cfg.param("weight", "model.layers.2.mlp.weight", 0, num_layers=5), cfg.param("lambda", "x", None)
        (0.5, 1.0)
        """
        if name == "trim_scope":
            return self.trim_scope
        pdef = self.method.params.get(name)
        if pdef is None:
            raise KeyError(f"{self.method.name} has no parameter {name!r}")
        sources: list[tuple[str, Mapping[str, Any]]] = []  # (where, parameters), the model's own first
        if expert is not None and pdef.per_model:
            sources.append((f"models[{expert}].parameters", self.models[expert].parameters))
        sources.append(("parameters", self.parameters))
        for where, source in sources:
            if name in source:
                try:
                    value = resolve(source[name], tensor_name, num_layers, default=_UNSET)
                except InputError as e:  # name the key the gradient is under
                    raise InputError([f"{where}.{name}: {p}" for p in e.problems]) from None
                if value is not _UNSET:
                    return _as_kind(pdef, value)
        return _as_kind(pdef, pdef.default)

    def slice_param(self, name: str, out_slice: OutputSlice, source: SliceSource | None, tensor_name: str,
                    t: float) -> float | bool | str:
        """The value of `name` for one tensor of a `slices:` config, as mergekit resolves it.

        Looks up the source's own `parameters:` (when `source` is given and the parameter may be set per
        model), then the slice's `parameters:`, then the top-level `parameters:`, then the default
        (mergekit/config.py ConfigReader.parameter_sources). Gradients are read at `t`, the position in
        the slice (mergekit/plan.py plan_slice). Per-model values take the source's *input* tensor name
        for `tensor_name`, whole-merge values the output name, as mergekit does.
        """
        pdef = self.method.params.get(name)
        if pdef is None:
            raise KeyError(f"{self.method.name} has no parameter {name!r}")
        sources: list[Mapping[str, Any]] = []
        if source is not None and pdef.per_model:
            sources.append(source.ref.parameters)
        sources += [out_slice.parameters, self.parameters]
        for settings in sources:
            if name in settings:
                value = resolve(settings[name], tensor_name, default=_UNSET, t=t)
                if value is not _UNSET:
                    return _as_kind(pdef, value)
        return _as_kind(pdef, pdef.default)

    @property
    def num_output_layers(self) -> int | None:
        """For a `slices:` config, the number of layers of the output (the sum of the slices' lengths)."""
        return sum(s.num_layers for s in self.slices) if self.slices is not None else None

    @property
    def label(self) -> str:
        """How problem lines name this config: the file as given to load_config, or "config" for a dict."""
        return str(self.source_path) if self.source_path is not None else "config"

    @property
    def output_dtype(self) -> str | None:
        """`out_dtype`, else `dtype`; None means "the base model's dtype" (decided when the model is read)."""
        return self.out_dtype or self.dtype

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML data, in canonical form (dtype aliases spelled out, `tokenizer:` folded
        into `tokenizer_source`)."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out["merge_method"] = self.method.name
        if self.base_model is not None:
            out["base_model"] = self.base_model.model
        if self.slices is not None:
            slices = []
            for sl in self.slices:
                sources = []
                for src in sl.sources:
                    entry: dict[str, Any] = {"model": src.ref.model, "layer_range": list(src.layer_range)}
                    if src.ref.parameters:
                        entry["parameters"] = _plain(src.ref.parameters)
                    sources.append(entry)
                item: dict[str, Any] = {"sources": sources}
                if sl.parameters:
                    item["parameters"] = _plain(sl.parameters)
                slices.append(item)
            out["slices"] = slices
        else:
            models = []
            for ref in self.listed_models:
                entry = {"model": ref.model}
                if ref.parameters:
                    entry["parameters"] = _plain(ref.parameters)
                models.append(entry)
            out["models"] = models
        if self.parameters:
            out["parameters"] = _plain(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def to_yaml(self) -> str:
        """The config as YAML (for `fusemerge_config.yml`); `load_config` of it gives an equal config.

        >>> print(load_config({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "bf16"}).to_yaml())
        merge_method: linear
        models:
        - model: a
        dtype: bfloat16
        <BLANKLINE>
        """
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


# --------------------------------------------------------------------------------------------------
# Parameter resolution


def layer_index(tensor_name: str) -> int | None:
    """The layer number in `.layers.N.` / `.h.N.` / `.blocks.N.`, or None outside the layer stack.

    >>> layer_index("model.layers.12.mlp.up_proj.weight"), layer_index("transformer.h.3.attn.c_attn.weight")
    (12, 3)
    >>> layer_index("model.embed_tokens.weight") is None
    True
    """
    match = LAYER_NAME_RE.search(tensor_name)
    return int(match.group(1)) if match else None


def infer_num_layers(tensor_names: Iterable[str], model_config: Mapping[str, Any] | None = None) -> int | None:
    """L for gradients: `num_hidden_layers` from config.json, else the largest layer index + 1, else None.

    >>> infer_num_layers(["model.layers.0.a", "model.layers.7.a"]), infer_num_layers([], {"num_hidden_layers": 32})
    (8, 32)
    """
    if model_config is not None:
        declared = model_config.get("num_hidden_layers")
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            return declared
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else None


def gradient_t(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits on a gradient: t = layer / (L - 1); 0 outside the layer stack, 1 when L == 1.

    L == 1 gives t = 1 as in mergekit (mergekit/plan.py plan_slice: `t = 1` for a one-layer slice).

    >>> gradient_t("model.layers.3.mlp.weight", 7), gradient_t("lm_head.weight", 7), gradient_t("x.layers.0.w", 1)
    (0.5, 0.0, 1.0)
    """
    layer = layer_index(tensor_name)
    if layer is None:
        return 0.0
    if num_layers is None:
        raise InputError(f"tensor '{tensor_name}': resolving a gradient needs the number of layers")
    if layer >= num_layers:  # e.g. a multi-token-prediction layer kept after the stack, a deeper vision tower
        raise InputError(
            f"tensor '{tensor_name}': layer {layer} is past the model's {num_layers} layers (config.json "
            f"num_hidden_layers), where a gradient has no value: give such tensors a value of their own by a "
            f"filter rule before the gradient, e.g. [{{filter: 'layers.{layer}.', value: 0.5}}, {{value: [...]}}]")
    return slice_t(layer, num_layers)


def slice_t(offset: int, num_layers: int) -> float:
    """mergekit's gradient position of layer `offset` in a run of `num_layers` layers (1 for a single layer).

    >>> slice_t(0, 3), slice_t(2, 3), slice_t(0, 1)
    (0.0, 1.0, 1.0)
    """
    return offset / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: list[Any], t: float) -> float | bool | str:
    """A gradient's value at t in [0, 1], exactly as mergekit computes it (mergekit/config.py:47-59).

    Numbers are interpolated piecewise-linearly between evenly spaced points; a list holding bools
    or strings picks the point at or below t instead.

    >>> interpolate([0.0, 1.0, 0.0], 0.25), interpolate([0.2, 0.6], 1.0), interpolate([True, False], 0.9)
    (0.5, 0.6, True)
    """
    if not values:
        raise ValueError("an empty gradient has no value")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return _scalar(values[int(t * (len(values) - 1))])
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])


def resolve(value: Any, tensor_name: str, num_layers: int | None = None, *, default: Any = None,
            t: float | None = None) -> Any:
    """Resolve one parameter setting (scalar, gradient or filter rules) for one tensor.

    Rules: the first whose `filter` is a substring of `tensor_name` wins; a rule without `filter`
    (or with `filter: "*"`, as mergekit allows) matches every tensor; a rule's value may itself be a
    gradient. When no rule matches, `default` is returned. Numbers come back as floats. A gradient is
    read at `t` when given, else at `gradient_t(tensor_name, num_layers)`.

    >>> rules = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.7}]
    >>> resolve(rules, "model.layers.1.mlp.up.weight", 3), resolve(rules, "model.layers.1.attn.q.weight", 3)
    (0.5, 0.7)
    >>> resolve([{"filter": "mlp", "value": 1}], "lm_head.weight", default="unset")
    'unset'
    """
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(rule, Mapping) for rule in value):
            for rule in value:
                flt = rule.get("filter")
                if flt is None or flt == "*" or flt in tensor_name:
                    return resolve(rule["value"], tensor_name, num_layers, default=default, t=t)
            return default
        return interpolate(value, gradient_t(tensor_name, num_layers) if t is None else t)
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)


def _as_kind(pdef: ParamDef, value: Any) -> float | bool | str | None:
    if value is None:  # a required parameter (slerp's t) that no rule gives a value here
        return None
    if pdef.kind == "float":
        return float(value)
    if pdef.kind == "int":
        return int(value)
    return value


# --------------------------------------------------------------------------------------------------
# YAML reading and writing

# PyYAML follows YAML 1.1, where `1e-3` (no dot) and `1.5e3` (no exponent sign) are strings. YAML 1.2
# and every other tool read them as numbers; so do we (`lambda: 1e-3` is a common spelling).
_EXP_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys (YAML says they are an error; PyYAML keeps the last)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: the base class raises a proper error with the line
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                self.duplicates.append(f"line {line}: duplicate key {key!r} (first set on line {first})")
            else:
                seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An int, refusing hex / binary ones too large for a float (and too long for Python to print)."""
        value = super().construct_yaml_int(node)
        if abs(value).bit_length() > 4096:
            raise yaml.constructor.ConstructorError(None, None, "integer too large", node.start_mark)
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Lists of numbers (gradients) in flow style, as mergekit writes them (mergekit/config.py:209-219)."""

    def represent_list(self, data: list[Any]) -> yaml.SequenceNode:
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
# Quote strings such as "1e3" that our loader would otherwise read back as numbers.
_Dumper.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT_RE, list("-+0123456789."))


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts / lists (the dumper does not know other Mapping types)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(source: str | Path | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a mergekit-style YAML config (a file path, or the already-parsed mapping).

    Raises InputError listing every problem at once, each naming its key. Relative model paths are
    taken relative to the current working directory, as mergekit does.

    >>> cfg = load_config({"merge_method": "dare_ties", "base_model": "base",
    ...                    "models": [{"model": "a", "parameters": {"density": 0.4}}]})
    >>> cfg.method.name, cfg.param("rescale", "lm_head.weight"), cfg.param("density", "lm_head.weight", 0)
    ('dare_ties', True, 0.4)
    """
    if isinstance(source, Mapping):
        return _Validator("config").build(source, source_path=None)
    path = Path(source)
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read the file: {exc.strerror or exc}") from None
    loader = None
    try:
        loader = _Loader(text)  # checks every character: may raise a ReaderError
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise InputError(f"{label}: {_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{label}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise InputError(f"{label}: YAML is nested too deeply") from None
    except ValueError as exc:  # a scalar PyYAML cannot construct: 2020-13-45, an int of over 4300 digits
        raise InputError(f"{label}: YAML value error: {' '.join(str(exc).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    validator = _Validator(label)
    for dup in loader.duplicates:
        validator.problems.append(f"{label}: {dup}")
    if data is None:
        raise InputError(validator.problems + [f"{label}: the file is empty"])
    return validator.build(data, source_path=path)


def validate_mapping(data: Mapping[str, Any], label: str) -> MergeConfig:
    """load_config of an already-parsed mapping, its problems labelled `label` (merge_tensors builds one)."""
    return _Validator(label).build(data, source_path=None)


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        start = f" that starts on line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
        what = f"{exc.problem} ({exc.context}{start})"
    return f"{where}YAML syntax error: {what}"


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


def _near(word: str, choices: Iterable[str]) -> str | None:
    """The known key `word` is a misspelling of, if any: case aside, at least 80% alike (`dtpye`, `paramters`,
    `DTYPE`; not `params` or `license`, which configs use for YAML anchors and metadata)."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.8)
    return lower[close[0]] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fmt_bound(pdef: ParamDef) -> str:
    low = "-inf" if pdef.low is None else f"{pdef.low:g}"
    high = "inf" if pdef.high is None else f"{pdef.high:g}"
    return f"{'(' if pdef.low_open or pdef.low is None else '['}{low}, {high}{']' if pdef.high is not None else ')'}"


class _Validator:
    """Walks the loaded YAML once, collecting every problem, and builds the MergeConfig."""

    def __init__(self, label: str):
        self.label = label
        self.problems: list[str] = []
        self.notes: list[str] = []  # keys ignored, as mergekit ignores them (MergeConfig.notes)
        self.model_params: list[tuple[str, dict[str, Any]]] = []  # (key, parameters) of every models entry
        self.slice_params: list[tuple[str, dict[str, Any]]] = []  # (key, parameters) of every slices entry

    def unknown_key(self, key: str, known: Iterable[str], what: str, allowed: str) -> None:
        """A key fusemerge does not know where it stands. mergekit's pydantic models ignore such keys (its own
        examples/mega.yml has `out_path:`), so one that is not a misspelling of a known key is ignored with a
        note; a near miss (`dtpye:`, `paramters:`) or a merge parameter out of place (`weight:` beside `model:`) is
        an error, since mergekit would drop what it meant."""
        name = key.rsplit(".", 1)[-1]
        near = _near(name, known)
        # `weight: 1` beside model: (mergekit drops it); trim_scope / int8_mask are parameters-level keys too
        params = {p for m in METHODS.values() for p in m.params} | {"trim_scope", *MERGEKIT_NOOP_PARAMS}
        if near:
            self.add(key, f"unknown {what} (did you mean {near!r}?); {allowed}")
        elif param := _near(name, params):
            where = "goes under the top-level parameters:" if param == "trim_scope" else "goes under parameters:"
            self.add(key, f"unknown {what}; a merge parameter such as {param!r} {where}; {allowed}")
        else:
            note = f"{self.label}: {key}: unknown {what}, ignored (as mergekit ignores it); {allowed}"
            self.notes.append(note.replace("\r", "\\r").replace("\n", "\\n"))

    def add(self, key: str, message: str) -> None:
        # one line per problem, whatever a key holds (a YAML key may contain a line break: "tokenizer.\r")
        line = f"{self.label}: {key}: {message}"
        self.problems.append(line.replace("\r", "\\r").replace("\n", "\\n"))

    # -- top level -------------------------------------------------------------------------------

    def build(self, data: Any, source_path: Path | None) -> MergeConfig:
        if not isinstance(data, Mapping):
            self.problems.append(
                f"{self.label}: the top level must be a mapping (merge_method:, models:, ...), not {_kind_name(data)}"
            )
            raise InputError(self.problems)
        raw = dict(data)
        for key in raw:
            if key == "modules":
                self.add("modules", "modules: configs are not supported yet; list whole models under models:")
            elif key not in TOP_LEVEL_KEYS:
                self.unknown_key(str(key), TOP_LEVEL_KEYS, "top-level key", f"allowed: {', '.join(TOP_LEVEL_KEYS)}")

        method = self._method(raw.get("merge_method", _UNSET))
        base = self._base(raw.get("base_model"), method)
        if method is not None and method.base_optional and base is not None:
            method = method.with_base()  # the arc between the deltas from the base (mergekit's task vectors)
        slices: list[OutputSlice] | None = None
        if "slices" in raw:
            if "models" in raw:
                self.add("slices", "give models: or slices:, not both (mergekit takes exactly one of them)")
            slices = self._slices(raw["slices"])
            listed: list[ModelRef] = []
        else:
            listed = self._models(raw.get("models", _UNSET))
        global_params = self._params_mapping(raw.get("parameters"), "parameters")
        dtype = self._dtype(raw.get("dtype"), "dtype")
        out_dtype = self._dtype(raw.get("out_dtype"), "out_dtype")
        tokenizer_source = self._tokenizer(raw, base)
        chat_template = self._optional_str(raw.get("chat_template"), "chat_template")
        name = self._optional_str(raw.get("name"), "name")

        trim_scope = "tensor"
        if method is None:  # still check the values of every parameter some method knows
            for where, params in [*self.model_params, *self.slice_params, ("parameters", global_params)]:
                self._check_values_only(params, where)
        else:
            for where, params in self.model_params:
                self._check_params(params, where, method, per_model=True)
            for where, params in self.slice_params:
                self._check_params(params, where, method, per_model=False)
            self._check_params(global_params, "parameters", method, per_model=False)
            for pname, pdef in method.params.items():  # required ones (slerp's t): for every tensor
                if pdef.default is not None or pname in global_params:
                    continue
                what = ""
                if pname == "t":
                    what = (" (0 is the base model, 1 the other model" if method.is_slerp else
                            " (the distance within which an entry takes the other model's value")
                    what += ": a number, a gradient [v0, v1, ...] or {filter, value} rules)"
                unset = [where for where, params in self.slice_params if pname not in params]
                if not self.slice_params:
                    self.add(f"parameters.{pname}", f"missing; {method.name} needs {pname}{what}")
                for where in unset:  # a slice without it, and no top-level value to fall back to
                    self.add(where.removesuffix(".parameters"), f"{pname} is missing here and under the top-level "
                                                                f"parameters:; {method.name} needs {pname}{what}")
            scope = global_params.get("trim_scope")
            if isinstance(scope, str) and scope in TRIM_SCOPES:
                trim_scope = scope

        models: list[ModelRef] = []
        if base is not None:
            base_at = [i for i, ref in enumerate(listed) if ref.path == base.path]
            if base_at:
                base.parameters = listed[base_at[0]].parameters
        if method is not None and slices is not None:
            models = self._slice_structure(method, base, slices, global_params)
        elif method is not None:
            if method.is_passthrough:
                models = list(listed)
                if len(listed) > 1 or (base is not None and listed and listed[0].path != base.path):
                    self.add("models", "passthrough copies exactly one model (the base_model, if given, counts as "
                                       "one, as in mergekit); to stack layers of several models use slices:")
            elif method.is_linear or method.is_karcher:  # a base given is averaged in, as mergekit does
                models = list(listed)
                if base is not None and not any(ref.path == base.path for ref in listed):
                    models.append(base)
            else:
                models = [ref for ref in listed if base is None or ref.path != base.path]
                if listed and not models:
                    self.add("models", f"lists only the base model; {method.name} needs at least one other model")
                elif models:
                    self._check_others(method, len(models), "models")
                if method.angle_weights and base is not None:
                    models = [base, *models]  # the kernels' order: the base's tensor, then the others'
            if not self.problems and slices is None and not method.is_passthrough:
                self._check_combinations(method, models, listed, global_params)

        if self.problems:
            raise InputError(self.problems)
        assert method is not None
        return MergeConfig(
            method=method,
            base_model=base,
            models=models,
            parameters=global_params,
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tokenizer_source,
            chat_template=chat_template,
            name=name,
            trim_scope=trim_scope,
            listed_models=listed,
            slices=slices,
            source_path=source_path,
            raw=raw,
            notes=self.notes,
        )

    def _method(self, value: Any) -> Method | None:
        known = ", ".join(METHODS)
        if value is _UNSET or value is None:
            self.add("merge_method", f"missing; one of {known}")
            return None
        if not isinstance(value, str):
            self.add("merge_method", f"must be a method name, not {_kind_name(value)}; one of {known}")
            return None
        if value in METHODS:
            return METHODS[value]
        if value in MERGEKIT_ONLY_METHODS:
            self.add("merge_method", f"{value!r} is a mergekit method fusemerge does not support yet; "
                                     f"supported: {known}")
        else:
            self.add("merge_method", f"unknown method {value!r}{did_you_mean(value, METHODS)}; supported: {known}")
        return None

    def _model_path(self, value: Any, key: str) -> ModelRef | None:
        if not isinstance(value, str) or not value.strip():
            self.add(key, f"must be a model directory path, not {_kind_name(value)}")
            return None
        if "+" in value:
            model, _, lora = value.partition("+")
            self.add(key, f"{value!r} is mergekit's MODEL+LORA syntax (model {model!r}, LoRA {lora!r}); "
                          "LoRA adapters are not supported yet: merge the adapter into its model first")
            return None
        return ModelRef(model=value, path=Path(os.path.abspath(os.path.expanduser(value))))

    def _base(self, value: Any, method: Method | None) -> ModelRef | None:
        if value is None:
            if method is not None and method.is_slerp:
                self.add("base_model", "missing; slerp interpolates from a base model to one other model, so "
                                       "base_model: is required")
            elif method is not None and method.is_nearswap:
                self.add("base_model", "missing; nearswap moves a base model's entries toward one other model's, "
                                       "so base_model: is required")
            elif method is not None and method.needs_base:
                self.add("base_model", f"missing; {method.name} merges differences from a base model, "
                                       "so base_model: is required")
            return None
        return self._model_path(value, "base_model")

    def _models(self, value: Any) -> list[ModelRef]:
        if value is _UNSET or value is None:
            self.add("models", "missing; list the models to merge as `- model: PATH` entries")
            return []
        if not isinstance(value, list):
            self.add("models", f"must be a list of `- model: PATH` entries, not {_kind_name(value)}")
            return []
        if not value:
            self.add("models", "is empty; list the models to merge as `- model: PATH` entries")
            return []
        refs: list[ModelRef] = []
        first_at: dict[Path, int] = {}
        for i, entry in enumerate(value):
            key = f"models[{i}]"
            if not isinstance(entry, Mapping) or "model" not in entry:
                what = "a mapping without model:" if isinstance(entry, Mapping) else _kind_name(entry)
                self.add(key, f"must be a mapping with `model: PATH` (and optionally parameters:), not {what}")
                continue
            for extra in entry:
                if extra not in ("model", "parameters"):
                    self.unknown_key(f"{key}.{extra}", ("model", "parameters"), "key",
                                     "a models entry has only model: and parameters:")
            ref = self._model_path(entry["model"], f"{key}.model")
            params = self._params_mapping(entry.get("parameters"), f"{key}.parameters")
            self.model_params.append((f"{key}.parameters", params))
            if ref is None:
                continue
            ref.parameters = params
            if ref.path in first_at:
                self.add(f"{key}.model", f"{ref.model!r} is listed twice (also models[{first_at[ref.path]}])")
                continue
            first_at[ref.path] = i
            refs.append(ref)
        return refs

    def _slices(self, value: Any) -> list[OutputSlice]:
        """mergekit's `slices:` list: `- sources: [{model, layer_range: [a, b], parameters}]` (+ parameters)."""
        if not isinstance(value, list) or not value:
            what = "an empty list" if isinstance(value, list) else _kind_name(value)
            self.add("slices", f"must be a non-empty list of `- sources: [...]` entries, not {what}")
            return []
        out: list[OutputSlice] = []
        for i, entry in enumerate(value):
            key = f"slices[{i}]"
            if not isinstance(entry, Mapping) or "sources" not in entry:
                what = "a mapping without sources:" if isinstance(entry, Mapping) else _kind_name(entry)
                self.add(key, f"must be a mapping with `sources:` (and optionally parameters:), not {what}")
                continue
            for extra in entry:
                if extra in ("base_model", "residual_weight"):
                    self.add(f"{key}.{extra}", f"a per-slice {extra}: is not supported yet; "
                                               "set base_model: at the top level")
                elif extra not in ("sources", "parameters"):
                    self.unknown_key(f"{key}.{extra}", ("sources", "parameters"), "key",
                                     "a slices entry has sources: and parameters:")
            params = self._params_mapping(entry.get("parameters"), f"{key}.parameters")
            self.slice_params.append((f"{key}.parameters", params))
            sources = self._slice_sources(entry["sources"], f"{key}.sources")
            if sources is None:
                continue
            lengths = {src.num_layers for src in sources}
            if len(lengths) > 1:
                ranges = ", ".join(f"{s.ref.model} {list(s.layer_range)}" for s in sources)
                self.add(f"{key}.sources", f"every source of a slice needs the same number of layers ({ranges})")
                continue
            out.append(OutputSlice(sources=sources, parameters=params))
        return out

    def _slice_sources(self, value: Any, key: str) -> list[SliceSource] | None:
        if not isinstance(value, list) or not value:
            what = "an empty list" if isinstance(value, list) else _kind_name(value)
            self.add(key, f"must be a non-empty list of `- model: PATH` + `layer_range: [start, end]`, not {what}")
            return None
        sources: list[SliceSource] = []
        first_at: dict[Path, int] = {}
        ok = True
        for j, entry in enumerate(value):
            skey = f"{key}[{j}]"
            if not isinstance(entry, Mapping) or "model" not in entry or "layer_range" not in entry:
                what = _kind_name(entry) if not isinstance(entry, Mapping) else (
                    "a mapping without " + ("model:" if "model" not in entry else "layer_range:"))
                self.add(skey, f"must be a mapping with `model: PATH` and `layer_range: [start, end]`, not {what}")
                ok = False
                continue
            for extra in entry:
                if extra not in ("model", "layer_range", "parameters"):
                    self.unknown_key(f"{skey}.{extra}", ("model", "layer_range", "parameters"), "key",
                                     "a source has model:, layer_range: and parameters:")
            ref = self._model_path(entry["model"], f"{skey}.model")
            params = self._params_mapping(entry.get("parameters"), f"{skey}.parameters")
            self.model_params.append((f"{skey}.parameters", params))
            layer_range = self._layer_range(entry["layer_range"], f"{skey}.layer_range")
            if ref is None or layer_range is None:
                ok = False
                continue
            ref.parameters = params
            if ref.path in first_at:
                self.add(f"{skey}.model", f"{ref.model!r} is listed twice in this slice "
                                          f"(also {key}[{first_at[ref.path]}]); mergekit merges each model once")
                ok = False
                continue
            first_at[ref.path] = j
            sources.append(SliceSource(ref=ref, layer_range=layer_range))
        return sources if ok else None

    def _layer_range(self, value: Any, key: str) -> tuple[int, int] | None:
        ints = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ints:
            self.add(key, f"must be [start, end], two whole numbers (layers start..end-1), not {_kind_name(value)}")
            return None
        start, end = value
        if start < 0 or end <= start:
            self.add(key, f"[{start}, {end}] is empty or negative; need 0 <= start < end")
            return None
        return start, end

    def _slice_structure(self, method: Method, base: ModelRef | None, slices: list[OutputSlice],
                         global_params: Mapping[str, Any]) -> list[ModelRef]:
        """What each method needs of every slice (mergekit's InputContract), and the models the slices name."""
        if global_params.get("trim_scope") == "global":
            self.add("parameters.trim_scope", "trim_scope: global is not supported with slices: yet")
        models: dict[Path, ModelRef] = {}
        for i, sl in enumerate(slices):
            key = f"slices[{i}].sources"
            paths = [src.ref.path for src in sl.sources]
            if method.is_passthrough and len(sl.sources) != 1:
                self.add(key, f"passthrough takes exactly one source per slice, not {len(sl.sources)}")
            if method.needs_base and base is not None:
                if base.path not in paths:
                    self.add(key, f"the base model {base.model!r} is not among the sources; {method.name} needs "
                                  "it in every slice, with the layer_range "
                                  + ("it interpolates from" if method.angle_weights else "its deltas are taken from")
                                  + " (as mergekit)")
                elif len(paths) < 2:
                    self.add(key, f"lists only the base model; {method.name} needs at least one other model")
                else:
                    self._check_others(method, len(paths) - 1, key, " per slice")
            elif method.base_optional:  # no base: each slice interpolates its sources
                self._check_others(method, len(paths), key, " per slice")
            for src in sl.sources:
                if method.needs_base and base is not None and src.ref.path == base.path:
                    continue
                models.setdefault(src.ref.path, src.ref)
        if method.angle_weights and base is not None:
            return [base, *models.values()]  # the base's tensor comes first, as in each tensor's inputs
        return list(models.values())

    def _check_others(self, method: Method, n: int, key: str, where: str = "") -> None:
        """Whether `n` models besides the base is what `method` takes (Method.others, mergekit's contract)."""
        low, high = method.others
        if n < low or (high is not None and n > high):
            if method.is_slerp:
                self.add(key, f"slerp interpolates the base model and one other model{where}, not {n} (as in "
                              "mergekit); to merge more, use linear, task_arithmetic, ties or dare_ties")
            elif method.is_nearswap:
                self.add(key, f"nearswap mixes the base model and one other model{where}, not {n} (as in "
                              "mergekit)")
            elif method.is_nuslerp:
                self.add(key, f"nuslerp interpolates exactly two models{where} (besides the base_model, if "
                              f"given), not {n} (as in mergekit)")
            else:
                self.add(key, f"{method.name} takes at least {low} models besides the base{where}, not {n} "
                              "(as in mergekit)")

    def _params_mapping(self, value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(key, f"must be a mapping of parameter names to values, not {_kind_name(value)}")
            return {}
        return dict(value)

    def _dtype(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
        if isinstance(name, str) and name.lower() in DTYPE_ALIASES:
            return DTYPE_ALIASES[name.lower()]
        self.add(key, f"{_kind_name(value)} is not a supported dtype; use float32, float16 or bfloat16 "
                      "(or fp32, fp16, bf16, float, half)")
        return None

    def _optional_str(self, value: Any, key: str) -> str | None:
        if value is None or isinstance(value, str):
            return value
        self.add(key, f"must be a string, not {_kind_name(value)}")
        return None

    def _tokenizer(self, raw: Mapping[str, Any], base: ModelRef | None) -> str | None:
        source = raw.get("tokenizer_source")
        key = "tokenizer_source"
        if "tokenizer" in raw and raw["tokenizer"] is not None:
            tok = raw["tokenizer"]
            if source is not None:
                self.add("tokenizer", "set tokenizer_source: or tokenizer:, not both")
                return None
            if not isinstance(tok, Mapping):
                self.add("tokenizer", f"must be a mapping (source: ...), not {_kind_name(tok)}")
                return None
            for extra in tok:
                if extra != "source":
                    self.add(f"tokenizer.{extra}", "is not supported yet; fusemerge only copies a tokenizer "
                                                   "(tokenizer: {source: base} or {source: MODEL_PATH})")
            # mergekit's TokenizerConfig.source defaults to "union" (mergekit/tokenizer/config.py:38).
            source = tok.get("source", "union")
            key = "tokenizer.source"
        if source is None:
            return None
        if not isinstance(source, str) or not source.strip():
            self.add(key, f"must be 'base' or a model path, not {_kind_name(source)}")
            return None
        if source == "union":
            self.add(key, "'union' (building a merged vocabulary) is not supported yet; "
                          "use 'base' or a model path")
            return None
        if source == "base":
            if base is None and "base_model" not in raw:
                self.add(key, "'base' needs a base_model:")
            return source
        if self._model_path(source, key) is None:
            return None
        return source

    # -- parameters ------------------------------------------------------------------------------

    def _check_params(self, params: Mapping[str, Any], where: str, method: Method, per_model: bool) -> None:
        allowed = [n for n, p in method.params.items() if p.per_model or not per_model]
        if not per_model:
            if method.needs_thresholds:
                allowed.append("trim_scope")
            allowed.extend(MERGEKIT_NOOP_PARAMS)  # every method: mergekit's linear / passthrough ignore it too
        for name, value in params.items():
            key = f"{where}.{name}"
            pdef = method.params.get(name) if isinstance(name, str) else None
            if name == "trim_scope":
                if per_model:
                    self.add(key, "trim_scope applies to the whole merge, not one model; "
                                  "set it under the top-level parameters:")
                elif not method.needs_thresholds:
                    trims = ", ".join(m.name for m in METHODS.values() if m.needs_thresholds)
                    self.add(key, f"only methods that trim by magnitude ({trims}) take trim_scope; "
                                  f"{method.name} does not")
                elif not isinstance(value, str) or value not in TRIM_SCOPES:
                    self.add(key, f"must be 'tensor' or 'global', not {_kind_name(value)}")
                continue
            if name in MERGEKIT_NOOP_PARAMS:
                if per_model:
                    self.add(key, f"{name} applies to the whole merge, not one model; "
                                  "set it under the top-level parameters:")
                elif not isinstance(value, bool):
                    self.add(key, f"must be true or false, not {_kind_name(value)}")
                continue
            if pdef is None:
                takes = (f"it takes {', '.join(allowed)}" if allowed else
                         f"{method.name} takes no per-model parameters"
                         + (f" (set {', '.join(method.params)} under parameters:)" if method.params else ""))
                self.add(key, f"unknown parameter for {method.name}{did_you_mean(str(name), allowed)}; {takes}")
                continue
            if per_model and not pdef.per_model:
                self.add(key, f"{name} applies to the whole merge, not one model; set it under the "
                              + ("slice's or the top-level parameters:" if ".sources[" in where
                                 else "top-level parameters:"))
                continue
            self._check_setting(value, pdef, key)

    def _check_values_only(self, params: Mapping[str, Any], where: str) -> None:
        """With no valid merge_method, names cannot be judged; values of names any method knows still can."""
        known = {name: pdef for m in METHODS.values() for name, pdef in m.params.items()}
        for name, value in params.items():
            if name in known:
                self._check_setting(value, known[name], f"{where}.{name}")

    def _check_setting(self, value: Any, pdef: ParamDef, key: str) -> None:
        """A scalar, a gradient (list of scalars), or filter rules ({filter, value} or a list of them)."""
        if isinstance(value, Mapping):
            self._check_rule(value, pdef, key)
        elif isinstance(value, list):
            if not value:
                self.add(key, "is an empty list; give a value, a gradient [v0, v1, ...] or {filter, value} rules")
            elif all(isinstance(rule, Mapping) for rule in value):
                for i, rule in enumerate(value):
                    self._check_rule(rule, pdef, f"{key}[{i}]")
            elif any(isinstance(rule, Mapping) for rule in value):
                self.add(key, "mixes plain values and {filter, value} rules; use one or the other")
            else:
                self._check_gradient(value, pdef, key)
        else:
            self._check_scalar(value, pdef, key)

    def _check_rule(self, rule: Mapping[str, Any], pdef: ParamDef, key: str) -> None:
        for extra in rule:
            if extra not in ("filter", "value"):
                self.add(f"{key}.{extra}", f"unknown key{did_you_mean(str(extra), ('filter', 'value'))}; "
                                           "a rule has only filter: and value:")
        flt = rule.get("filter")
        if flt is not None and not isinstance(flt, str):
            self.add(f"{key}.filter", f"must be a substring of tensor names, not {_kind_name(flt)}")
        if "value" not in rule:
            self.add(key, "a rule needs value:")
            return
        value = rule["value"]
        if isinstance(value, list):
            if not value:
                self.add(f"{key}.value", "is an empty list; give a value or a gradient [v0, v1, ...]")
            elif any(isinstance(v, (Mapping, list)) for v in value):
                self.add(f"{key}.value", "must be a value or a gradient (a list of values); rules do not nest")
            else:
                self._check_gradient(value, pdef, f"{key}.value")
        elif isinstance(value, Mapping):
            self.add(f"{key}.value", "must be a value or a gradient (a list of values); rules do not nest")
        else:
            self._check_scalar(value, pdef, f"{key}.value")

    def _check_gradient(self, values: list[Any], pdef: ParamDef, key: str) -> None:
        if pdef.kind == "int":
            self.add(key, f"{pdef.name} is a whole number: give one value (or filter rules), not a gradient, "
                          "which would interpolate between them")
            return
        for i, v in enumerate(values):
            if isinstance(v, list):
                self.add(f"{key}[{i}]", "a gradient is a flat list of values; lists do not nest")
            else:
                self._check_scalar(v, pdef, f"{key}[{i}]")

    def _check_scalar(self, value: Any, pdef: ParamDef, key: str) -> None:
        if pdef.kind == "bool":
            if not isinstance(value, bool):
                self.add(key, f"must be true or false, not {_kind_name(value)}")
            return
        if pdef.kind == "rescale":
            if not isinstance(value, bool) and value != "inverse":
                self.add(key, f"must be true, false or 'inverse', not {_kind_name(value)}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(key, f"must be a number, not {_kind_name(value)}")
            return
        if pdef.kind == "int" and not (isinstance(value, int) or (math.isfinite(value) and value == int(value))):
            self.add(key, f"must be a whole number, not {value!r}")
            return
        if isinstance(value, int) and abs(value) > 2**1023:  # float(value) would raise OverflowError
            self.add(key, "must be a finite number, not an integer too large for a float")
            return
        if not math.isfinite(value):
            self.add(key, f"must be a finite number, not {value!r}")
            return
        if abs(value) > FLOAT32_MAX:  # the merge computes in float32, where it would be infinite
            self.add(key, f"{value!r} is beyond float32's range (the merge computes in float32)")
            return
        low_bad = pdef.low is not None and (value <= pdef.low if pdef.low_open else value < pdef.low)
        high_bad = pdef.high is not None and value > pdef.high
        if low_bad or high_bad:
            self.add(key, f"{value!r} is outside {_fmt_bound(pdef)}")

    def _check_combinations(self, method: Method, models: list[ModelRef], listed: list[ModelRef],
                            global_params: Mapping[str, Any]) -> None:
        """Checks across parameters that can be made when the values involved are plain scalars."""

        def effective(ref: ModelRef, name: str, index: int) -> tuple[Any, str]:
            if name in ref.parameters:
                return ref.parameters[name], f"models[{index}].parameters.{name}"
            if name in global_params:
                return global_params[name], f"parameters.{name}"
            return method.params[name].default, f"{name} (default)"

        listed_index = {id(ref): i for i, ref in enumerate(listed)}
        listed_index.update({id(ref): -1 for ref in models if id(ref) not in listed_index})  # the appended base
        # breadcrumbs with density + gamma > 1 is not refused: as in mergekit (n_bot = max(0, n - dn - gn)), the
        # outlier drop shrinks so that density's share is kept (select.trim_counts)
        # DELLA: density +/- epsilon inside (0, 1); gradients are checked per tensor (RAM's epsilon is another one)
        if "epsilon" in method.params and "density" in method.params:
            from fusemerge.kernels.della import check_epsilon

            for ref in models:
                index = listed_index[id(ref)]
                (d, dkey), (e, ekey) = effective(ref, "density", index), effective(ref, "epsilon", index)
                problem = check_epsilon(d, e) if _is_number(d) and _is_number(e) else None
                if problem is not None:
                    self.add(", ".join(dict.fromkeys((dkey, ekey))), problem)
        if "normalize" not in method.params:  # slerp, model_stock: their weights come from the tensors
            return
        normalize = global_params.get("normalize", method.params["normalize"].default)
        if method.consensus == "none" and normalize is True:
            found = [effective(ref, "weight", listed_index[id(ref)]) for ref in models]
            weights = [w for w, _ in found]
            if weights and all(_is_number(w) for w in weights) and sums_to_zero(weights):
                where = ", ".join(dict.fromkeys(key for _, key in found))  # each place a weight comes from, once
                self.add(where, f"the weights add up to 0 and normalize is true, so the merge would divide by 0 "
                                f"(weights {weights})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sums_to_zero(values: list[Any]) -> bool:
    """Whether the weights add up to 0 as the kernels add them: float32, in order (kernels/reference.py
    _weight_sum), where 0 would divide by 1 instead (0.1 + 0.2 - 0.3 is 0 there, not in exact arithmetic)."""
    total = np.float32(0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        for v in values:
            total = np.float32(total + np.float32(v))
    return bool(total == 0)
