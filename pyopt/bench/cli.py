"""Command line of `pyopt bench`."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from . import SUITES
from .timing import bandwidth_limits


def _machine(device, threads) -> dict:
    import pyopt
    d = pyopt.info()
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    m = {"cpu": cpu_model, "cores": os.cpu_count(), "threads": threads,
         "cpu_isa": d["cpu_isa"].get("in_use"), "torch": torch.__version__,
         "pyopt": d["version"], "build": d["cpu_module"], "cuda_module": d["cuda_module"]}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    return m


def format_table(records, limits) -> str:
    head = f"{'case':26s} {'implementation':38s} {'median ms':>10s} {'IQR ms':>8s} {'reps':>5s} " \
           f"{'GB/s':>7s} {'of RMW':>7s} {'speedup':>8s}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['case']:26s} {r['impl']:38s} {r['status']}: {r.get('reason', '')}")
            continue
        sp = r.get("speedup")
        lines.append(f"{r['case']:26s} {r['impl']:38s} {r['median_ms']:10.3f} {r['iqr_ms']:8.3f} "
                     f"{r['reps']:5d} {r['gbps']:7.1f} {r['of_rmw']:7.0%} "
                     f"{(f'{sp:.2f}x' if sp else '-'):>8s}")
    return "\n".join(lines)


def format_markdown(records, limits, machine) -> str:
    lines = [f"Machine: {machine['cpu']}, {machine['threads']} threads, ISA {machine['cpu_isa']}, "
             f"torch {machine['torch']}. Same-run bandwidth: copy {limits['copy']:.1f} GB/s, "
             f"triad {limits['triad']:.1f} GB/s, in-place RMW {limits['rmw']:.1f} GB/s.", "",
             "`of RMW`: achieved GB/s over the in-place RMW bandwidth timed in alternation with the "
             "same case. `speedup`: against torch's fastest implementation of that optimizer "
             "(`fused=True` where torch has one, else `foreach=True`).", "",
             "| case | implementation | median ms | GB/s | of RMW | speedup |",
             "|---|---|---:|---:|---:|---:|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | {r['status']} | | | |")
            continue
        sp = r.get("speedup")
        lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
                     f"{r['of_rmw']:.0%} | {f'{sp:.2f}x' if sp else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyopt bench", description=__doc__)
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(SUITES)})")
    ap.add_argument("--quick", action="store_true", help="short timing windows (about a minute)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None,
                    help="thread count (default: torch.get_num_threads())")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of measured time per implementation and case")
    ap.add_argument("--impl", action="append", default=None,
                    help="only these implementations (the torch fused baseline always runs)")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    ap.add_argument("--list", action="store_true", help="list suites, cases and implementations")
    args = ap.parse_args(argv)

    suites = args.suites or list(SUITES)
    for s in suites:
        if s not in SUITES:
            ap.error(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.list:
        for s in suites:
            mod = SUITES[s]
            print(f"{s}:")
            for c in mod.cases(args.device, args.quick):
                print(f"  case  {c.name}")
            for name, (factory, why) in mod.impls(args.device, None).items():
                print(f"  impl  {name}" + ("" if factory else f"  (unavailable: {why})"))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = _machine(args.device, threads)
    print(f"pyopt bench: {machine['cpu']}, {threads} threads, ISA {machine['cpu_isa']}, "
          f"torch {machine['torch']}", flush=True)
    limits = bandwidth_limits(args.device, min_time=0.3 if args.quick else 1.0)
    print(f"same-run bandwidth: copy {limits['copy']:.1f} GB/s, triad {limits['triad']:.1f} GB/s, "
          f"in-place RMW {limits['rmw']:.1f} GB/s (256 MiB arrays)", flush=True)

    records = []
    for s in suites:
        progress = (lambda msg: print(f"  running {msg} ...", file=sys.stderr, flush=True))
        records += SUITES[s].run(args.device, args.quick, min_time=args.min_time,
                                 progress=progress, only=args.impl)
    print(format_table(records, limits))
    print("speedup: against torch fused=True, or foreach=True where torch has no fused version")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"machine": machine, "limits": limits, "results": records}, f, indent=2)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(format_markdown(records, limits, machine) + "\n")
        print(f"wrote {args.out}/results.json and results.md")
    failed = [r for r in records if r["status"] == "failed"]
    return 1 if failed else 0
