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
    assert ps["labels"] == ["numpy\nprefill", "numpy\ndecode", "c\nprefill", "c\ndecode"]
    assert ps["untraced"] == [None, rep["backends"]["numpy"]["decode_forward_untraced_ticks"],
                              None, rep["backends"]["c"]["decode_forward_untraced_ticks"]]


def test_profile_without_decode_steps_has_no_untraced_figure():
    rep = profile.run(backends=["c"], prompt_len=4, decode=0, repeats=1)
    assert rep["backends"]["c"]["decode_forward_untraced_ticks"] is None
