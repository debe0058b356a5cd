"""bench/bench_repeat.py: scoring two bench reports against the repeatability target (no timing)."""
import copy
import importlib.util
import io
import json
import pathlib
import sys

import pytest

from refimpl.timing.bench import SCHEMA

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_repeat.py"


@pytest.fixture(scope="module")
def br():
    spec = importlib.util.spec_from_file_location("bench_repeat_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _row(op, backend, ticks, cv=0.01):
    return {"op": op, "backend": backend, "shape": "64x768", "dtype": "float32", "cold": False,
            "median_ticks": ticks, "median_core_cycles": ticks * 1.4, "min_ticks": ticks * 0.95, "cv": cv, "flops": 1, "bytes": 1}


def _report(rows, readings=100, quiet=100):
    return {"schema": SCHEMA, "created": "2026-11-28T00:00:00+00:00", "passed": True, "results": rows,
            "machine": {"core_per_tsc": 1.4, "core_per_tsc_source": "core_add_chain probe (same rounds as the rows)"},
            "noise": {"timing_wall_s": 25.0, "other_cpus_busy": 0.01, "steal_s": 0.0,
                      "gate": {"readings": readings, "quiet_readings": quiet, "busy_over_quiet": 1.6}}}


BASE = [_row("softmax", "c", 200_000), _row("softmax", "numpy", 400_000), _row("rms_norm", "c", 14_000, cv=0.2)]


def test_identical_runs_meet_the_target(br):
    s = br.score(_report(BASE), _report(copy.deepcopy(BASE)))
    assert s["met"] and (s["covered"], s["within"], s["cv_ok"]) == (2, 2, 2)
    assert [r["covered"] for r in s["rows"]] == [True, True, False]   # 14k ticks: not covered, its CV ignored


@pytest.mark.parametrize("factor, within", [(1.029, True), (1.031, False), (0.969, False), (0.971, True)])
def test_median_agreement_is_three_percent(br, factor, within):
    b = copy.deepcopy(BASE)
    b[0]["median_ticks"] = 200_000 * factor
    s = br.score(_report(BASE), _report(b))
    assert s["rows"][0]["within"] is within and s["met"] is within
    assert s["rows"][0]["diff"] == pytest.approx(factor - 1)


def test_cv_above_two_percent_in_either_run_misses(br):
    b = copy.deepcopy(BASE)
    b[1]["cv"] = 0.021
    s = br.score(_report(BASE), _report(b))
    assert not s["met"] and s["cv_ok"] == 1 and s["within"] == 2
    assert not s["rows"][1]["cv_ok"]


def test_a_row_crossing_the_threshold_in_one_run_is_covered(br):
    b = copy.deepcopy(BASE)
    b[2]["median_ticks"] = 150_000           # 14k -> 150k: covered, and far off
    s = br.score(_report(BASE), _report(b))
    assert s["covered"] == 3 and not s["met"]


def test_a_covered_row_missing_from_one_run_fails(br):
    s = br.score(_report(BASE), _report(copy.deepcopy(BASE[1:])))
    assert not s["met"] and s["covered"] == 2 and s["within"] == 1
    assert s["missing"] == ["softmax/c 64x768: only in run A"]
    s = br.score(_report(BASE[:1] + BASE[2:]), _report(copy.deepcopy(BASE)))
    assert s["missing"] == ["softmax/numpy 64x768: only in run B"]


def test_no_covered_rows_is_not_met(br):
    small = [_row("rms_norm", "c", 14_000)]
    assert not br.score(_report(small), _report(copy.deepcopy(small)))["met"]


def test_core_cycles_are_scored_beside_ticks(br):
    """The host's core clock 20 % slower in run B: every row 1.2x the ticks at 1/1.2 the core/TSC."""
    b = copy.deepcopy(BASE)
    for r in b:
        r["median_ticks"] *= 1.2
    b[1]["median_core_cycles"] *= 1.05       # this row also moved in core cycles
    s = br.score(_report(BASE), _report(b))
    assert (s["within"], s["within_core"], s["met"]) == (0, 1, False)
    assert [r["within_core"] for r in s["rows"][:2]] == [True, False]
    assert s["rows"][1]["diff_core"] == pytest.approx(0.05)
    old = _report(BASE)
    old["machine"]["core_per_tsc_source"] = "calibration"      # a one-shot clock: no cycle verdicts
    s = br.score(old, _report(b))
    assert s["within_core"] == 0 and {r["diff_core"] for r in s["rows"]} == {None}


def test_host_reads_the_gate(br):
    h = br.host(_report(BASE, readings=200, quiet=50))
    assert h["busy_share"] == pytest.approx(0.75) and h["busy_over_quiet"] == 1.6
    assert br.host({"results": []})["busy_share"] is None        # a --no-gate run: nothing recorded


def test_main_exit_status_and_host_line(br, tmp_path, capsys):
    pa, pb, pc = (tmp_path / f"{x}.json" for x in "abc")
    pa.write_text(json.dumps(_report(BASE)))
    pb.write_text(json.dumps(_report(copy.deepcopy(BASE), readings=100, quiet=40)))
    assert br.main(["--reuse", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "repeatability target: MET (the host was not idle: busy for up to 60% " in out
    b = copy.deepcopy(BASE)
    b[1]["median_ticks"] = 500_000
    pc.write_text(json.dumps(_report(b)))
    assert br.main(["--reuse", str(pa), str(pc)]) == 1
    out = capsys.readouterr().out
    assert "repeatability target: NOT MET" in out and "medians within 3%: 1/2" in out
    assert [ln for ln in out.splitlines() if ln.startswith("softmax    64x768            numpy")][0].endswith("diff>3%")
    pc.write_text("{}")
    assert br.main(["--reuse", str(pa), str(pc)]) == 2
    assert "not a refimpl bench file" in capsys.readouterr().err


def test_misses_are_counted_by_the_level_the_data_sit_in(br):
    """Each covered row's miss (either half) is counted under its roofline level; the host line
    carries the L3-read probe's CV when the run recorded it."""
    a, b = copy.deepcopy(BASE), copy.deepcopy(BASE)
    for rows in (a, b):
        rows[0]["roofline_level"], rows[1]["roofline_level"], rows[2]["roofline_level"] = "L2", "L3", "L3"
    b[1]["cv"] = 0.03                                       # the L3 row misses; the 14k-tick one is not covered
    ra, rb = _report(a), _report(b)
    ra["noise"]["probes"] = {"l3_read": {"cv": 0.068}}
    s = br.score(ra, rb)
    assert s["by_level"] == {"L2": (0, 1), "L3": (1, 1)}
    out = io.StringIO()
    br.print_score(s, (br.host(ra), br.host(rb)), out=out)
    text = out.getvalue()
    assert "by the level their data sit in (the roofline's): L2 0/1, L3 1/1" in text
    assert "L3-read probe CV 6.8%" in text and "L3-read probe CV n/a" in text     # run B recorded none
    assert br.score(_report(BASE), _report(BASE))["by_level"] == {None: (0, 2)}  # files without the field


def test_page_faults_per_call_shown_beside_a_row(br):
    a, b = copy.deepcopy(BASE), copy.deepcopy(BASE)
    a[1]["faults_per_call"], b[1]["faults_per_call"] = 0.01, 60.0     # an output mapped again per call
    b[1]["median_ticks"] = 800_000
    a[0]["faults_per_call"] = b[0]["faults_per_call"] = 0.01
    s = br.score(_report(a), _report(b))
    assert (s["rows"][1]["faults_a"], s["rows"][1]["faults_b"]) == (0.01, 60.0)
    out = io.StringIO()
    br.print_score(s, (br.host(_report(a)), br.host(_report(b))), out=out)
    text = out.getvalue().splitlines()
    assert text[2].endswith("diff>3% (page faults/call 0.0 -> 60.0)")
    assert text[1].endswith(" -")                                   # a row without faults: nothing added
    assert br.score(_report(BASE), _report(BASE))["rows"][0]["faults_a"] is None   # files without the field
