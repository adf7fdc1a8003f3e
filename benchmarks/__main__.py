"""Run every benchmark, one after the other: ``python -m benchmarks [--quick] [--check]``.

Each script measures its rows with `benchmarks._harness`, interleaved, and prints ratios
against baselines measured in the same run (see ``benchmarks/README.md``). With
``--check`` the run fails if any script reports a missed target or a failed check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SCRIPTS = (
    ("benchmarks.bench_core", "per request, in-process: the floor, payload sizes, publish"),
    ("benchmarks.bench_dispatch", "500 and 10,000 patterns; memory per pending event"),
    ("benchmarks.bench_server", "through a real uvicorn server: throughput, p50/p99"),
    ("benchmarks.bench_sqs", "SQS forwarding to moto: batched vs one call per event"),
    ("benchmarks.bench_worker", "the worker: SQS (moto) and in-memory sources, by concurrency"),
    ("benchmarks.bench_outbox", "the outbox: per request, relay into SQS (moto), latency"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher figures")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--only", action="append", help="run only this script (repeatable)")
    args = parser.parse_args(argv)
    options = [flag for flag, on in (("--quick", args.quick), ("--check", args.check)) if on]
    failed: list[str] = []
    begun = time.monotonic()
    for module, what in SCRIPTS:
        if args.only and module.rsplit(".", 1)[1] not in args.only:
            continue
        print(f"\n=== {module}: {what} ===\n", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", module, *options])
        print(f"\n({module}: {time.monotonic() - started:.0f} s, exit {code})", flush=True)
        if code != 0:
            failed.append(module)
    print(f"\nall scripts: {time.monotonic() - begun:.0f} s")
    if failed:
        print(f"failed or missed a target: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
