"""Faults injected end to end into a dataset build, tallied in bench/results/faults.json.

    .venv/bin/python bench/faults_bench.py [--out bench/results/faults.json] [--only stac_429,disk_full] [--keep DIR]

One region (a real Sentinel-2 L2A patch from ../shared/data served as signed GeoTIFFs, 40 street-view points) is
built clean through a loopback STAC API (rustac) and raster server, then rebuilt once per fault: STAC 429 with
Retry-After, 503, a stalled answer past the client timeout and a malformed page; raster 403 for an expired
signature and a connection cut mid-body; a worker SIGKILLed while staging shards; a full disk (RLIMIT_FSIZE) in the
shards step. Per fault kind: injected, survived, samples lost, recovered or failed cleanly, and how
(``bench/fault_scenarios.py``). Exit status 0 when every injected fault was survived with no sample lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_scenarios
from common import RESULTS, machine


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == fault_scenarios.CHILD:
        return fault_scenarios.child_build(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    ap.add_argument("--only", default="", help="comma-separated fault kinds (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    missing = fault_scenarios.missing_inputs()
    if missing:
        print(f"faults_bench: real inputs missing ({', '.join(missing)}); ../shared/data is needed", file=sys.stderr)
        return 2
    only = tuple(k for k in args.only.split(",") if k)
    t0 = time.monotonic()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        tally = fault_scenarios.run_all(args.keep, only)
    else:
        with tempfile.TemporaryDirectory(prefix="gair-faults-") as tmp:
            tally = fault_scenarios.run_all(Path(tmp), only)
    doc = {"machine": machine(), "seconds": round(time.monotonic() - t0, 1), **tally}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for kind, r in doc["faults"].items():
        print(f"{kind:24s} injected {r['injected']}  survived {r['survived']}  lost {r['samples_lost']}  "
              f"{r['outcome']}: {r['message'][:120]}")
    t = doc["totals"]
    print(f"total: {t['injected']} injected, {t['survived']} survived, {t['samples_lost']} samples lost "
          f"({doc['seconds']} s) -> {args.out}")
    if not t["all_survived"]:  # the tally is the result: `make bench` goes on to the next benchmark
        print("faults_bench: NOT every injected fault was survived (see the tally)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
