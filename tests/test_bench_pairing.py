"""bench/bench_kernels.py: the paired, interleaved ratio estimator (no timing: synthetic samples)."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bk():
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_ratio_summary_statistics(bk):
    s = bk.ratio_summary([3.0, 1.0, 2.0, 5.0, 4.0], target=2.5)
    assert s["ratio"] == 3.0 and s["ratio_min"] == 1.0 and s["ratio_max"] == 5.0
    assert (s["ratio_q1"], s["ratio_q3"]) == (2.0, 4.0)       # linear-interpolated quartiles of 1..5
    assert s["ratio_iqr_rel"] == pytest.approx(2.0 / 3.0)
    assert s["ratio_unstable"] and s["ratio_borderline"]
    assert s["round_ratios"] == [3.0, 1.0, 2.0, 5.0, 4.0]     # round order kept


def test_ratio_summary_flags(bk):
    tight = [1.50, 1.52, 1.49, 1.51, 1.50, 1.53, 1.48]
    s = bk.ratio_summary(tight, target=1.2)
    assert not s["ratio_unstable"] and not s["ratio_borderline"] and s["ratio"] == 1.50
    assert bk.ratio_summary(tight, target=1.505)["ratio_borderline"]        # target inside the IQR
    wide = [1.0, 1.2, 1.4, 1.6, 1.8]                                         # IQR 0.4 / 1.4 > 10 %
    assert bk.ratio_summary(wide, target=0.5)["ratio_unstable"]
    assert not bk.ratio_summary(tight)["ratio_borderline"]                   # no target: never borderline


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, 0.0], [-1.0], [float("inf")]])
def test_ratio_summary_rejects_bad_rounds(bk, bad):
    with pytest.raises(ValueError, match="round_ratios"):
        bk.ratio_summary(bad)


def test_verdict_uses_the_paired_median(bk):
    s = bk.ratio_summary([0.8, 1.6, 1.6, 1.6, 0.8], target=1.5)    # median 1.6, IQR 0.8..1.6
    assert bk.verdict(s, 1.5).startswith("PASS") and "borderline" in bk.verdict(s, 1.5)
    s = bk.ratio_summary([1.40, 1.41, 1.42, 1.43, 1.44], target=1.5)
    assert bk.verdict(s, 1.5) == "MISS"
    assert bk.verdict({"ratio": None}, 1.0) == "-"


def test_n_rounds_is_odd_and_within_the_plan(bk):
    plan = bk.PairPlan(side_budget_s=0.01, min_samples=2, row_budget_s=1.0, min_rounds=7, max_rounds=21)
    assert bk.n_rounds(plan, spent_s=0.2, round_s=0.1, done=2) == 11       # 2 + 0.8 / 0.1 = 10 -> 11
    assert bk.n_rounds(plan, spent_s=0.2, round_s=0.4, done=2) == 7        # slow rows: at least min_rounds
    assert bk.n_rounds(plan, spent_s=5.0, round_s=1.0, done=2) == 7        # over budget already
    assert bk.n_rounds(plan, spent_s=0.01, round_s=1e-4, done=2) == 21     # fast rows: at most max_rounds
    assert bk.n_rounds(plan, spent_s=0.0, round_s=0.0, done=2) == 21
    even_cap = bk.PairPlan(0.01, 2, 1.0, 3, 8)
    assert bk.n_rounds(even_cap, spent_s=0.0, round_s=1e-4, done=2) == 7   # odd, never above the cap
    for spent in np.linspace(0, 2, 9):
        for rs in (1e-3, 0.03, 0.1, 0.3):
            n = bk.n_rounds(plan, spent, rs, 2)
            assert n % 2 == 1 and plan.min_rounds <= n <= plan.max_rounds


def test_pooled_median_over_every_sample(bk):
    rounds = [{"samples": [1.0, 2.0, 3.0], "unit": "ticks", "kind": "python", "unstable": True},
              {"samples": [10.0, 11.0], "unit": "ticks", "kind": "python", "unstable": False}]
    p = bk.pooled(rounds)
    assert p["median"] == 3.0 and p["min"] == 1.0 and p["n"] == 5 and p["rounds_unstable"] == 1
    assert p["cv"] == pytest.approx(1.4826 * 2.0 / 3.0)     # |x - 3| = 2,1,0,7,8 -> MAD 2


def test_time_pair_cancels_drift(bk, monkeypatch):
    """A machine whose speed drifts by 3x between rounds (same within a round): ours costs 1 unit,
    the peer 2 units of the current state, so every paired round and the row ratio are exactly 2,
    while a peer measured in one state and ours in another could give anything from 2/3 to 6."""
    load = iter(np.tile([1.0, 3.0, 1.5, 2.0, 1.0, 2.5], 20))
    calls = []
    state = {"load": None, "sides_in_round": 0}

    def fake_measure(target, *args, budget_s, min_samples, warmup=True, reps=None, **kw):
        if state["sides_in_round"] % 2 == 0:
            state["load"] = next(load)                 # a new round: the machine moved
        state["sides_in_round"] += 1
        side = target()
        calls.append((side, warmup, reps))
        t = (1.0 if side == "ours" else 2.0) * state["load"] * 1000.0
        return {"median": t, "min": t, "unit": "ticks", "cv": 0.0, "n": 3, "unstable": False,
                "samples": [t * 0.99, t, t * 1.01], "reps": 4 if side == "ours" else 5}

    monkeypatch.setattr(bk, "measure", fake_measure)
    r = bk.Row("fake", "(1,)", "peer", 1.5, ours=lambda: "ours", peer=lambda: "peer")
    bk.time_pair(r, quick=False)
    res = r.result
    n = len(res["rounds"])
    assert n % 2 == 1 and bk.PLAN.min_rounds <= n <= bk.PLAN.max_rounds
    assert res["round_ratios"] == [2.0] * n and res["ratio"] == 2.0
    assert not res["ratio_unstable"] and not res["ratio_borderline"]
    # the order alternates, and only each side's first measurement warms up and sizes reps
    assert [x["first"] for x in res["rounds"]] == ["ours", "peer"] * (n // 2) + ["ours"]
    assert [c[0] for c in calls[:4]] == ["ours", "peer", "peer", "ours"]
    assert [c[1] for c in calls].count(True) == 2
    assert all(c[2] == (4 if c[0] == "ours" else 5) for c in calls if not c[1])
    assert res["ours"]["n"] == 3 * n and res["peer"]["n"] == 3 * n


def test_quick_plan_is_smaller(bk):
    assert bk.PLAN_QUICK.max_rounds <= bk.PLAN.min_rounds
    assert bk.PLAN_QUICK.row_budget_s < bk.PLAN.row_budget_s


def test_time_pair_ratio_is_the_median_of_round_ratios(bk, monkeypatch):
    """The peer's true cost relative to ours changes from round to round (factor f_i) while the load
    drifts: each round's ratio is f_i, and the row's ratio is their median (2.0), not the ratio of the
    two pooled medians, which the drift skews (4.8 / 3.0 = 1.6 here)."""
    factors = [2.0, 2.4, 1.6, 2.2, 1.8, 5.0, 1.9] * 3
    loads = [1.0, 3.0, 3.0, 3.0, 1.0, 3.0, 1.0] * 3
    seq = iter(zip(factors, loads))
    state = {"k": 0, "f": None, "load": None}

    def fake_measure(target, *args, budget_s, min_samples, warmup=True, reps=None, **kw):
        if state["k"] % 2 == 0:
            state["f"], state["load"] = next(seq)
        state["k"] += 1
        t = (1.0 if target() == "ours" else state["f"]) * state["load"]
        return {"median": t, "min": t, "unit": "ticks", "cv": 0.0, "n": 1, "unstable": False,
                "samples": [t], "reps": 1}

    monkeypatch.setattr(bk, "measure", fake_measure)
    monkeypatch.setattr(bk, "PLAN_QUICK", bk.PairPlan(0.01, 2, 0.2, min_rounds=7, max_rounds=7))
    r = bk.Row("fake", "(1,)", "peer", 2.0, ours=lambda: "ours", peer=lambda: "peer")
    bk.time_pair(r, quick=True)
    n = len(r.result["rounds"])
    assert n == 7
    want = factors[:n]
    assert r.result["round_ratios"] == pytest.approx(want, rel=1e-12)
    assert r.result["ratio"] == pytest.approx(float(np.median(want)), rel=1e-12)
    pooled_ratio = r.result["peer"]["median"] / r.result["ours"]["median"]
    assert r.result["ratio"] == 2.0 and pooled_ratio == pytest.approx(1.6)   # the drift the pairing removes
