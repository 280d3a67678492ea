"""The fuzz properties of tests/test_fuzz.py, run long: 10^5 cases by default (the CI run tries ~2,000).

    python bench/fuzz.py [--cases 100000] [--seed 0] [--only documents]

Each hypothesis test runs with a larger max_examples (its share of --cases) and a fixed seed; a failing property
is shrunk and printed, and the run goes on with the next one. Prints the cases tried and the failures; exit 1 if any.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import settings  # noqa: E402

from tests import fuzz_count  # noqa: E402
from tests import test_fuzz as tf  # noqa: E402

# Share of the cases per property, and cases counted per example (the documents test loads twice).
SHARES = [
    (tf.test_read_header_fuzz, 0.25, 1),
    (tf.test_read_bin_header_fuzz, 0.10, 1),
    (tf.test_open_model_fuzz, 0.10, 1),
    (tf.test_load_config_documents_fuzz, 0.20, 2),
    (tf.test_load_config_text_fuzz, 0.31, 1),
    (tf.test_cli_inspect_fuzz, 0.02, 1),
    (tf.test_cli_plan_fuzz, 0.02, 1),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="run only the properties whose test name contains this")
    args = ap.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"# fuzz.py: {args.cases} cases, seed {args.seed}, {date.today()}, {machine}, "
          f"python {platform.python_version()}")
    failures: list[str] = []
    t_all = time.monotonic()
    for fn, share, per_example in SHARES:
        if args.only not in fn.__name__:
            continue
        n = max(1, round(args.cases * share / per_example))
        # The tests carry settings already (CI sizes); the given() wrapper reads them from this attribute at call time.
        fn._hypothesis_internal_use_settings = settings(tf.FUZZ, max_examples=n, derandomize=False)
        fn._hypothesis_internal_use_seed = args.seed
        before, t0 = sum(fuzz_count.COUNTS.values()), time.monotonic()
        try:
            fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - report every failing property, then go on
            status = f"FAILED: {type(e).__name__}"
            failures.append(f"{fn.__name__}: {''.join(traceback.format_exception(e))}")
        tried = sum(fuzz_count.COUNTS.values()) - before
        print(f"{fn.__name__:<36} {tried:>7} cases {time.monotonic() - t0:7.1f} s  {status}", flush=True)
    print(fuzz_count.summary())
    print(f"total {time.monotonic() - t_all:.0f} s, {len(failures)} failing properties")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
