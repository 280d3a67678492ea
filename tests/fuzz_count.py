"""The number of fuzz cases tried in this process (tests/test_fuzz.py counts, tests/conftest.py reports)."""

COUNTS: dict[str, int] = {}


def tried(kind: str) -> None:
    """Count one case of `kind` (safetensors, model_dir, config, cli)."""
    COUNTS[kind] = COUNTS.get(kind, 0) + 1


def summary() -> str:
    """E.g. "fuzz: 1234 cases tried (safetensors 800, config 400, ...)"."""
    parts = ", ".join(f"{k} {v}" for k, v in COUNTS.items())
    return f"fuzz: {sum(COUNTS.values())} cases tried ({parts})"
