"""Peak anonymous resident memory of each step of `mergesmith moe`, sampled in the building process.

    PYTHONPATH=src python bench/moe_phases.py RECIPE OUT_DIR [--no-report]

Runs mergesmith.moe.build_moe (seed 1, output shards of 2 GB, --overwrite) with its steps wrapped so that a
thread sampling /proc/self/status (RssAnon, every 20 ms) knows which step runs; prints each step's peak. "STEP+after" is
the time from that step's end to the next wrapped step's start (a step inside another: until the outer one ends).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Dict, List

import mergesmith.moe as moe
import mergesmith.routers as routers
import mergesmith.verify as verify

STEPS = [
    (moe, "make_moe_plan"),
    (moe, "_prepare"),
    (routers, "hidden_gates"),
    (routers, "cheap_embed_gates"),
    (moe, "compute_routers"),
    (moe, "_write_tensors"),
    (moe, "routing_report"),
    (moe, "write_folder"),
    (verify, "verify_weights"),
]


def anon_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("out_dir")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    step: List[str] = ["start"]
    peaks: Dict[str, int] = {}

    def sample() -> None:
        while True:
            peaks[step[0]] = max(peaks.get(step[0], 0), anon_rss())
            time.sleep(0.02)

    def wrapped(f, name):
        def run(*args, **kw):
            step[0] = name
            try:
                return f(*args, **kw)
            finally:
                time.sleep(0.05)  # the sampler sees the step's last state
                step[0] = f"{name}+after"

        return run

    for mod, name in STEPS:  # build_moe looks these up when it runs (verify_weights: imported inside it)
        setattr(mod, name, wrapped(getattr(mod, name), name))
    threading.Thread(target=sample, daemon=True).start()
    moe.build_moe(a.recipe, a.out_dir, seed=1, quiet=True, overwrite=True, out_shard_size="2GB", report=not a.no_report)
    time.sleep(0.1)
    for name, peak in peaks.items():
        print(f"{peak / 2**30:6.2f} GiB  {name}")


if __name__ == "__main__":
    main()
