"""fusemerge: merge fine-tuned LLM checkpoints from mergekit YAML, streaming, in bounded memory.

    import fusemerge
    fusemerge.run("config.yml", "out/", device="auto", max_memory="8GiB")
    fusemerge.run("config.yml", "out/", partition="0/2"); ...; fusemerge.finalize("out/")  # one part per machine
    merged = fusemerge.merge_tensors(base, [e1, e2, e3], method="ties", weight=[1, 1, 1], density=0.2, seed=0)
"""

__version__ = "0.1.0"

from fusemerge.config import MergeConfig, load_config  # noqa: E402
from fusemerge.errors import FusemergeError, InputError  # noqa: E402
from fusemerge.merge import MergeResult, run  # noqa: E402
from fusemerge.partition import FinalizeResult, finalize  # noqa: E402
from fusemerge.planner import MergePlan, build_plan  # noqa: E402
from fusemerge.tensor_merge import merge_tensors  # noqa: E402

plan = build_plan

__all__ = [
    "FinalizeResult", "FusemergeError", "InputError", "MergeConfig", "MergePlan", "MergeResult", "__version__",
    "build_plan", "finalize", "load_config", "merge_tensors", "plan", "run",
]
