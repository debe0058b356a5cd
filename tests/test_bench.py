"""`refimpl bench` / `refimpl profile`: verification gate, JSON schema, compare, smoke runs."""
import copy
import json
import re

import numpy as np
import pytest

from conftest import require
from refimpl.cli import main
from refimpl.timing import bench, profile


def test_parse_shapes():
    got = bench.parse_shapes("matmul:2x3x4, attention:8x2x16x32x64c,attention:1x1x1x4x8:causal,softmax:3x5")
    assert got == {"matmul": [((2, 3, 4), False)],
                   "attention": [((8, 2, 16, 32, 64), True), ((1, 1, 1, 4, 8), True)],
                   "softmax": [((3, 5), False)]}
    for bad, msg in (("matmul:2x3", "MxKxN"), ("nope:2", "op one of"), ("softmax:2xq", "integers"),
                     ("softmax:2x3c", "causal"), ("matmul:0x1x1", "positive"),
                     ("attention:3x2x4x4x8", "H=3 must be a multiple of key/value heads Hkv=2")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_shapes(bad)


def test_every_case_oracle_is_within_its_own_bound():
    """The numpy backend on float64 inputs is the oracle: bound ratio ~0 on every default op."""
    for op, shapes in bench.QUICK_SHAPES.items():
        for dims, causal in shapes:
            case = bench.Case(op, dims, causal, "float32")
            row = bench.verify(case, "numpy", bench._impl(op, "numpy"))
            assert row["passed"], row
            assert case.want.dtype == np.float64 and case.bound.shape == case.want.shape


def test_verification_gate_blocks_timing(monkeypatch):
    """A kernel that breaks its contract fails verification and nothing is timed."""
    from refimpl.kernels import registry
    registry.available()                          # load every backend first: nothing re-registers later
    good = registry.get("softmax", "numpy")
    bad = lambda x: good(x) * np.float32(1.001)   # noqa: E731  (0.1 % off: far outside the bound)
    monkeypatch.setitem(registry._REGISTRY, ("softmax", "numba"), bad)
    rep = bench.run(ops=["softmax"], backends=["numpy", "numba"], quick=True, progress=False)
    assert not rep["passed"] and rep["results"] == []
    assert [f["backend"] for f in rep["failed"]] == ["numba"]
    assert "ratio" in rep["failed"][0]["error"]
    assert main(["bench", "--quick", "--ops", "softmax", "--backends", "numpy,numba", "--no-progress"]) == 1


def test_a_kernel_right_at_the_timed_shapes_but_wrong_in_a_vector_tail_is_not_timed(monkeypatch):
    """The timed shapes are multiples of 64: a kernel whose remainder loop drops elements passes
    them, and the verifier's edge cases (rows of 201, 1031, the vector tails 19, 127, 199) stop
    the run."""
    from refimpl.kernels import registry
    registry.available()
    good = registry.get("silu", "numpy")

    def tail_unwritten(x):                     # 16-lane body right, the remainder left as zeros
        y = good(x)
        n = x.shape[-1]
        if n >= 16:
            y[..., n - n % 16:] = 0
        return y
    monkeypatch.setitem(registry._REGISTRY, ("silu", "numba"), tail_unwritten)
    rep = bench.run(ops=["silu"], backends=["numpy", "numba"], quick=True, progress=False)
    assert not rep["passed"] and rep["results"] == []
    shape_rows = [v for v in rep["verification"] if not v["shape"].startswith("edge cases")]
    assert shape_rows and all(v["passed"] for v in shape_rows)
    (f,) = rep["failed"]
    assert f["backend"] == "numba" and f["shape"].startswith("edge cases")
    assert f["error"].startswith("case 'grid -10..10' (x[201])")   # the first case with a tail
    edges = {v["backend"]: v for v in rep["verification"] if v["shape"].startswith("edge cases")}
    assert edges["numpy"]["passed"] and edges["numpy"]["bound_ratio"] <= 1


def test_case_inputs_sit_at_the_same_places_in_every_run():
    """The kernels' speed depends on where their inputs sit (mod 4 KiB, kernels.buffers): every
    Case lays them out the same way, away from the outputs' half-page offset."""
    for op, shapes in bench.DEFAULT_SHAPES.items():
        for dims, causal in shapes:
            args = bench.Case(op, dims, causal, "float32").args
            n = len(args)
            assert [a.ctypes.data % 4096 for a in args] == [i * 2048 // n // 64 * 64 for i in range(n)], op


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_case_bytes_covers_what_a_case_holds(dtype):
    """The estimate is at least the arrays a built Case keeps (inputs, answer, bound) plus
    their float64 copies, and grows with the shape."""
    for op, shapes in bench.DEFAULT_SHAPES.items():
        for dims, causal in shapes:
            case = bench.Case(op, dims, causal, dtype)
            held = sum(a.nbytes for a in case.args) + case.want.nbytes + case.bound.nbytes
            f64_copies = sum(a.size * 8 for a in case.args)
            est = bench.case_bytes(op, dims, dtype, causal)
            assert held + f64_copies <= est < 40 * held, (op, dims, est, held)
    assert bench.case_bytes("matmul", (512, 512, 512)) > 3.9 * bench.case_bytes("matmul", (256, 256, 256))


def test_run_refuses_shapes_that_do_not_fit_in_memory(monkeypatch):
    """Too large a shape is refused before anything is allocated, naming the case and the sizes."""
    shapes = bench.parse_shapes("matmul:100000x100000x100000")
    with pytest.raises(ValueError, match=r"matmul 100000x100000x100000 alone 5\d\d\.\d GiB.* GiB is available"):
        bench.run(shapes=shapes, backends=["numpy"], progress=False)
    monkeypatch.setattr(bench, "available_memory", lambda: 2**20)        # 1 MiB left
    with pytest.raises(ValueError, match=r"softmax 64x1024 alone 0\.0 GiB, float32\), but 0\.0 GiB is available"):
        bench.run(ops=["softmax"], backends=["numpy"], progress=False)
    assert main(["bench", "--ops", "softmax", "--backends", "numpy", "--no-progress"]) == 2
    monkeypatch.setattr(bench, "available_memory", lambda: None)          # unknown: no check
    bench.check_memory(bench.plan(["softmax"], ["numpy"]), "float32")


def test_unwritable_outputs_are_refused_before_the_run(tmp_path, capsys):
    """--json / --plot to a missing or read-only directory, or a directory itself, fail at once
    (exit 2, the option and path named), not after a minute of timing."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [(["--json", str(tmp_path / "no" / "r.json")], "--json .*does not exist"),
             (["--plot", str(tmp_path)], "--plot .*is a directory")]
    import os
    if os.geteuid() != 0:                         # root writes anywhere
        cases.append((["--json", str(ro / "r.json")], "--json .*is not writable"))
    for extra, msg in cases:
        assert main(["bench", "--quick", "--ops", "softmax", "--backends", "numpy", "--no-progress", *extra]) == 2
        out = capsys.readouterr().out
        assert re.search(msg, out.replace("\n", "")), out
        assert "kernel checks" not in out and "bandwidth" not in out     # nothing ran
    assert main(["profile", "--json", str(tmp_path / "no" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_row_uses_counted_core_cycles_when_the_pmu_counted_them(capsys):
    """With a hardware PMU a row's core cycles, FLOP/cycle and % of peak come from the counted
    cycles (and IPC is shown); without one they are estimated from the ticks, and say so."""
    import dataclasses

    from refimpl.timing import harness, machine
    mach = machine.describe()
    case = bench.Case("matmul", (16, 16, 16), False, "float32")
    m = harness.measure(harness.empty_ccall(), pmu=None, budget_s=0.01)
    m = dataclasses.replace(m, median=1000.0)
    est = bench._row(case, "c", m, mach, False)
    assert est["core_cycles_source"] == "estimate" and est["ipc"] is None and est["pmu_instructions"] is None
    assert est["median_core_cycles"] == pytest.approx(1000.0 * mach.core_per_tsc)
    hw = bench._row(case, "c", dataclasses.replace(m, pmu="hardware", pmu_cycles=2000.0, pmu_instructions=5000.0),
                    mach, False)
    assert hw["core_cycles_source"] == "pmu" and hw["median_core_cycles"] == 2000.0 and hw["ipc"] == 2.5
    assert hw["flop_per_core_cycle"] == pytest.approx(2 * 16 ** 3 / 2000.0)
    peak = mach.peak_flop_per_cycle["float32"]
    assert hw["pct_peak"] == pytest.approx(100 * 2 * 16 ** 3 / 2000.0 / peak)
    assert hw["flop_per_tick"] == est["flop_per_tick"]                    # ticks are ticks either way
    stand_in = bench._row(case, "c", dataclasses.replace(m, pmu="cpu-clock", pmu_cycles=7.0), mach, False)
    assert stand_in["core_cycles_source"] == "estimate"                   # ns are not core cycles
    rep = {"settings": {"dtype": "float32", "cold": False}, "machine": dataclasses.asdict(mach),
           "verification": [], "warnings": [], "passed": True, "results": [hw]}
    bench.print_report(rep, bench_console())
    out = capsys.readouterr().out
    assert "counted by the PMU" in out and "IPC" in out and "2.50" in out


def bench_console():
    from rich.console import Console
    return Console(width=250, force_terminal=False)


def test_verify_reports_crashes_and_wrong_dtype():
    case = bench.Case("softmax", (2, 8), False, "float32")
    def boom(x):
        raise RuntimeError("kaput")
    assert "kaput" in bench.verify(case, "numba", boom)["error"]
    r = bench.verify(case, "numba", lambda x: bench._impl("softmax", "numpy")(x).astype(np.float64))
    assert not r["passed"] and "dtype" in r["error"]


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "q.json"
    png = path.with_suffix(".png")
    # numpy and torch only: the C and Numba kernels have their own tests, and a bug in one of
    # them must fail those, not this smoke test of the harness
    plot = ["--plot", str(png)] if _have("matplotlib") else []
    assert main(["bench", "--quick", "--ops", "matmul,softmax,rms_norm", "--backends", "numpy,torch",
                 "--json", str(path), *plot, "--no-progress"]) == 0
    return path, png


def _have(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_roofline_labels_one_per_column():
    def row(op, backend, ai, y, shape="16x256"):
        return {"op": op, "backend": backend, "shape": shape, "intensity": ai, "flop_per_tick": y}
    rows = [row("matmul", b, 10.7, y, "64x64x64") for b, y in (("numpy", 30.0), ("c", 35.0), ("torch", 20.0))]
    rows += [row("silu", "c", 0.50, 5.0), row("rms_norm", "c", 0.48, 15.0), row("silu", "numpy", 0.50, 1.2),
             row("softmax", "c", 0.62, 7.0), row("gelu_tanh", "numba", 1.1, float("nan"))]
    labels = bench.roofline_labels(rows)
    assert labels == [(0.48, 15.0, "rms_norm 16x256\nsilu 16x256"),   # within 1.25x: one label, top point
                      (0.62, 7.0, "softmax 16x256"),
                      (10.7, 35.0, "matmul 64x64x64")]                   # three backends, one label; NaN row left out


def test_bench_roofline_plot(quick_json):
    require("matplotlib")
    png = quick_json[1]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_smoke_and_json_schema(quick_json):
    path, png = quick_json
    d = bench.read_json(str(path))
    assert d["schema"] == bench.SCHEMA and d["passed"]
    m = d["machine"]
    for k in ("cpu_model", "flags", "tsc_hz", "core_per_tsc", "blas", "peak_flop_per_cycle", "bandwidth"):
        assert k in m
    # the BLAS thread counts in force while timing (1), not those before the run's limit
    blas = [b for b in m["blas"] if b.get("user_api") == "blas"]
    assert blas and all(b["num_threads"] == 1 for b in blas), m["blas"]
    for k in d["settings"]:                        # every setting is in the schema's description
        assert f'"{k}"' in bench.__doc__.split("\nRound-robin timing\n")[0], k
    assert {r["op"] for r in d["results"]} == {"matmul", "softmax", "rms_norm"}
    assert {r["backend"] for r in d["results"]} == {"numpy"} | ({"torch"} if bench.torch_impl("matmul") else set())
    need = ("op", "backend", "shape", "dtype", "median_ticks", "min_ticks", "cv", "flops", "bytes",
            "median_core_cycles", "pct_peak", "roofline_bound", "vs_numpy", "unstable", "n", "reps")
    for r in d["results"]:
        for k in need:
            assert k in r, k
        assert r["min_ticks"] <= r["median_ticks"]
        assert r["faults_per_call"] is None or r["faults_per_call"] >= 0
        if r["backend"] == "numpy":
            assert r["vs_numpy"] == pytest.approx(1.0)
    assert all(v["passed"] for v in d["verification"] if v["backend"] != "torch")
    # round-robin timing: every row sampled in every round; the noise section describes the run
    assert d["settings"]["rounds"] == bench.QUICK_ROUNDS
    assert all(r["rounds"] == bench.QUICK_ROUNDS for r in d["results"])
    noise = d["noise"]
    for k in ("timing_wall_s", "cpu", "other_cpus_busy", "steal_s", "preempted", "migrations"):
        assert k in noise, k
    assert noise["timing_wall_s"] > 0 and noise["steal_s"] >= 0
    assert noise["other_cpus_busy"] is None or 0 <= noise["other_cpus_busy"] <= 1
    probes = noise["probes"]
    assert set(probes) == {"core_add_chain", "l3_read"}
    assert 5e8 < probes["core_add_chain"]["core_per_tsc"] * m["tsc_hz"] < 1e10    # a core clock of 0.5-10 GHz
    assert probes["l3_read"]["bytes_per_tick"] > 0
    for pr in probes.values():                      # per round, as a row's: one median per round it ran in
        assert len(pr["round_medians"]) == len(pr["round_kept"]) == bench.QUICK_ROUNDS
        assert min(pr["round_medians"]) <= pr["median_ticks"] <= max(pr["round_medians"])
    assert not any(r["op"].startswith("probe") for r in d["results"])     # probes are not rows
    assert bench.compare_probes(d, d) == {"core_add_chain": 1.0, "l3_read": 1.0}
    # round trip: what we write is what we read
    d2 = json.loads(json.dumps(d))
    bench.write_json(d2, str(path) + ".2")
    assert bench.read_json(str(path) + ".2") == d


def test_read_json_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a refimpl bench file"):
        bench.read_json(str(p))
    p.write_text('{"schema": "%s", "results": [{"op": "matmul"}]}' % bench.SCHEMA)
    with pytest.raises(ValueError, match="lacks"):
        bench.read_json(str(p))
    p.write_text('{"schema": "%s", "results": {"x": 1}}' % bench.SCHEMA)
    with pytest.raises(ValueError, match="x.json: results must be a list"):
        bench.read_json(str(p))
    p.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=r"x\.json: not UTF-8"):
        bench.read_json(str(p))
    # the numbers compare uses: a positive median, a cv >= 0, optional ones null or >= 0
    for field, value, msg in (("median_ticks", None, "median_ticks must be a finite number > 0, got None"),
                              ("median_ticks", 0, "> 0, got 0"), ("cv", -0.1, "cv must be .* >= 0"),
                              ("cv", "0.1", "cv must be"), ("mad_ticks", float("nan"), "mad_ticks .* or null"),
                              ("faults_per_call", -1, "faults_per_call")):
        d = _synthetic()
        d["results"][1][field] = value
        p.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=r"x\.json: results\[1\] \(matmul/numpy 8x8x8\): .*" + msg):
            bench.read_json(str(p))


def _synthetic(cv=0.01):
    row = {"op": "matmul", "backend": "c", "shape": "8x8x8", "dtype": "float32", "cold": False,
           "median_ticks": 1e6, "min_ticks": 0.98e6, "mad_ticks": cv * 1e6 / 1.4826, "cv": cv,
           "flops": 1024, "bytes": 768}
    return {"schema": bench.SCHEMA, "results": [row, dict(row, backend="numpy")]}


def test_compare_flags_a_2x_regression_not_a_1pct_change(tmp_path):
    old = _synthetic()
    new = copy.deepcopy(old)
    new["results"][0]["median_ticks"] *= 2.0       # c: 2x slower
    new["results"][1]["median_ticks"] *= 1.01      # numpy: 1 % slower
    rows = {r["backend"]: r for r in bench.compare(old, new)}
    assert rows["c"]["verdict"] == "regression" and rows["c"]["ratio"] == pytest.approx(2.0)
    assert rows["numpy"]["verdict"] == "same"
    # a noisy row's own noise widens its threshold: 1.3x inside 3 sigma of 10 % CV rows
    noisy_old, noisy_new = _synthetic(cv=0.10), _synthetic(cv=0.10)
    noisy_new["results"][0]["median_ticks"] *= 1.3
    assert bench.compare(noisy_old, noisy_new)[0]["verdict"] == "same"
    # the machine probes' ratios are reported beside the rows (a run-wide shift), never a verdict
    for d, f in ((old, 1.0), (new, 1.25)):
        d["noise"] = {"probes": {"l3_read": {"median_ticks": 1e6 * f}, "core_add_chain": {"median_ticks": 5e4}}}
    assert bench.compare_probes(old, new) == pytest.approx({"l3_read": 1.25, "core_add_chain": 1.0})
    assert bench.compare_probes(old, _synthetic()) == {}
    faster = copy.deepcopy(old)
    faster["results"][0]["median_ticks"] /= 2
    assert bench.compare(old, faster)[0]["verdict"] == "improvement"
    # through the CLI: exit status 1 on a regression, 0 otherwise
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    assert main(["bench", "compare", str(po), str(pn)]) == 1
    assert main(["bench", "compare", str(po), str(po)]) == 0
    assert main(["bench", "compare", str(po), str(tmp_path / "missing.json")]) == 2


def _cli_compare(tmp_path, capsys, old, new, *opts, pre=()):
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    for p, d in ((po, old), (pn, new)):
        p.write_bytes(d) if isinstance(d, bytes) else p.write_text(json.dumps(d))
    rc = main(["bench", *pre, "compare", str(po), str(pn), *opts])
    return rc, " ".join(capsys.readouterr().out.split())


def test_compare_refuses_failed_or_unmatched_runs(tmp_path, capsys):
    """A run that failed verification, or two runs without a common row, are bad input (2), never
    "no regression" (0)."""
    old = dict(_synthetic(), passed=True)
    failed = dict(old, passed=False, results=[])
    rc, out = _cli_compare(tmp_path, capsys, old, failed)
    assert rc == 2 and "new.json: that run failed verification (passed: false)" in out
    rc, out = _cli_compare(tmp_path, capsys, failed, old)
    assert rc == 2 and "old.json: that run failed verification" in out
    other = copy.deepcopy(old)
    for r in other["results"]:
        r["shape"] = "16x16x16"
    rc, out = _cli_compare(tmp_path, capsys, old, other)
    assert rc == 2 and "no rows match between" in out and "(2 rows)" in out
    rc, out = _cli_compare(tmp_path, capsys, old, dict(old, results=[]))
    assert rc == 2 and "no rows match" in out


def test_compare_lists_rows_of_one_run_only(tmp_path, capsys):
    """A row of OLD missing from NEW is a failure (1: it can no longer show a regression); a row
    only in NEW is listed and passes."""
    full, part = _synthetic(), _synthetic()
    part["results"] = part["results"][:1]
    rc, out = _cli_compare(tmp_path, capsys, full, part)
    assert rc == 1 and "1 row(s) of" in out and "missing from" in out and "matmul/numpy 8x8x8 float32" in out
    rc, out = _cli_compare(tmp_path, capsys, part, full)
    assert rc == 0 and "1 row(s) only in" in out and "matmul/numpy 8x8x8 float32" in out
    assert bench.unmatched(full, part) == (["matmul/numpy 8x8x8 float32"], [])
    rc, out = _cli_compare(tmp_path, capsys, full, full)
    assert rc == 0 and "missing" not in out and "only in" not in out


def test_compare_warns_when_settings_differ(tmp_path, capsys):
    old, new = _synthetic(), _synthetic()
    old["settings"] = {"dtype": "float32", "cold": False, "quick": False, "rounds": 40}
    new["settings"] = dict(old["settings"], quick=True, rounds=2)
    assert bench.settings_differences(old, new) == ["quick False -> True"]     # rounds: not warned
    rc, out = _cli_compare(tmp_path, capsys, old, new)
    assert rc == 0 and "warning: the runs differ in settings: quick False -> True" in out
    rc, out = _cli_compare(tmp_path, capsys, old, old)
    assert "warning" not in out


def test_compare_bad_input_exits_2_never_1(tmp_path, capsys, monkeypatch):
    """Bad files, negative thresholds, run options before `compare` and unforeseen errors: exit 2,
    which `refimpl bench compare` keeps apart from 1 (a regression)."""
    old = _synthetic()
    nulled = copy.deepcopy(old)
    nulled["results"][0]["median_ticks"] = None
    rc, out = _cli_compare(tmp_path, capsys, old, nulled)
    assert rc == 2 and "new.json: results[0] (matmul/c 8x8x8): median_ticks" in out
    rc, out = _cli_compare(tmp_path, capsys, old, b"\xff\xfe{}")
    assert rc == 2 and "new.json: not UTF-8" in out
    for opt in ("--sigmas", "--min-change"):
        rc, out = _cli_compare(tmp_path, capsys, old, old, opt, "-0.5")
        assert rc == 2 and f"{opt} must be a number >= 0, got -0.5" in out
        with pytest.raises(ValueError, match=opt):
            bench.compare(old, old, **{opt[2:].replace("-", "_"): -0.5})
    rc, out = _cli_compare(tmp_path, capsys, old, old, pre=("--json", str(tmp_path / "x.json"), "--quick"))
    assert rc == 2 and "option(s) of a bench run, not of `refimpl bench compare`" in out
    assert "--json" in out and "--quick" in out
    monkeypatch.setattr(bench, "compare", lambda *a, **k: 1 / 0)
    rc, out = _cli_compare(tmp_path, capsys, old, old)
    assert rc == 2 and "ZeroDivisionError" in out


def test_compare_shows_page_faults_that_moved(capsys):
    from rich.console import Console
    old, new = _synthetic(), _synthetic()
    for d, f in ((old, 0.01), (new, 60.0)):
        d["results"][0]["faults_per_call"] = f
    old["results"][1]["faults_per_call"] = new["results"][1]["faults_per_call"] = 0.01
    rows = bench.compare(old, new)
    assert [(r["old_faults"], r["new_faults"]) for r in rows] == [(0.01, 60.0), (0.01, 0.01)]
    bench.print_compare(rows, Console(width=300))
    out = capsys.readouterr().out
    assert "page faults per call, old -> new: matmul/c 8x8x8 0.0 -> 60.0 (" in out and "matmul/numpy" not in out.split(
        "page faults")[1]
    bench.print_compare(bench.compare(_synthetic(), _synthetic()), Console(width=300))   # no field: no line
    assert "page faults" not in capsys.readouterr().out


def test_compare_separates_a_run_wide_shift_from_one_row():
    """Every row 20 % slower (the host) and one row 2x: the raw verdicts flag all of them, the
    verdicts against the run-wide shift flag only the one that moved against the others."""
    rows = [dict(_synthetic()["results"][0], shape=f"{n}x{n}x{n}") for n in (8, 16, 32, 64, 128, 256)]
    old = {"schema": bench.SCHEMA, "results": rows}
    new = copy.deepcopy(old)
    for r in new["results"]:
        r["median_ticks"] *= 1.2
    new["results"][2]["median_ticks"] *= 2.0
    out = bench.compare(old, new)
    assert bench.run_shift(out) == {"ratio": pytest.approx(1.2), "n": 6, "slower": 6, "faster": 0}
    assert [r["verdict"] for r in out] == ["regression"] * 6
    assert [r["verdict_vs_shift"] for r in out] == ["same", "same", "regression", "same", "same", "same"]
    assert out[2]["vs_shift"] == pytest.approx(2.0)
    # too few rows for a median: no shift, no second verdict
    few = bench.compare({"schema": bench.SCHEMA, "results": rows[:3]}, {"schema": bench.SCHEMA,
                                                                       "results": new["results"][:3]})
    assert bench.run_shift(few) is None and {r["vs_shift"] for r in few} == {None}


def test_compare_judges_core_cycles_when_both_runs_measured_their_clock(tmp_path, capsys):
    """The host's core clock 20 % slower in the new run: every row 1.2x the ticks at the same core
    cycles, and one row also 2x in core cycles (the code).  Only that row regresses in cycles."""
    old = _synthetic()
    for r in old["results"]:
        r["median_core_cycles"] = r["median_ticks"] * 1.4
    new = copy.deepcopy(old)
    for r in new["results"]:
        r["median_ticks"] *= 1.2
    new["results"][1]["median_ticks"] *= 2.0
    new["results"][1]["median_core_cycles"] *= 2.0
    assert [r["core_ratio"] for r in bench.compare(old, new)] == [None, None]      # calibration only
    for d in (old, new):
        d["machine"] = {"core_per_tsc_source": "core_add_chain probe (same rounds as the rows)"}
    out = bench.compare(old, new)
    assert [r["verdict"] for r in out] == ["regression", "regression"]
    assert [r["verdict_core"] for r in out] == ["same", "regression"]
    assert [r["core_ratio"] for r in out] == pytest.approx([1.0, 2.0])
    po, pn = tmp_path / "old.json", tmp_path / "new.json"
    po.write_text(json.dumps(old))
    pn.write_text(json.dumps(new))
    assert main(["bench", "compare", str(po), str(pn)]) == 1        # the exit status follows ticks
    assert "in estimated core cycles (each run's ticks x the core/TSC measured beside its rows): " \
           "1 regression(s)" in " ".join(capsys.readouterr().out.split())


def test_bench_quiet_gate_reports_what_it_left_out():
    rep = bench.run(ops=["softmax"], backends=["numpy", "c"], quick=True, progress=False, rounds=6)
    assert rep["settings"]["gate"] is True
    g = rep["noise"]["gate"]
    assert g["readings"] == 2 * 6 + 2 * 6 + g["extra_visits"] + 1      # 2 rows + 2 machine probes, 6 rounds
    assert 0 < g["quiet_readings"] <= g["readings"] and g["level_ticks"] > 0
    for r in rep["results"]:
        assert len(r["round_kept"]) == r["rounds"] >= 6 and len(r["round_medians"]) == r["rounds"]
        assert r["quiet_rounds"] is not None and r["median_all_ticks"] > 0 and r["cv_all"] >= 0
        assert sum(r["round_kept"]) >= 3
    off = bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False, rounds=6, gate=False)
    assert off["settings"]["gate"] is False and "gate" not in off["noise"]
    assert off["results"][0]["quiet_rounds"] is None and all(off["results"][0]["round_kept"])
    # too few rounds for a gate (quick: 2): off, whatever was asked
    assert bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False)["settings"]["gate"] is False


def _chain_probe(monkeypatch, factor):
    """The core_add_chain probe timed with `factor` x its adds: it reads core/TSC / factor."""
    from refimpl.timing.harness import add_chain_ccall
    probes = bench.machine_probes
    monkeypatch.setattr(bench, "machine_probes", lambda: [
        ("core_add_chain", add_chain_ccall(int(factor * bench.PROBE_ADDS)))] + probes()[1:])


def test_core_cycles_use_the_add_chain_timed_beside_the_rows(monkeypatch):
    _chain_probe(monkeypatch, 1.5)
    before = bench.core_per_tsc_now()
    rep = bench.run(ops=["softmax"], backends=["numpy", "c"], quick=True, progress=False)
    after = bench.core_per_tsc_now()
    m, probe = rep["machine"], rep["noise"]["probes"]["core_add_chain"]
    cpt = probe["core_per_tsc"]
    assert m["core_per_tsc_source"].startswith("core_add_chain") and m["core_per_tsc"] == cpt
    assert cpt == pytest.approx(bench.PROBE_ADDS / probe["median_ticks"])
    # the probe, timed with 1.5x its adds, reads 1/1.5 of the core clock.  Against the clock
    # read right before and right after the run (within 20 % of either): this host's core
    # clock moves by up to 24 % within seconds (calibrated 1.13, probe 1.40 x 1/1.5 in one
    # CI run; probe 1.34 x 1/1.5, read 0.99 right after, in another), so one reading taken
    # outside the run can miss what the run saw
    assert any(cpt == pytest.approx(c / 1.5, rel=0.2) for c in (before, after)), (cpt * 1.5, before, after)
    for r in rep["results"]:
        assert r["median_core_cycles"] == pytest.approx(r["median_ticks"] * cpt)
        assert r["flop_per_core_cycle"] == pytest.approx(r["flops"] / r["median_core_cycles"])
        assert r["pct_peak"] == pytest.approx(
            100 * r["flop_per_core_cycle"] / m["peak_flop_per_cycle"]["float32"])
    assert not any("core/TSC" in w for w in rep["warnings"])


def test_core_cycles_keep_the_calibration_when_the_probe_is_implausible(monkeypatch):
    _chain_probe(monkeypatch, 8)          # reads 1/8 of the clock: a broken probe, not a clock
    rep = bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False)
    m = rep["machine"]
    assert m["core_per_tsc_source"] == "calibration" and m["core_per_tsc"] == m["core_per_tsc_calibrated"]
    assert [r["median_core_cycles"] for r in rep["results"]] == pytest.approx(
        [r["median_ticks"] * m["core_per_tsc"] for r in rep["results"]])
    assert any("more than 2x away from the calibration" in w for w in rep["warnings"])


def test_bench_rounds_option():
    rep = bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False, rounds=3)
    assert rep["settings"]["rounds"] == 3 and [r["rounds"] for r in rep["results"]] == [3]
    one = bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False, rounds=1)
    assert [r["rounds"] for r in one["results"]] == [1]
    with pytest.raises(ValueError, match="rounds"):
        bench.run(ops=["softmax"], backends=["numpy"], quick=True, progress=False, rounds=0)
    assert main(["bench", "--quick", "--ops", "softmax", "--backends", "numpy", "--rounds", "0",
                 "--no-progress"]) == 2


def test_plot_formats_are_checked_before_the_run_and_written_where_named(tmp_path, capsys):
    """A .txt --plot failed in savefig after the whole run, losing the table; an extension-less
    one was written as NAME.png while 'wrote NAME' was printed."""
    require("matplotlib")
    argv = ["--quick", "--ops", "softmax", "--backends", "numpy", "--no-progress"]
    for cmd in (["bench", *argv], ["profile", "--backends", "numpy", "--decode", "1", "--repeats", "1"]):
        assert main([*cmd, "--plot", str(tmp_path / "x.txt")]) == 2
        out = capsys.readouterr().out
        assert "matplotlib cannot write .txt files" in out and "kernel checks" not in out
    assert main(["bench", *argv, "--plot", str(tmp_path / "noext")]) == 0
    assert (tmp_path / "noext").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "noext.png").exists()
    assert main(["bench", *argv, "--plot", str(tmp_path / "r.svg")]) == 0
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")


def test_a_run_left_with_nothing_to_time_is_an_error(tmp_path, capsys):
    """--dtype float64 on the C backend (float32 only): every kernel dropped at verification; the run
    exited 0 with an empty table, wrote no plot and a JSON that compare refused."""
    out = tmp_path / "r.json"
    assert main(["bench", "--dtype", "float64", "--backends", "c", "--ops", "softmax", "--quick",
                 "--no-progress", "--json", str(out)]) == 2
    text = capsys.readouterr().out
    assert "nothing left to time" in text and "c softmax: does not support float64" in text
    assert not out.exists()


def test_max_samples_is_an_upper_limit(capsys):
    """--max-samples 20 with 40 rounds kept 40 samples (one a round at least)."""
    with pytest.raises(ValueError, match=r"--max-samples must be an integer >= 40 .*--rounds 40"):
        bench.run(ops=["softmax"], backends=["c"], shapes=bench.parse_shapes("softmax:16x256"), progress=False,
                  max_samples=20)
    rep = bench.run(ops=["softmax"], backends=["c"], shapes=bench.parse_shapes("softmax:16x256"), progress=False,
                    rounds=8, max_samples=16, budget_s=0.2, gate=True)
    assert rep["results"][0]["n"] <= 16
    from refimpl.timing import harness
    with pytest.raises(ValueError, match="max_samples=7 cannot hold"):
        harness.measure_interleaved(_two_empty_targets(), rounds=8, max_samples=7, min_samples=2)
    gated = harness.QuietProbe()
    ms = harness.measure_interleaved(_two_empty_targets(), rounds=6, max_samples=12, min_samples=2,
                                     budget_s=0.05, gate=gated, gate_extra_s=0.05)
    assert all(len(m.samples) <= 12 for m in ms)


def _two_empty_targets():
    return [(lambda: None, (), {}, f"t{i}") for i in range(2)]


def test_the_gate_says_when_it_is_off(capsys):
    argv = ["bench", "--ops", "softmax", "--backends", "c", "--budget", "0.02", "--no-progress"]
    assert main([*argv, "--rounds", "5"]) == 0
    out = capsys.readouterr().out
    assert "quiet gate: off, every round kept (it needs --rounds >= 6" in out and "5 rounds of" in out
    assert main([*argv, "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "each row in one block of 0.02 s" in out and "round-robin" not in out
    assert main([*argv, "--rounds", "5", "--no-gate"]) == 0
    assert "quiet gate" not in capsys.readouterr().out


def test_repeated_shapes_and_backends_are_named_or_run_once(capsys):
    assert main(["bench", "--shapes", "softmax:16x256,softmax:16x256", "--no-progress"]) == 2
    assert "'softmax:16x256' is named twice" in capsys.readouterr().out
    assert main(["bench", "--budget", "inf", "--ops", "softmax", "--no-progress"]) == 2
    assert "--budget must be a finite number" in capsys.readouterr().out
    assert main(["profile", "--backends", ","]) == 2
    assert "--backends: none given" in capsys.readouterr().out
    rep = profile.run(backends=["numpy", "numpy"], prompt_len=2, decode=1, repeats=1)
    assert list(rep["backends"]) == ["numpy"]


def test_bench_rejects_bad_options():
    assert main(["bench", "--ops", "nope", "--no-progress"]) == 2
    assert main(["bench", "--backends", "fortran", "--no-progress"]) == 2
    assert main(["bench", "--shapes", "matmul:1x2", "--no-progress"]) == 2


def test_mismatched_options_are_refused_not_an_empty_run(monkeypatch, capsys):
    """--ops and --shapes naming different ops, --shapes naming nothing, or no backend with a kernel
    for the ops: an error naming the op (exit 2), not a run that times nothing and passes."""
    mm = bench.parse_shapes("matmul:8x8x8")
    with pytest.raises(ValueError, match=r"--shapes: matmul not in --ops softmax"):
        bench.plan(["softmax"], ["numpy"], mm)
    with pytest.raises(ValueError, match=r"--ops: softmax has no shape in --shapes .* softmax:RxN"):
        bench.plan(["matmul", "softmax"], ["numpy"], mm)
    assert [j[0] for j in bench.plan(None, ["numpy"], mm)] == ["matmul"]     # the ops of --shapes
    with pytest.raises(ValueError, match="names no shape"):
        bench.parse_shapes(" , ")
    with pytest.raises(ValueError, match="--ops: none given"):
        bench.plan([], ["numpy"])
    for argv, msg in ((["--ops", "softmax", "--shapes", "matmul:64x64x64"], "matmul not in --ops"),
                      (["--shapes", ","], "names no shape"), (["--shapes", ""], "names no shape")):
        assert main(["bench", "--quick", "--no-progress", *argv]) == 2
        assert msg in capsys.readouterr().out
    monkeypatch.setattr(bench, "torch_impl", lambda op: None)                # torch not installed
    with pytest.raises(ValueError, match=r"nothing to time: no backend of torch has a kernel for softmax "
                                         r"\(torch is not installed\)"):
        bench.plan(["softmax"], ["torch"])
    assert main(["bench", "--quick", "--ops", "softmax", "--backends", "torch", "--no-progress"]) == 2
    assert [j[3] for j in bench.plan(["softmax"], ["numpy", "torch"], quick=True)] == [["numpy"]]


@pytest.mark.parametrize("op", ["matmul", "softmax", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu",
                                "rope"])
def test_every_torch_peer_passes_the_verifiers_edge_cases(op):
    """The peers are ratios' denominators: one that computes something else must not be timed.
    The torch RoPE took `interleaved` and always rotated half-split pairs (bench dropped it,
    with a warning, once the verifier tried interleaved=True)."""
    require("torch")
    row = bench.verify_edges(op, "torch", bench.torch_impl(op), "float32")
    assert row["passed"], row["error"]


# ------------------------------------------------------------------ profile


def test_trace_names_map_to_stages():
    from refimpl.oracle.model import tiny_model
    names = []
    m = tiny_model(dtype="float32")
    m.forward(np.arange(3), trace=lambda n, a: names.append(n))
    assert names[0] == "embed" and names[-1] == "logits"
    assert {profile.stage_of(n) for n in names} <= set(profile.STAGES)


def test_analytic_model_counts():
    from refimpl.oracle.model import tiny_config
    cfg = tiny_config("llama")
    w = profile.analytic(cfg, T=1, S=5)
    assert w["lm_head"][0] == 2 * cfg.d_model * cfg.vocab_size
    D, F, Hkv, Dh = cfg.d_model, cfg.d_ff, cfg.n_kv_heads, cfg.head_dim
    assert w["ffn"][1] >= cfg.n_layers * 3 * D * F * 4          # every FFN weight read once
    assert w["attention"][1] >= cfg.n_layers * 2 * Hkv * Dh * 5 * 4   # the KV cache read


@pytest.mark.parametrize("arch", ["llama", "gpt2", "classic"])
def test_analytic_norms_and_activation_follow_the_model(arch):
    """Each norm is bench's formula (metrics.work; RMSNorm's bytes were charged as LayerNorm's, 33 %
    too many at decode), pre-norm models have 2 a layer and a final one; the classic post-norm
    model's norms close the attention and FFN spans, so they are counted there (its norms stage
    had 5 norms' work and none of their time), and its ReLU is 1 FLOP a unit (was GELU's 9)."""
    from refimpl.oracle.model import tiny_config
    from refimpl.timing.metrics import work
    cfg = tiny_config(arch)
    T, S, D, F, NL = 3, 7, cfg.d_model, cfg.d_ff, cfg.n_layers
    one = work("rms_norm" if arch == "llama" else "layer_norm", (T, D))
    w = profile.analytic(cfg, T=T, S=S)
    if arch == "classic":
        assert w["norms"] == (0, 0)
        bare = profile.analytic(tiny_config("gpt2", d_model=D, d_ff=F, n_layers=NL, n_heads=cfg.n_heads,
                                            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len), T=T, S=S)
        # the same shapes as a GPT-2 but for the post-norm, ReLU (1 vs 9 FLOPs) and no learned positions
        assert w["ffn"][0] == bare["ffn"][0] - NL * 8 * T * F + NL * one.flops
        assert w["ffn"][1] == bare["ffn"][1] + NL * one.bytes
        assert w["attention"] == (bare["attention"][0] + NL * one.flops, bare["attention"][1] + NL * one.bytes)
    else:
        assert w["norms"] == ((2 * NL + 1) * one.flops, (2 * NL + 1) * one.bytes)
    if arch == "llama":
        assert one.bytes == (2 * T * D + D) * 4


def test_profile_smoke(tmp_path):
    rep = profile.run(backends=["numpy"], prompt_len=4, decode=2, repeats=1)
    rows = {r["stage"]: r for r in rep["backends"]["numpy"]["decode"]}
    assert set(profile.STAGES) <= set(rows)
    total = rows.pop("total")
    assert total["ticks"] == pytest.approx(sum(r["ticks"] for r in rows.values() if r["summed"]))
    assert all(r["ticks"] > 0 for r in rows.values())
    assert total["roofline_ticks"] > 0
    d = rep["backends"]["numpy"]           # core cycles at the core clock measured around the runs
    assert d["core_per_tsc_source"].startswith("add chain timed before and after")
    assert all(r["core_cycles"] == pytest.approx(r["ticks"] * d["core_per_tsc"]) for r in rows.values())
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    plot = ["--plot", str(png)] if _have("matplotlib") else []
    assert main(["profile", "--backends", "numpy", "--prompt-len", "4", "--decode", "2", "--repeats", "1",
                 "--json", str(out), *plot]) == 0
    assert json.loads(out.read_text())["schema"] == "refimpl.profile/1"
    require("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["profile", "--prompt-len", "200", "--backends", "numpy"]) == 2


def test_single_threaded_after_every_backend_loaded():
    """numba's threading layer must not undo torch's thread limit (it did: torch ran 2 threads, 90x slower)."""
    bench.plan(["silu"], None)              # loads numba / C backends like a real run
    with bench._Threads() as t:
        from threadpoolctl import threadpool_info
        assert all(d["num_threads"] == 1 for d in threadpool_info() if d["user_api"] == "blas")
        if t._st._torch:
            assert t._st._torch[0].get_num_threads() == 1


def test_float64_refusal_is_skipped_not_failed(monkeypatch):
    """A fast backend may refuse float64 with a TypeError naming the dtype: warned, not timed, no failure."""
    from refimpl.kernels import registry
    registry.available()

    def f32_only(x):
        if x.dtype != np.float32:
            raise TypeError(f"argument 'x' has dtype {x.dtype}: float32 only")
        return registry.get("softmax", "numpy")(x)
    monkeypatch.setitem(registry._REGISTRY, ("softmax", "numba"), f32_only)
    rep = bench.run(ops=["softmax"], backends=["numpy", "numba"], dtype="float64", quick=True, progress=False)
    assert rep["passed"] and [r["backend"] for r in rep["results"]] == ["numpy"]
    assert any("does not support float64" in w for w in rep["warnings"])
    # the same refusal of float32 inputs is a failure
    monkeypatch.setitem(registry._REGISTRY, ("softmax", "numba"), lambda x: f32_only(x.astype(np.float64)))
    rep = bench.run(ops=["softmax"], backends=["numpy", "numba"], quick=True, progress=False)
    assert not rep["passed"] and rep["results"] == []


def test_float64_output_of_the_wrong_dtype_fails_verification(monkeypatch):
    """A kernel that takes float64 inputs but returns float32 is wrong, not a refusal: the run fails
    verification and times nothing (it passed, with the backend dropped, before)."""
    from refimpl.kernels import registry
    registry.available()
    good = registry.get("softmax", "numpy")
    monkeypatch.setitem(registry._REGISTRY, ("softmax", "numba"), lambda x: good(x.astype(np.float32)))
    rep = bench.run(ops=["softmax"], backends=["numpy", "numba"], dtype="float64", quick=True, progress=False)
    assert not rep["passed"] and rep["results"] == []
    (f,) = rep["failed"]
    assert f["backend"] == "numba" and "unsupported" not in f
    assert f["error"] == "call returned dtype float32, expected float64"
    # a TypeError from the call that does not name float64 is a crash, not a refusal
    case = bench.Case("softmax", (2, 8), False, "float64")
    def crash(x):
        raise TypeError("unsupported operand for dtype object")
    row = bench.verify(case, "c", crash)
    assert not row["passed"] and "unsupported" not in row and "dtype object" in row["error"]


def test_report_worst_bound_ratio_is_over_passed_checks(capsys):
    """The header's worst bound ratio is over the checks that passed; the dropped ones (a failed
    optional torch peer, a float64 refusal) are listed apart."""
    import dataclasses

    from refimpl.timing import machine
    ver = [{"op": "softmax", "backend": "numpy", "shape": "16x256", "dtype": "float64", "passed": True,
            "bound_ratio": 0.25, "error": None},
           {"op": "softmax", "backend": "torch", "shape": "16x256", "dtype": "float64", "passed": False,
            "bound_ratio": 7.5, "error": "ratio 7.5"},
           {"op": "softmax", "backend": "c", "shape": "16x256", "dtype": "float64", "passed": False,
            "bound_ratio": None, "error": "TypeError: float64", "unsupported": "float64"}]
    rep = {"settings": {"dtype": "float64", "cold": False}, "machine": dataclasses.asdict(machine.describe()),
           "verification": ver, "warnings": [], "passed": True, "results": []}
    bench.print_report(rep, bench_console())
    out = " ".join(capsys.readouterr().out.split())
    assert "1 kernel checks passed against the float64 oracle (worst bound ratio 0.25); 2 dropped, not " \
           "timed: softmax/torch 16x256 (failed; an optional peer), softmax/c 16x256 (refuses float64)" in out
    assert "all 1" not in out and "7.5" not in out


def test_prepare_of_finds_the_c_timing_entry(monkeypatch):
    import sys
    import types
    mod = types.ModuleType("refimpl.kernels.c_fake_matmul")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)

    def matmul(a, b):
        return a @ b
    matmul.__module__ = mod.__name__
    assert bench.prepare_of(matmul, "matmul") is None
    mod.prepare = lambda a, b: "module prepare"
    assert bench.prepare_of(matmul, "matmul") is mod.prepare
    assert bench.prepare_of(matmul, "softmax") is None          # not that module's op
    mod.prepare_matmul = lambda a, b: "named prepare"
    assert bench.prepare_of(matmul, "matmul") is mod.prepare_matmul
    matmul.prepare = lambda a, b: "attribute"
    assert bench.prepare_of(matmul, "matmul") is matmul.prepare


def test_a_report_that_cannot_be_written_is_exit_2_after_the_table(capsys):
    """--json passes the up-front checks (its directory exists and is writable) but the write
    fails (a full disk): the table is still printed, then an error naming the file, exit 2."""
    import os
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    assert main(["bench", "--quick", "--ops", "silu", "--backends", "numpy", "--no-progress",
                 "--json", "/dev/full"]) == 2
    out = capsys.readouterr().out
    assert "silu" in out and "error:" in out and "No space left on device" in out


def test_edge_cases_check_a_c_kernels_prepared_call_too(monkeypatch):
    """The timing loop calls a C kernel through `prepare(...).run()`: the edge cases check that
    entry point as well as the direct call (a prepared call wrong only in its tail is caught)."""
    from refimpl.kernels import registry
    good = registry.get("silu", "numpy")

    class TailUnwritten:                      # a prepared call whose 16-lane remainder is left 0
        def __init__(self, x):
            self.x = x

        def run(self):
            n = self.x.shape[-1]
            self.out = good(self.x)
            if n >= 16:
                self.out[..., n - n % 16:] = 0
    c_silu = registry.get("silu", "c")
    assert bench.prepare_of(c_silu, "silu") is not None and bench.verify_edges("silu", "c", c_silu, "float32")["passed"]
    monkeypatch.setattr(bench, "prepare_of", lambda fn, op: TailUnwritten)
    row = bench.verify_edges("silu", "c", c_silu, "float32")
    assert not row["passed"] and row["error"].startswith("prepare().run(): case 'grid -10..10'"), row
