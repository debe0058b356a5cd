"""Teaching mode: printed values checked against independently computed ones.

The reference values are the project design notes' ("The article's worked example, done
right", a document outside this repository) and values computed here with
mpmath / by hand, not by refimpl.
"""
import io
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from refimpl.oracle import exact as X
from refimpl.verify.explain import explain_attention, explain_model


def run_default():
    buf = io.StringIO()
    explain_attention(out=buf)
    return buf.getvalue()


def test_article_example_values_from_design_md():
    text = run_default()
    # Q K^T is 3x3 with these entries (the article wrote a 3x2 matrix)
    assert "S = [[0, 1, 1], [1, 0, 2], [1, 1, 3]]   (3 × 3)" in text
    assert "not n_q × d_k = 3 × 2" in text
    # exp-normalised softmax, not sum-normalised
    assert "softmax([1, 2]) = [0.2689, 0.7311], not [1/3, 2/3]" in text
    # row 1 of softmax(QK^T / sqrt 2) and output row 1
    assert "p = [0.1978, 0.4011, 0.4011]" in text
    assert "O[1] = " in text and re.search(r"O\[1\] = .* = \[1\.1978, 1\.2033\]", text)
    assert "softmax([1, 1]) = [1/2, 1/2] exactly" in text
    assert "a tie picks the first index" in text


def test_every_printed_value_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    Q = [[1, 0], [0, 1], [1, 1]]
    K = [[0, 1], [1, 0], [1, 2]]
    V = [[2, 0], [0, 2], [2, 1]]
    text = run_default()
    for i in range(3):
        s = [sum(Q[i][c] * K[j][c] for c in range(2)) / mpmath.sqrt(2) for j in range(3)]
        e = [mpmath.exp(x - max(s)) for x in s]
        p = [x / sum(e) for x in e]
        want_p = "p = [" + ", ".join(f"{float(x):.4f}" for x in p) + "]"
        assert want_p in text, want_p
        o = [sum(p[j] * V[j][c] for j in range(3)) for c in range(2)]
        assert f"= [{float(o[0]):.4f}, {float(o[1]):.4f}]" in text


def test_exact_arithmetic_stays_rational_when_it_can():
    # d_k = 4: the scale 1/2 is rational, so scores stay fractions
    buf = io.StringIO()
    r = explain_attention([[1, 2]], [[1, 1], [0, 1]], [[1], [2]], d_k=4, out=buf)
    assert r["scale"] == Fraction(1, 2)
    assert r["scaled"] == [[Fraction(3, 2), Fraction(1)]]
    assert "S / √d_k = [[3/2, 1]]" in buf.getvalue()
    # equal scores: probabilities are exactly 1/n
    assert X.softmax([Fraction(5), Fraction(5), Fraction(5)]) == [Fraction(1, 3)] * 3
    # high precision: softmax([1, 2])[1] = 1 / (1 + e^-1) to 40 digits
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 45
    got = X.softmax([Fraction(1), Fraction(2)])[1]
    assert abs(mpmath.mpf(str(got)) - 1 / (1 + mpmath.e ** -1)) < mpmath.mpf(10) ** -40


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="same width d_k"):
        explain_attention([[1, 2]], [[1, 2, 3]], [[1]], out=io.StringIO())
    with pytest.raises(ValueError, match="one value row per key"):
        explain_attention([[1, 2]], [[1, 2]], [[1], [2]], out=io.StringIO())
    with pytest.raises(ValueError, match="inner sizes"):
        X.matmul([[1, 2]], [[1, 2]])


def test_explain_model_ties_steps_to_equations():
    import numpy as np

    from refimpl.oracle.model import tiny_model
    buf = io.StringIO()
    r = explain_model("gpt2", ids=[1, 2, 3], out=buf, temperature=0.0)
    text = buf.getvalue()
    assert "x₀ = E[ids] + P[positions]" in text and "gelu_tanh" in text and "softmax(q kᵀ / √Dh" in text
    assert r["steps"][0] == "embed" and r["steps"][-1] == "logits"
    # the printed distribution is the softmax of the model's last logits, computed here independently
    z = tiny_model("gpt2", seed=0).forward(np.array([1, 2, 3]))[-1]
    p = np.exp(z - z.max())
    p /= p.sum()
    top = int(np.argmax(z))
    assert re.search(rf"id +{top} +z = +{z[top]:.6f} +p = {p[top]:.6f}", text)
    assert f"argmax z = id {top}" in text


