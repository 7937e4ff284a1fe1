"""Command line of `pyopt bench`: see `pyopt bench -h` and bench/README.md."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

from . import SUITES, peers, report
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


def format_table(records) -> str:
    quant = [r for r in records if r.get("suite") == "quant"]
    other = [r for r in records if r.get("suite") != "quant"]
    parts = [_table(other)] if other or not quant else []
    if quant:
        parts.append(_quant_table(quant))
    return "\n\n".join(parts)


def _b1(r, key, fmt):
    """A bandwidth column of the quant tables: shown at batch 1 only, where the
    weight bytes set the pace."""
    return format(r[key], fmt) if r.get("batch") == 1 and r.get(key) is not None else "-"


def _quant_table(records) -> str:
    head = (f"{'case':22s} {'implementation':38s} {'median ms':>10s} {'IQR ms':>8s} "
            f"{'reps':>5s} {'speedup':>8s} {'rel err':>8s} {'B/w':>6s} {'GB/s':>7s} "
            f"{'of copy':>7s}")
    lines = [head, "-" * len(head)]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['case']:22s} {r['impl']:38s} {r['status']}: {r.get('reason', '')}")
            continue
        lines.append(f"{r['case']:22s} {r['impl']:38s} {r['median_ms']:10.3f} {r['iqr_ms']:8.3f} "
                     f"{r['reps']:5d} {r['speedup']:7.2f}x {r['error']:8.1e} "
                     f"{r['bytes_per_weight']:6.3f} {_b1(r, 'gbps', '7.1f'):>7s} "
                     f"{_b1(r, 'of_copy', '7.0%'):>7s}")
    return "\n".join(lines)


def _table(records) -> str:
    head = (f"{'case':26s} {'implementation':38s} {'median ms':>10s} {'IQR ms':>8s} "
            f"{'reps':>5s} {'GB/s':>7s} {'of RMW':>7s} {'speedup':>8s}")
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
    quant = [r for r in records if r.get("suite") == "quant"]
    other = [r for r in records if r.get("suite") != "quant"]
    lines = [f"Machine: {machine['cpu']}, {machine['threads']} threads, ISA {machine['cpu_isa']}, "
             f"torch {machine['torch']}. Same-run references: copy {limits['copy_gbps']:.1f} GB/s, "
             f"triad {limits['triad_gbps']:.1f} GB/s, in-place RMW {limits['rmw_gbps']:.1f} GB/s, "
             f"fp32 GEMM {limits['gemm_gflops']:.0f} GFLOP/s."]
    if other or not quant:
        lines += ["", "`of RMW`: achieved GB/s over the in-place RMW bandwidth timed in "
                  "alternation with the same case. `speedup`: against torch's fastest "
                  "implementation of the same operation (`fused=True` where torch has one).", "",
                  "| case | implementation | median ms | GB/s | of RMW | speedup |",
                  "|---|---|---:|---:|---:|---:|"]
    for r in other:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | {r['status']} | | | |")
            continue
        sp = r.get("speedup")
        lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['gbps']:.1f} | "
                     f"{r['of_rmw']:.0%} | {f'{sp:.2f}x' if sp else '-'} |")
    if quant:
        lines += ["", "Quantized Linear (`pyopt bench quant`): `speedup` against fp32 `F.linear` "
                  "on the float weight; `rel. error` = max |y - y_fp32| / max |y_fp32| against "
                  "its output; `B/weight`: weight storage with its scales over out*in; `GB/s` "
                  "(batch 1) counts that storage plus x and y once, `of copy` relates it to the "
                  "copy bandwidth timed in alternation with the case.", "",
                  "| case | implementation | median ms | speedup | rel. error | B/weight | "
                  "GB/s | of copy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in quant:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['error']:.1e} | {r['bytes_per_weight']:.3f} | "
                     f"{_b1(r, 'gbps', '.1f')} | {_b1(r, 'of_copy', '.0%')} |")
    return "\n".join(lines)


class _Progress:
    """A rich progress bar when rich is installed, else one line per case."""

    def __init__(self, total, enabled):
        self.bar = None
        if enabled:
            try:
                from rich.progress import Progress
                self.bar = Progress(transient=True)
                self.task = self.bar.add_task("pyopt bench", total=total)
                self.bar.start()
            except ImportError:
                pass
        self.enabled = enabled

    def __call__(self, msg):
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=msg)
        elif self.enabled:
            print(f"  running {msg} ...", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pyopt bench",
                                 description="pyopt kernels against stock PyTorch and peers, "
                                             "with same-run machine limits")
    ap.add_argument("suites", nargs="*", help=f"suites to run (default: all of {', '.join(SUITES)})")
    ap.add_argument("--quick", action="store_true", help="short timing windows (about a minute)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None,
                    help="thread count (default: torch.get_num_threads())")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of measured time per implementation and case")
    ap.add_argument("--impl", action="append", default=None,
                    help="only these implementations (the baseline always runs)")
    ap.add_argument("--out", default=None,
                    help="write results.json, results.csv, results.md and PNG plots here")
    ap.add_argument("--compare", default=None, metavar="OLD.json",
                    help="print each case's time ratio new/old against an earlier results.json")
    ap.add_argument("--fail-if-regression", type=float, default=None, metavar="X",
                    help="with --compare: exit 1 when a case is slower by more than X (0.10 = "
                         "10%%) beyond the noise (IQR) of both runs")
    ap.add_argument("--list", action="store_true",
                    help="list suites, cases, implementations and which peers are installed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    suites = args.suites or list(SUITES)
    for s in suites:
        if s not in SUITES:
            ap.error(f"unknown suite {s!r}; choose from {', '.join(SUITES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device on this machine")
    if args.fail_if_regression is not None and not args.compare:
        ap.error("--fail-if-regression needs --compare OLD.json")
    old = None
    if args.compare:
        try:
            old = report.load(args.compare)
        except (OSError, ValueError) as e:
            ap.error(f"--compare: {e}")
    if args.list:
        for s in suites:
            mod = SUITES[s]
            print(f"{s}:")
            for c in mod.cases(args.device, args.quick):
                names = ", ".join(f"{n}" + ("" if f else " (unavailable)")
                                  for n, (f, _) in mod.impls(args.device, c).items())
                print(f"  case  {c.name}: {names}")
        print("peers:")
        for name, d in peers.detect(args.device).items():
            state = "installed" if d["available"] else f"missing: {d['reason']}"
            print(f"  {name:13s} {state}  ({d['provides']})")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = _machine(args.device, threads)
    print(f"pyopt bench: {machine['cpu']}, {threads} threads, ISA {machine['cpu_isa']}, "
          f"torch {machine['torch']}", flush=True)
    tiny = bool(os.environ.get("PYOPT_BENCH_TINY"))   # the test suite's sizes
    limits = bandwidth_limits(args.device, nbytes=(1 << 20) if tiny else 256 << 20,
                              min_time=0.01 if tiny else (0.3 if args.quick else 1.0))
    print(f"same-run references: copy {limits['copy_gbps']:.1f} GB/s, triad "
          f"{limits['triad_gbps']:.1f} GB/s, in-place RMW {limits['rmw_gbps']:.1f} GB/s "
          f"(256 MiB arrays), fp32 GEMM {limits['gemm_gflops']:.0f} GFLOP/s", flush=True)

    records = []
    total = sum(len(SUITES[s].cases(args.device, args.quick)) for s in suites)
    progress = _Progress(total, not args.no_progress)
    try:
        for s in suites:
            records += SUITES[s].run(args.device, args.quick, min_time=args.min_time,
                                     progress=progress, only=args.impl)
    finally:
        progress.close()
    print(format_table(records))
    doc = {"schema": report.SCHEMA, "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": ["pyopt", "bench", *(argv if argv is not None else sys.argv[2:])],
           "machine": machine, "limits": limits, "peers": peers.detect(args.device),
           "results": records}
    if args.out:
        paths = report.write_all(args.out, doc, format_markdown(records, limits, machine))
        print("wrote " + ", ".join(paths))
    status = 1 if any(r["status"] == "failed" for r in records) else 0
    if old is not None:
        lines, regressions = report.compare(doc, old, args.fail_if_regression)
        print(f"compared with {args.compare}:")
        print("\n".join("  " + line for line in lines))
        if args.fail_if_regression is not None and regressions:
            print(f"{len(regressions)} regression(s) beyond {args.fail_if_regression:.0%} "
                  "and the noise of both runs")
            status = 1
    return status
