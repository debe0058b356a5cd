"""`refimpl profile` reports the untraced decode forward beside the traced stages, and says
when the C backend's Llama ran it as one C call per token.  (No timing assertion: only that
the figure exists, is a positive tick count, and the path is labelled right.)"""
from refimpl.timing import profile


def test_profile_reports_untraced_decode_and_its_path():
    rep = profile.run(backends=["numpy", "c"], prompt_len=4, decode=3, repeats=1)
    for b, fused in (("numpy", False), ("c", True)):
        d = rep["backends"][b]
        assert d["fused_decode"] is fused
        assert isinstance(d["decode_forward_untraced_ticks"], float) and d["decode_forward_untraced_ticks"] > 0
    ps = profile.plot_series(rep)          # the plot marks the untraced decode on each decode bar only
    assert ps["labels"] == ["numpy\nprefill", "numpy\ndecode", "c\nprefill", "c\ndecode", "c\ndecode\n(1 C call)"]
    assert ps["untraced"] == [None, rep["backends"]["numpy"]["decode_forward_untraced_ticks"],
                              None, rep["backends"]["c"]["decode_forward_untraced_ticks"], None]


def test_profile_times_the_one_call_decode_stage_by_stage():
    """The C backend's untraced decode (one C call a token) gets its own stage rows, timed inside
    the call: the stages of the model's forward, then sampling, all within the call seen from
    Python.  A backend that decodes through Python has none."""
    rep = profile.run(backends=["numpy", "c"], prompt_len=4, decode=3, repeats=1)
    assert rep["backends"]["numpy"]["decode_fused"] == [] and rep["backends"]["numpy"]["decode_fused_call_ticks"] is None
    d = rep["backends"]["c"]
    rows = {r["stage"]: r for r in d["decode_fused"]}
    assert list(rows) == list(profile.STAGES + profile.INFO_STAGES) + ["total"]
    forward = sum(rows[s]["ticks"] for s in ("embedding", "attention", "ffn", "norms", "lm_head"))
    assert 0 < forward <= d["decode_fused_call_ticks"]
    assert rows["total"]["ticks"] == forward + rows["sampling"]["ticks"]
    for s in profile.STAGES:                # the same work model as the traced decode's rows
        traced = next(r for r in d["decode"] if r["stage"] == s)
        assert (rows[s]["flops"], rows[s]["bytes"]) == (traced["flops"], traced["bytes"])


def test_profile_without_decode_steps_has_no_untraced_figure():
    rep = profile.run(backends=["c"], prompt_len=4, decode=0, repeats=1)
    assert rep["backends"]["c"]["decode_forward_untraced_ticks"] is None
