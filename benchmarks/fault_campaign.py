"""A long randomized fault campaign (hundreds of trials): prints a JSON summary.

    python benchmarks/fault_campaign.py --trials-per-family 40 --seed 7 [--families llama,qwen3_moe]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from faults import run_campaign  # noqa: E402

from swarm.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials-per-family", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", default="llama,mistral,qwen2,qwen3,qwen3_moe")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fault_campaign."))
    paths = {f: make_tiny_model(f, work / f) for f in args.families.split(",")}
    started = time.monotonic()
    campaign = run_campaign(paths, args.trials_per_family, args.seed, log=lambda t: print(t, file=sys.stderr))
    by_fault = collections.Counter(t.fault for t in campaign.trials)
    print(json.dumps({
        "trials": len(campaign.trials), "equal": sum(t.equal for t in campaign.trials),
        "failures": [t.__dict__ for t in campaign.failures], "by_fault": by_fault,
        "with_recovery": sum(t.recoveries > 0 for t in campaign.trials), "seed": args.seed,
        "wall_s": round(time.monotonic() - started, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
