"""The benchmark harness, at tiny sizes (PYOPT_BENCH_TINY); the real
benchmark never runs in the test suite."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from pyopt.bench import optim, peers, quant, report

TINY = {"PYOPT_BENCH_TINY": "1"}


def _bench(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pyopt", "bench", *args], capture_output=True,
                          text=True, env=e, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = _bench("--min-time", "0.01", "--no-progress", "--out", str(out), env=TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_output_files_and_json_schema(tiny_run):
    out, r = tiny_run
    for name in ("results.json", "results.csv", "results.md", "optim_bandwidth.png",
                 "optim_speedup.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == report.SCHEMA
    for key in ("created", "command", "machine", "limits", "peers", "results"):
        assert key in doc
    for key in ("copy_gbps", "triad_gbps", "rmw_gbps", "gemm_gflops"):
        assert doc["limits"][key] > 0
    for key in ("cpu", "cores", "threads", "cpu_isa", "torch", "pyopt", "build"):
        assert key in doc["machine"]
    ok = [x for x in doc["results"] if x["status"] == "ok"]
    assert {x["case"] for x in ok if x["suite"] == "sparse"} == {
        "unstructured 90% tiny B=1", "2:4 tiny B=16", "block32 90% tiny B=8"}
    assert {x["impl"] for x in ok if x["suite"] == "sparse"} >= {
        "dense F.linear", "pyopt auto", "pyopt csr", "pyopt bitmask", "pyopt nm", "pyopt bsr",
        "torch CSR W@x.T", "torch BSR W@x.T"}
    ok = [x for x in ok if x["suite"] == "optim"]
    assert {x["case"] for x in ok} == {"AdamW tiny", "SGD tiny", "AdamW+GradScaler tiny",
                                       "clip tiny"}
    for x in ok:
        assert x["median_ms"] > 0 and x["reps"] >= 5 and x["q1_ms"] <= x["median_ms"] <= x["q3_ms"]
        assert x["gbps"] > 0 and x["rmw_gbps"] > 0 and x["speedup"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(doc["results"]) and set(report.FIELDS) == set(rows[0])
    assert "| case | implementation |" in (out / "results.md").read_text()
    assert "pyopt native" in r.stdout and "speedup" in r.stdout


def test_quant_suite_rows(tiny_run):
    out, r = tiny_run
    doc = json.loads((out / "results.json").read_text())
    rows = [x for x in doc["results"] if x["suite"] == "quant"]
    assert {x["case"] for x in rows} == {"tiny 64x256 fp32 B=1", "tiny 64x256 bf16 B=1",
                                         "tiny 64x256 fp32 B=8"}
    assert not [x for x in rows if x["status"] == "failed"]
    ok = {(x["case"], x["impl"]): x for x in rows if x["status"] == "ok"}
    fp32 = {i for c, i in ok if c == "tiny 64x256 fp32 B=8"}
    assert fp32 >= {"torch F.linear fp32", "torch _weight_int8pack_mm",
                    "torch _weight_int4pack_mm_for_cpu g128", "pyopt int8 W8A8",
                    "pyopt int8_weight_only W8", "pyopt int4_weight_only W4",
                    "pyopt int4 act=int8 W4A8", "pyopt numba int8 W8A8",
                    "pyopt numba int4 act=int8 W4A8"}
    engines = [e for e in quant.AO_ENGINES if e in torch.backends.quantized.supported_engines]
    for e in engines:       # every supported engine runs, or says why not
        x = next(x for x in rows if x["impl"] == f"torch.ao dynamic int8 {e}"
                 and x["case"] == "tiny 64x256 fp32 B=8")
        assert x["status"] == "ok" or x["reason"]
    bf16 = {i for c, i in ok if c == "tiny 64x256 bf16 B=1"}
    assert bf16 >= {"torch F.linear fp32", "torch F.linear bf16", "torch _weight_int8pack_mm",
                    "pyopt int8_weight_only W8", "pyopt int4_weight_only W4",
                    "pyopt numba int4_weight_only W4"}
    assert not any("W8A8" in i or "W4A8" in i for i in bf16)
    for (c, i), x in ok.items():
        assert x["median_ms"] > 0 and x["reps"] >= 5 and x["speedup"] > 0, (c, i)
        assert 0 <= x["error"] <= x["bound"] and x["gbps"] > 0 and x["of_copy"] > 0, (c, i)
        assert x["dtype"] == ("bf16" if "bf16" in c and i != quant.BASELINE else "fp32")
    base = ok[("tiny 64x256 fp32 B=1", quant.BASELINE)]
    assert base["error"] == 0 and base["bytes_per_weight"] == 4
    w4 = ok[("tiny 64x256 fp32 B=1", "pyopt int4_weight_only W4")]
    assert 0.5 <= w4["bytes_per_weight"] < 0.6 and 0 < w4["error"] < 0.3
    assert ok[("tiny 64x256 fp32 B=1", "pyopt int8_weight_only W8")]["error"] < 0.05
    for peer in ("torchao", "bitsandbytes"):
        if not doc["peers"][peer]["available"]:
            assert any(x["impl"] == peer and x["status"] == "unavailable" for x in rows)
    md = (out / "results.md").read_text()
    assert "| tiny 64x256 fp32 B=1 | pyopt int4_weight_only W4 |" in md and "rel. error" in md
    assert "rel err" in r.stdout and "pyopt int4 act=int8 W4A8" in r.stdout


def test_quant_wrong_kernel_is_reported_as_failed():
    def off_by_a_lot(layer, x):            # an int4 kernel that lost its scales
        w = torch.sign(layer.w)
        return (lambda: torch.nn.functional.linear(x, w)), layer.w.numel() // 2

    case = quant.Case("tiny", 32, 128, 2)
    recs = quant.run("cpu", min_time=0.01, case_list=[case], ref_elems=1 << 12,
                     extra_impls={"broken int4": (off_by_a_lot, quant.BOUNDS["int4"])},
                     only=["pyopt int4_weight_only W4", "broken int4"])
    by = {r["impl"]: r for r in recs}
    assert set(by) == {quant.BASELINE, "pyopt int4_weight_only W4", "broken int4"}
    broken = by["broken int4"]
    assert broken["status"] == "failed" and "relative error" in broken["reason"]
    assert "median_ms" not in broken and by["pyopt int4_weight_only W4"]["status"] == "ok"


def test_wrong_answer_is_reported_as_failed():
    def broken(ps):
        opt = torch.optim.AdamW(ps, fused=True)

        def step():
            opt.step()
            with torch.no_grad():
                ps[0].add_(1.0)   # a wrong result
        return step

    case = optim.Case("tiny", [100], torch.float32)
    recs = optim.run("cpu", min_time=0.01, case_list=[case], extra_impls={"broken": broken},
                     rmw_elems=1 << 12)
    by = {r["impl"]: r for r in recs}
    assert by["broken"]["status"] == "failed" and "wrong result" in by["broken"]["reason"]
    assert by["pyopt native"]["status"] == "ok" and "median_ms" not in by["broken"]


def _doc(results):
    return {"schema": report.SCHEMA, "results": results}


def _rec(case, ms, iqr=0.0, impl="pyopt native"):
    return {"suite": "optim", "device": "cpu", "case": case, "impl": impl, "status": "ok",
            "median_ms": ms, "iqr_ms": iqr}


def test_compare_and_regression_logic():
    old = _doc([_rec("a", 10.0, 0.2), _rec("b", 10.0, 0.2), _rec("c", 10.0, 4.0),
                _rec("gone", 1.0)])
    new = _doc([_rec("a", 10.5, 0.2), _rec("b", 12.0, 0.2), _rec("c", 12.0, 4.0),
                _rec("added", 1.0)])
    lines, regressions = report.compare(new, old, threshold=0.10)
    # a: 5% slower, within 10%; b: 20% slower beyond noise; c: 20% slower but within the
    # noise of two runs with a 4 ms IQR
    assert regressions == ["b / pyopt native (cpu)"]
    text = "\n".join(lines)
    assert "gone / pyopt native (cpu): only in the old run" in text
    assert "added / pyopt native (cpu): only in the new run" in text
    assert "new/old 1.20  REGRESSION" in text
    assert report.compare(new, old, threshold=None)[1] == []


def test_compare_cli_exit_status(tmp_path):
    old = tmp_path / "old.json"
    # every tiny case took 1 ns before: anything now is a regression
    recs = []
    for case in ("AdamW tiny", "SGD tiny", "AdamW+GradScaler tiny", "clip tiny"):
        for impl in ("pyopt native", "torch fused=True", "torch foreach=True"):
            recs.append(_rec(case, 1e-6, impl=impl))
    old.write_text(json.dumps(_doc(recs)))
    r = _bench("--min-time", "0.01", "--no-progress", "--compare", str(old),
               "--fail-if-regression", "0.1", env=TINY)
    assert r.returncode == 1 and "REGRESSION" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_peer_detection_reports_absent_peers():
    found = peers.detect("cpu")
    assert set(found) == set(peers.PEERS)
    for name, d in found.items():
        assert d["available"] or d["reason"], name
    if not found["deepspeed"]["available"]:
        case = optim.cases("cpu", quick=True)[0]
        factory, why = optim.impls("cpu", case)["deepspeed DeepSpeedCPUAdam"]
        assert factory is None and why == "not installed"
    r = _bench("--list")
    assert r.returncode == 0 and "peers:" in r.stdout and "apex" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["nosuchsuite"], "unknown suite 'nosuchsuite'"),
    (["--fail-if-regression", "0.1"], "--fail-if-regression needs --compare"),
    (["--compare", "/nonexistent.json"], "--compare"),
])
def test_bad_arguments_exit_with_a_message(args, msg):
    r = _bench(*args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    r = _bench("--device", "cuda")
    assert r.returncode == 2 and "no CUDA device" in r.stderr
