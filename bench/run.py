"""Run the benchmark scenarios, print the table, write bench/results/<timestamp>.json.

    python -m bench.run [--quick] [--only proxy,enqueue,...] [--profile py-spy|py-spy-gil|cprofile]

Every figure is judged against references measured in the same run. With
--profile each a2ad process runs under a profiler and the hottest functions
are printed after the table (profiling slows a2ad: the figures of such a run
are for finding hot spots, not for the targets).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from . import profile, report, wrkdrive
from .procs import REPO, MachineTimes, Procs
from .scenarios import FULL, QUICK, SCENARIOS, Bench

RESULTS = Path(__file__).resolve().parent / "results"
# Above this share of the CPUs taken by others (processes or the hypervisor), say so.
NOISY_SHARE = 0.10


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "a2ad"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return rev + ("+dirty a2ad/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="the one-minute smoke run")
    parser.add_argument("--only", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--profile",
        choices=["py-spy", "py-spy-gil", "cprofile"],
        help="profile every a2ad (py-spy-gil: only samples holding the GIL)",
    )
    parser.add_argument(
        "--a2ad-log-level", help="A2AD_LOG_LEVEL for every a2ad (default: a2ad's own, info)"
    )
    parser.add_argument("--no-wrk", action="store_true", help="the Python generator everywhere")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (stores, logs)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    use_wrk = wrkdrive.available() and not args.no_wrk
    if not use_wrk and not args.no_wrk:
        print(
            "bench: wrk is not installed (apt-get install wrk); the durable enqueue scenario "
            "uses the Python generator, which may bound the 202 reference",
            file=sys.stderr,
        )
    if args.profile in ("py-spy", "py-spy-gil") and not (
        shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()
    ):
        parser.error("py-spy is not installed (.venv/bin/pip install py-spy), or use cprofile")

    workdir = Path(tempfile.mkdtemp(prefix="a2ad-bench-"))
    a2ad_env = {"A2AD_LOG_LEVEL": args.a2ad_log_level} if args.a2ad_log_level else {}
    procs = Procs(workdir, profile=args.profile, a2ad_env=a2ad_env)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    meta: dict[str, Any] = {
        "timestamp": stamp,
        "plan": plan.name,
        "scenarios": chosen,
        "git": _git_revision(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "enqueue_generator": "wrk" if use_wrk else "loadgen",
        "wrk": wrkdrive.version(),
        "profile": args.profile,
        "a2ad_log_level": args.a2ad_log_level or "default (info)",
    }
    print(
        f"bench: {plan.name} run of {', '.join(chosen)} at {meta['git']}; load average "
        f"{meta['load_average_at_start'][0]:.2f}; work folder {workdir}",
        flush=True,
    )
    bench: Bench | None = None
    failed: list[str] = []
    machine_start = MachineTimes.now()
    try:
        bench = Bench(plan, procs, use_wrk=use_wrk)
        steps = {
            "proxy": bench.proxy_overhead,
            "enqueue": bench.durable_enqueue,
            "drain": bench.drain_latency,
            "backlog": bench.deep_backlog,
            "scale": bench.scale,
            "stream": bench.streaming,
            "postgres": bench.postgres,
            "replicas": bench.replicas,
            "push": bench.push,
        }
        for key in SCENARIOS:
            if key not in chosen:
                continue
            before = MachineTimes.now(procs.started)
            print(f"bench: {key} ...", flush=True)
            try:
                steps[key]()
            except Exception as exc:
                failed.append(key)
                print(f"bench: {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                bench.raw.setdefault("failures", {})[key] = f"{type(exc).__name__}: {exc}"
            spent = MachineTimes.now(procs.started).since(before)
            bench.raw.setdefault("machine", {})[key] = spent
            print(
                f"bench: {key} took {spent['seconds']:.0f} s; of the CPUs, other processes"
                f" used {spent['foreign_share']:.0%}, the hypervisor {spent['steal_share']:.0%}",
                flush=True,
            )
    finally:
        procs.stop_all()
    # Every process we started has been waited for: what else ran is someone else's.
    meta["machine"] = MachineTimes.now().since(machine_start)
    meta["seconds"] = round(time.monotonic() - started, 1)
    # Another busy process on the machine shows here, and in the figures.
    meta["load_average_at_end"] = os.getloadavg()
    rows = bench.rows if bench is not None else []
    raw = bench.raw if bench is not None else {}
    print()
    print(report.table(rows))
    out = RESULTS / f"{stamp}{'-quick' if plan.name == 'quick' else ''}.json"
    if args.profile:
        raw["profile"] = {}
        for path in procs.profiles:
            summary = profile.summarize([path], top=15)
            raw["profile"][path.parent.name] = {"file": str(path), "summary": summary}
            print(f"\n== profile of {path.parent.name} ==\n{summary}")
    report.write_json(out, meta, raw, rows)
    held = sum(r.verdict == report.HOLDS for r in rows)
    missed = [r for r in rows if r.verdict == report.FAILS]
    bound = sum(r.verdict == report.BOUND for r in rows)
    print()
    print(
        f"bench: {held} targets hold, {len(missed)} fail, {bound} bound by the generator; "
        f"{meta['seconds']:.0f} s; load average {meta['load_average_at_end'][0]:.2f} at the end; "
        f"results in {out.relative_to(REPO)}"
    )
    machine = meta["machine"]
    print(
        f"bench: other processes used {machine['foreign_share']:.0%} of the machine's CPUs "
        f"during the run, the hypervisor took {machine['steal_share']:.0%} (steal)"
    )
    if machine["foreign_share"] > NOISY_SHARE or machine["steal_share"] > NOISY_SHARE:
        print(
            "bench: WARNING: a disturbed run; absolute figures are low and ratios noisy. "
            "Run again when the machine is quiet."
        )
    if failed:
        print(f"bench: scenarios that did not finish: {', '.join(failed)}", file=sys.stderr)
    if args.keep or args.profile:
        print(f"bench: work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
