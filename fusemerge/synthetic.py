"""Synthetic Llama-shaped checkpoints for the demo, the tests and the benchmarks.

`make_llama_family` writes a base model and N fine-tuned "experts" as Hugging Face
directories. Weights are generated and written block by block (2^22 elements at a
time) with a minimal safetensors writer, so peak memory stays at a few tens of MB
whatever the model size. Every block draws from its own generator seeded by
(seed, model, tensor name, block index): the weights do not depend on shard sizes.

Example:
    >>> fam = make_llama_family(tmp, n_experts=2, hidden=64, intermediate=128, layers=2, vocab=100)
    >>> write_config_yaml(tmp / "ties.yml", "ties", fam["base"], fam["experts"], density=0.2)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from fusemerge.methods import METHODS

BLOCK = 1 << 22  # elements generated at once: 16 MiB of float32, bounds peak memory
BASE_STD = 0.02  # Llama-style init scale
DELTA_STD = 0.002  # dense fine-tune noise, ~16 bf16 ulps of a typical base weight
SPIKE_STD = 0.02  # the few larger fine-tune entries
SPIKE_EVERY = 1000  # one larger entry per this many elements
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
# Parameters written per model (all others go to the global `parameters:` block).
PER_MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
TOP_LEVEL_KEYS = ("dtype", "out_dtype", "tokenizer_source")
# A trivial, valid stand-in tokenizer (a 3-token WordLevel model): nothing is downloaded.
_TOKENIZER_JSON = (
    '{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
    '"pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, '
    '"model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2}, "unk_token": "<unk>"}}\n'
)
_TOKENIZER_CONFIG_JSON = (
    '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", '
    '"unk_token": "<unk>", "model_max_length": 2048}\n'
)


def llama_tensor_shapes(
    hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int, tie_embeddings: bool
) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes, in Hugging Face state-dict order."""
    kv = kv_heads * (hidden // heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tie_embeddings:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def _generator(*key: object) -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _base_block(name: str, start: int, n: int, seed: int) -> torch.Tensor:
    """Float32 base values [start, start + n) of tensor `name` (flat index)."""
    x = torch.randn(n, generator=_generator(seed, "base", name, start)).mul_(BASE_STD)
    return x.add_(1.0) if name.endswith("norm.weight") else x


def _expert_block(base: torch.Tensor, name: str, start: int, seed: int, expert: int) -> torch.Tensor:
    """Float32 values of expert `expert` (1-based) for the base block `base` starting at `start`."""
    g = _generator(seed, expert, name, start)
    x = torch.randn(base.numel(), generator=g).mul_(DELTA_STD).add_(base)
    spikes = max(1, base.numel() // SPIKE_EVERY)
    idx = torch.randint(base.numel(), (spikes,), generator=g)
    return x.index_add_(0, idx, torch.randn(spikes, generator=g).mul_(SPIKE_STD))


class _ShardedWriter:
    """Writes one model's tensors, in order, into a single file or shards + index (minimal safetensors)."""

    def __init__(
        self, out: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shard_bytes: int | None
    ) -> None:
        for old in [*out.glob("*.safetensors"), *out.glob("model.safetensors.index.json")]:
            old.unlink()
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.sizes = [itemsize * math.prod(shape) for _, shape in tensors]
        shards: list[list[int]] = [[]]
        used = 0
        for i, size in enumerate(self.sizes):
            if shard_bytes is not None and shards[-1] and used + size > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(i)
            used += size
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.out, self.n_shards, self.file = out, n, None
        self.starts: dict[int, tuple[str, bytes]] = {}  # first tensor index of a shard -> (file name, header)
        self.weight_map = {}
        for fname, members in zip(names, shards, strict=True):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for i in members:
                name, shape = tensors[i]
                span = [offset, offset + self.sizes[i]]
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": span}
                offset += self.sizes[i]
                self.weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            self.starts[members[0]] = (fname, len(raw).to_bytes(8, "little") + raw)

    def begin_tensor(self, index: int) -> None:
        if index in self.starts:
            self.close()
            fname, head = self.starts[index]
            self.file = open(self.out / fname, "wb")  # closed in close()
            self.file.write(head)

    def write(self, x: torch.Tensor) -> None:
        self.file.write(x.contiguous().view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        self.close()
        if self.n_shards > 1:
            index = {"metadata": {"total_size": sum(self.sizes)}, "weight_map": self.weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_llama_family(
    root: Path,
    *,
    n_experts: int,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int | None = None,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    tie_embeddings: bool = False,
    shard_bytes: int | None = None,
    seed: int = 0,
    expert_shard_bytes: list[int | None] | None = None,
) -> dict[str, Any]:
    """Write `root/base` and `root/expert_1..n` as Llama-shaped Hugging Face model directories.

    Base weights ~ N(0, 0.02) (norm weights ~ 1 + N(0, 0.02)); expert i = base + N(0, 0.002) noise
    plus one N(0, 0.02) entry per ~1000 elements, rounded once to `dtype`. Deterministic in `seed`
    and independent of shard sizes. `shard_bytes` shards every model (single `model.safetensors`
    when None or when everything fits); `expert_shard_bytes[i]` overrides it for expert i + 1
    (None entries fall back to `shard_bytes`). Also writes `root/family.json` (the arguments and
    sizes, so callers can reuse a family). Returns `{"base": Path, "experts": [Path], "params":
    parameters per model, "bytes_per_model": int, "total_bytes": int, "tensors": int}`.
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {list(_ST_DTYPES)}")
    heads = heads or (hidden // 64 if hidden % 64 == 0 else 1)
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    if expert_shard_bytes is not None and len(expert_shard_bytes) != n_experts:
        raise ValueError(f"expert_shard_bytes has {len(expert_shard_bytes)} entries for {n_experts} experts")
    tensors = llama_tensor_shapes(hidden, intermediate, layers, vocab, heads, kv_heads, tie_embeddings)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tie_embeddings,
        "torch_dtype": dtype_name,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "initializer_range": BASE_STD,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    root = Path(root)
    dirs = [root / "base"] + [root / f"expert_{i}" for i in range(1, n_experts + 1)]
    per_model = [shard_bytes] + [
        shard_bytes if expert_shard_bytes is None or expert_shard_bytes[i] is None else expert_shard_bytes[i]
        for i in range(n_experts)
    ]
    writers = []
    for d, sb in zip(dirs, per_model, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "tokenizer.json").write_text(_TOKENIZER_JSON)
        (d / "tokenizer_config.json").write_text(_TOKENIZER_CONFIG_JSON)
        writers.append(_ShardedWriter(d, tensors, dtype, sb))
    try:  # one pass: each base block is generated once and shared by all experts
        for ti, (name, shape) in enumerate(tensors):
            for w in writers:
                w.begin_tensor(ti)
            numel = math.prod(shape)
            for start in range(0, numel, BLOCK):
                base = _base_block(name, start, min(BLOCK, numel - start), seed)
                writers[0].write(base.to(dtype))
                for e, w in enumerate(writers[1:], start=1):
                    w.write(_expert_block(base, name, start, seed, e).to(dtype))
        for w in writers:
            w.finish()
    finally:
        for w in writers:
            w.close()
    nbytes = sum(writers[0].sizes)
    spec = {"n_experts": n_experts, "hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab}
    spec |= {"heads": heads, "kv_heads": kv_heads, "dtype": dtype_name, "tie_embeddings": tie_embeddings, "seed": seed}
    spec["shard_bytes"] = per_model
    result = {
        "base": dirs[0],
        "experts": dirs[1:],
        "params": sum(math.prod(s) for _, s in tensors),
        "bytes_per_model": nbytes,
        "total_bytes": nbytes * len(dirs),
        "tensors": len(tensors),
    }
    summary = {"spec": spec, **{k: v for k, v in result.items() if k not in ("base", "experts")}}
    (root / "family.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def write_config_yaml(
    path: Path, method: str, base: Path | str | None, experts: Sequence[Path | str], **params: Any
) -> dict[str, Any]:
    """Write a mergekit-compatible merge config and return it as a dict.

    `weight`, `density`, `gamma`, `epsilon` go under each model's `parameters`: a scalar or a list
    (a gradient) applies to every expert, a tuple gives one value per expert. `weight` defaults
    to 1.0 (mergekit requires it) for the methods that take it. `dtype`, `out_dtype`, `tokenizer_source`
    are top-level keys; anything else (`normalize`, `lambda`, `rescale`, slerp's `t`, ...) goes to the
    global `parameters`.
    For `linear` the base is not written (mergekit would add it and require a weight for it); nor where `base`
    is None (a nuslerp of two models).

    Example: `write_config_yaml(p, "ties", base, [e1, e2], density=0.2, dtype="bfloat16")`
    """
    if "weight" in METHODS[method].params:
        params.setdefault("weight", 1.0)
    models = []
    for i, expert in enumerate(experts):
        mp = {}
        for key in PER_MODEL_PARAMS:
            if key in params:
                value = params[key]
                if isinstance(value, tuple):
                    if len(value) != len(experts):
                        raise ValueError(f"{key}: {len(value)} values for {len(experts)} experts")
                    value = value[i]
                mp[key] = value
        models.append({"model": str(expert), "parameters": mp})
    config: dict[str, Any] = {"models": models, "merge_method": method}
    if method != "linear" and base is not None:
        config["base_model"] = str(base)
    global_params = {k: v for k, v in params.items() if k not in PER_MODEL_PARAMS and k not in TOP_LEVEL_KEYS}
    if global_params:
        config["parameters"] = global_params
    for key in TOP_LEVEL_KEYS:
        if key in params:
            config[key] = params[key]
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def save_as_bin(model_dir: Path, layout: str = "hf") -> None:
    """Replace the safetensors files of `model_dir` by torch.save checkpoints of the same tensors: "single" one
    pytorch_model.bin, "index" shards pytorch_model-i-of-n.bin with pytorch_model.bin.index.json, "shards" the
    shards alone; "hf" (Hugging Face's layout) "single" for one shard, else "index"."""
    from safetensors.torch import load_file

    shards = sorted(model_dir.glob("*.safetensors"))
    if layout == "hf":
        layout = "single" if len(shards) == 1 else "index"
    if layout not in ("single", "index", "shards"):
        raise ValueError(f"layout {layout!r}: one of hf, single, index, shards")
    (model_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    if layout == "single":
        tensors = {k: v for shard in shards for k, v in load_file(shard).items()}
        torch.save(tensors, model_dir / "pytorch_model.bin")
        for shard in shards:
            shard.unlink()
        return
    weight_map = {}
    for i, shard in enumerate(shards):  # one shard in memory at a time
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(shard)
        torch.save(tensors, model_dir / name)
        weight_map.update(dict.fromkeys(tensors, name))
        shard.unlink()
    if layout == "index":
        (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
