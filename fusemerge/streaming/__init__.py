"""Streaming I/O: safetensors headers, model indexes over shards, memory-mapped chunk reads, sharded writes, the
resume journal (`fusemerge.streaming.journal`)."""

from fusemerge.streaming.model_index import ModelIndex, open_model
from fusemerge.streaming.reader import ChunkReader
from fusemerge.streaming.safetensors_header import DTYPES, SafetensorsHeader, TensorEntry, read_header
from fusemerge.streaming.writer import (
    OutputLayout,
    OutputShard,
    OutputTensor,
    ShardedWriter,
    check_out_dir,
    make_temp_dir,
    move_into_place,
    plan_layout,
    temp_dir_path,
)

__all__ = [
    "DTYPES",
    "ChunkReader",
    "ModelIndex",
    "OutputLayout",
    "OutputShard",
    "OutputTensor",
    "SafetensorsHeader",
    "ShardedWriter",
    "TensorEntry",
    "check_out_dir",
    "move_into_place",
    "make_temp_dir",
    "open_model",
    "plan_layout",
    "read_header",
    "temp_dir_path",
]