def test_cli_explain():
    out = subprocess.run([sys.executable, "-m", "refimpl", "explain", "attention"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "[1.1978, 1.2033]" in out.stdout
    out = subprocess.run([sys.executable, "-m", "refimpl", "explain", "attention", "--q", "[[1,0]", "--k", "[[1]]"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--q must be a JSON matrix" in out.stderr
    out = subprocess.run([sys.executable, "-m", "refimpl", "explain", "model", "--arch", "llama", "--ids", "4,5",
                          "--temperature", "0.7"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Sampled at temperature 0.7" in out.stdout


@pytest.mark.parametrize("digits", [-1, 0, 31, 60, 2.5, True])
def test_digits_out_of_range_is_a_clear_error(digits, capsys):
    with pytest.raises(ValueError, match="digits must be an integer from 1 to 30"):
        explain_attention(digits=digits, out=io.StringIO())
    from refimpl.cli import main
    if isinstance(digits, int) and not isinstance(digits, bool):
        assert main(["explain", "attention", "--digits", str(digits)]) == 2
        assert "digits must be an integer from 1 to 30" in capsys.readouterr().err


def test_thirty_digits_are_all_printed_and_correct():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    buf = io.StringIO()
    explain_attention([[1, 2]], [[1, 0], [0, 1]], [[1], [2]], digits=30, out=buf)
    s = [1 / mpmath.sqrt(2), 2 / mpmath.sqrt(2)]
    p1 = mpmath.exp(s[1] - s[1]) / (mpmath.exp(s[0] - s[1]) + 1)
    assert "p = [" in buf.getvalue()
    assert mpmath.nstr(p1, 30, strip_zeros=False) in buf.getvalue()


def test_huge_inputs_print_in_scientific_notation():
    buf = io.StringIO()
    r = explain_attention([[1e308, 0]], [[1, 0], [0, 1]], [[1], [2]], out=buf)
    text = buf.getvalue()
    assert "S / √d_k = [[7.0711e+307, 0.0000]]" in text           # 1e308 / sqrt(2), to 4 places of its mantissa
    assert r["P"][0][1] == 0 and "O[1] = 1.0000·[1] + 0.0000·[2] = [1.0000]" in text


def test_qk_shape_mistake_when_n_k_equals_d_k():
    buf = io.StringIO()
    explain_attention([[1, 2]], [[1, 0], [0, 1]], [[1], [2]], out=buf)
    text = buf.getvalue()
    assert "1 × 2, not" not in text and "n_k = d_k = 2" in text and "column j is key j" in text


def test_output_into_a_closed_pipe_is_no_traceback():
    """`refimpl explain model | head -1`: the reader closes the pipe early; the command stops
    quietly (exit 141, as a shell reports SIGPIPE) instead of printing a BrokenPipeError.
    The pipe's read end is closed before the command starts: reading a line first and then
    closing raced with the command, which under load wrote its 4 KB before the close (exit 0)."""
    import os
    r, w = os.pipe()
    os.close(r)
    p = subprocess.Popen([sys.executable, "-m", "refimpl", "explain", "model", "--arch", "gpt2"],
                         stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_exact_reads_numpy_scalars_and_compares_exactly():
    """NumPy 2 prints np.float64(0.5) as 'np.float64(0.5)', which Fraction cannot read: teaching
    mode failed on NumPy arrays.  A float reads as the digits it prints (np.float32(0.1) -> 1/10)."""
    assert X.exact(np.float64(0.5)) == Fraction(1, 2) and X.exact(np.float32(0.1)) == Fraction(1, 10)
    assert X.exact(np.array(0.25)) == Fraction(1, 4) and X.exact(np.int8(-4)) == -4
    for bad, err in ((np.bool_(True), TypeError), (np.float64("nan"), ValueError), (np.float32("inf"), ValueError),
                     (np.complex128(1), TypeError)):
        with pytest.raises(err):
            X.exact(bad)
    eye = [[1, 0], [0, 1]]
    assert (explain_attention(np.eye(2), np.eye(2), np.eye(2), out=io.StringIO())
            == explain_attention(eye, eye, eye, out=io.StringIO()))       # arrays teach as lists do
    third = Fraction(1, 3)
    assert X.argmax([third, third + Fraction(1, 10 ** 60)]) == 1      # 60 digits past PREC = 50
    assert X.argmax([X.to_decimal(third), third]) == 1                 # the 50-digit decimal is below 1/3
    assert X.fmt(X.to_decimal(Fraction(10 ** 60))) == "1" + "0" * 60 + ".0000"
    assert X.fmt(X.to_decimal(Fraction(-1, 10 ** 9))) == "0.0000"
    with pytest.raises(TypeError, match="object value is not a real number"):
        X.exact(np.array(None, dtype=object))


@pytest.mark.parametrize("t", [-1.0, float("nan"), float("inf")])
def test_explain_model_refuses_a_bad_temperature_before_the_walk(t):
    """--temperature -1 and nan were read as greedy."""
    buf = io.StringIO()
    with pytest.raises(ValueError, match="temperature must be"):
        explain_model("llama", out=buf, temperature=t)
    assert buf.getvalue() == ""


def test_explain_model_greedy_needs_no_sample_seed():
    assert explain_model("llama", out=io.StringIO(), sample_seed=None)["chosen"] is not None
