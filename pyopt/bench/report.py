"""Result files of `pyopt bench --out DIR` and `--compare`.

results.json (schema "pyopt-bench/1"):
  schema      "pyopt-bench/1"
  created     ISO-8601 time of the run
  command     the argument list
  machine     cpu, cores, threads, cpu_isa, torch, pyopt, build (compiler, flags,
              ISA variants), cuda_module, gpu (CUDA runs)
  limits      copy_gbps, triad_gbps, rmw_gbps (256 MiB arrays; byte models 8, 12
              and 12 B/element), gemm_gflops (fp32 2048^3 matmul), array_bytes
  peers       {name: {available, reason, provides}}
  results     one record per (suite, case, implementation):
              suite, case, impl, device, status ("ok", "failed", "unavailable"),
              reason, median_ms, q1_ms, q3_ms, iqr_ms, reps, bytes_per_step, gbps,
              rmw_gbps (timed in alternation with the case), of_rmw, baseline,
              speedup (baseline median / this median), numel, tensors, dtype,
              optimizer, format (sparse suite: the layout "pyopt auto" chose)
results.csv   the records, one row each (the same keys)
results.md    the table ready for the README
*.png         optimizer achieved bandwidth as a fraction of the same-run RMW
              wall, and speedup over the baseline, per case
"""
from __future__ import annotations

import csv
import json
import os

SCHEMA = "pyopt-bench/1"
FIELDS = ["suite", "case", "impl", "device", "status", "reason", "median_ms", "q1_ms", "q3_ms",
          "iqr_ms", "reps", "bytes_per_step", "gbps", "rmw_gbps", "of_rmw", "baseline",
          "speedup", "numel", "tensors", "dtype", "optimizer", "format"]


def write_all(out_dir, doc, markdown) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump(doc, f, indent=2)
    paths.append(p)
    p = os.path.join(out_dir, "results.csv")
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow(r)
    paths.append(p)
    p = os.path.join(out_dir, "results.md")
    with open(p, "w") as f:
        f.write(markdown + "\n")
    paths.append(p)
    paths += plot(doc, out_dir)
    return paths


def plot(doc, out_dir) -> list[str]:
    """PNG plots; none (with a note on stderr) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys
        print("pyopt bench: matplotlib is not installed, no plots written "
              "(pip install matplotlib)", file=sys.stderr)
        return []
    ok = [r for r in doc["results"] if r["status"] == "ok" and r["suite"] == "optim"]
    if not ok:
        return []
    cases = list(dict.fromkeys(r["case"] for r in ok))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    paths = []
    for key, fname, label in (("of_rmw", "optim_bandwidth.png",
                               "achieved bandwidth / same-run in-place RMW bandwidth"),
                              ("speedup", "optim_speedup.png", "speedup over torch's fastest")):
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.5))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            vals = [next((r[key] or 0 for r in ok if r["case"] == c and r["impl"] == impl), 0)
                    for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"optimizer step, {doc['machine'].get('cpu', '')}, "
                     f"{doc['machine'].get('threads')} threads", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def load(path) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a pyopt bench result (schema {doc.get('schema')!r}, "
                         f"expected {SCHEMA!r})")
    return doc


def compare(new: dict, old: dict, threshold: float | None = None):
    """(lines, regressions): per-case new/old time ratios, and the cases slower
    by more than ``threshold`` (a fraction) beyond the noise of both runs,
    i.e. new - old > threshold * old + (IQR_new + IQR_old) / 2."""
    def index(doc):
        return {(r["suite"], r["device"], r["case"], r["impl"]): r
                for r in doc["results"] if r.get("status") == "ok"}
    a, b = index(new), index(old)
    lines, regressions = [], []
    for key in sorted(set(a) | set(b)):
        name = f"{key[2]} / {key[3]} ({key[1]})"
        if key not in b:
            lines.append(f"{name}: only in the new run")
            continue
        if key not in a:
            lines.append(f"{name}: only in the old run")
            continue
        n, o = a[key], b[key]
        ratio = n["median_ms"] / o["median_ms"]
        noise = (n.get("iqr_ms", 0) + o.get("iqr_ms", 0)) / 2
        slower = n["median_ms"] - o["median_ms"]
        flag = ""
        if threshold is not None and slower > threshold * o["median_ms"] + noise:
            regressions.append(name)
            flag = "  REGRESSION"
        lines.append(f"{name}: {n['median_ms']:.3f} ms vs {o['median_ms']:.3f} ms, "
                     f"new/old {ratio:.2f}{flag}")
    return lines, regressions
