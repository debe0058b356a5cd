"""refimpl.verify.check: correct implementations pass, planted bugs are caught and shrunk."""
import json
import math

import numpy as np
import pytest
from conftest import require

from refimpl.kernels import registry
from refimpl.oracle import layers as L
from refimpl.verify import check
from refimpl.verify.cases import OPS, SPECS, edge_cases, format_case

EX = 30   # hypothesis examples per check in this file (the edge cases always run)


@pytest.mark.parametrize("op", OPS)
def test_project_numpy_kernels_pass(op):
    rep = check(registry.get(op, "numpy"), op, examples=EX)
    assert rep.passed, rep.text()
    assert all(c.stats is not None for c in rep.cases)
    assert 0 <= rep.worst_ratio <= 1
    # every edge case of the op ran (the kernel takes every parameter the op varies), plus one hypothesis row
    assert len(rep.cases) == len(edge_cases(op, np.float32, set(SPECS[op].varied))) + 1


def test_float64_inputs_pass():
    rep = check(registry.get("softmax", "numpy"), "softmax", examples=EX, dtype=np.float64)
    assert rep.passed and rep.dtype == "float64", rep.text()


# --------------------------------------------------------------------------
# planted bugs
# --------------------------------------------------------------------------


def softmax_no_max_shift(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_without_max_shift_is_caught():
    rep = check(softmax_no_max_shift, "softmax", examples=EX)
    assert not rep.passed
    names = {c.name for c in rep.failures}
    assert "logits near exp overflow (+-88)" in names
    assert "logits near float max (+-3e38)" in names
    shrunk = rep.cases[-1]
    assert not shrunk.passed and "shrunk" in shrunk.name
    # the shrunk input is small and reproduces the failure when pasted
    ns = {"impl": softmax_no_max_shift}
    with np.errstate(all="ignore"):
        exec(shrunk.example, ns)
    x = ns["x"]
    assert x.size <= 4
    assert np.abs(x).max() > 88.0                 # exp overflows in float32: that is the bug
    assert not np.all(np.isfinite(ns["out"])) or not np.allclose(ns["out"], L.softmax(x.astype(np.float64)))


def attention_causal_off_by_one(q, k, v, causal=False, scale=None):
    Lq, Lk = q.shape[1], k.shape[1]
    mask = None
    if causal:   # bug: query t also sees key Lk-Lq+t+1
        mask = np.arange(Lk)[None, :] <= (Lk - Lq + np.arange(Lq))[:, None] + 1
    return L.multi_head_attention(q, k, v, mask, scale)


def test_attention_off_by_one_causal_mask_is_caught():
    rep = check(attention_causal_off_by_one, "attention", examples=EX)
    assert not rep.passed
    failed = {c.name for c in rep.failures}
    assert any(n.startswith("causal") for n in failed)
    assert not any(n.startswith(("MHA", "GQA", "MQA")) for n in failed)   # non-causal cases are right
    assert "causal=True" in rep.cases[-1].example


def matmul_fp16_accumulate(a, b):
    acc = np.zeros((a.shape[0], b.shape[1]), np.float16)
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    for k in range(a.shape[1]):
        acc = (acc + np.outer(a16[:, k], b16[k, :])).astype(np.float16)
    return acc.astype(np.float32)


def test_gemm_accumulating_in_float16_is_caught():
    rep = check(matmul_fp16_accumulate, "matmul", examples=EX)
    assert not rep.passed
    assert "primes 7x13x5" in {c.name for c in rep.failures}
    s = next(c for c in rep.failures if c.name == "primes 7x13x5").stats
    assert s.bound_ratio > 10 and s.max_ulp > 100


def test_gelu_erf_where_tanh_expected_is_caught():
    rep = check(L.gelu_erf, "gelu_tanh", examples=EX)
    assert not rep.passed
    grid = next(c for c in rep.cases if c.name == "grid -10..10")
    assert not grid.passed and grid.stats.max_abs > 1e-4    # |gelu_erf - gelu_tanh| peaks near 2e-4


def rope_always_interleaved(x, positions, theta=10000.0):
    return L.rope_interleaved(x, positions, theta)


def test_rope_in_the_wrong_convention_is_caught():
    rep = check(rope_always_interleaved, "rope", examples=EX)          # the contract default is half-split
    assert not rep.passed
    assert rep.params["interleaved"] is False
    # the same function is right when the user says it implements the interleaved convention
    assert check(rope_always_interleaved, "rope", examples=EX, interleaved=True).passed


def test_layer_norm_one_pass_variance_is_caught():
    def ln_naive(x, w, b, eps=1e-5):
        var = (x * x).mean(-1, keepdims=True) - x.mean(-1, keepdims=True) ** 2   # E[x^2] - E[x]^2
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(np.maximum(var, 0) + eps) * w + b
    rep = check(ln_naive, "layer_norm", examples=0)
    assert "large mean 3e3 (E[x^2]-E[x]^2 trap)" in {c.name for c in rep.failures}


def test_exceptions_and_wrong_shapes_are_reported():
    def raises(x):
        raise RuntimeError("boom")
    rep = check(raises, "silu", examples=0)
    assert not rep.passed and all("RuntimeError: boom" in c.error for c in rep.cases)
    rep = check(lambda x: x[..., :1], "softmax", examples=0)
    assert not rep.passed
    assert "returned shape (4, 1), expected (4, 10)" in next(c.error for c in rep.cases if c.name == "ordinary 4x10")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        check(np.exp, "exp")
    with pytest.raises(ValueError, match="has no parameter eps"):
        check(L.softmax, "softmax", eps=1e-5)
    with pytest.raises(ValueError, match="float32 or float64"):
        check(L.silu, "silu", dtype=np.float16)


def test_implementation_without_causal_parameter_skips_causal_cases():
    rep = check(lambda q, k, v: L.multi_head_attention(q, k, v), "attention", examples=10)
    assert rep.passed, rep.text()
    assert not any(c.name.startswith("causal") for c in rep.cases)
    assert any("causal" in n for n in rep.notes)


def test_report_text_and_dict():
    rep = check(softmax_no_max_shift, "softmax", examples=5)
    txt = rep.text()
    assert "FAIL" in txt and "budget used" in txt and "reproduce" in txt
    d = rep.as_dict()
    assert d["passed"] is False and d["op"] == "softmax"
    assert {"max_abs", "max_rel", "max_ulp", "bound_ratio", "nmse"} <= set(d["cases"][1]["stats"])


def test_format_case_round_trips_exactly():
    x = np.array([[1e-7, 3.4028235e38, -np.inf, 0.1]], np.float32)
    from refimpl.verify.cases import Case
    src = format_case("softmax", Case("t", {"x": x}), {})
    ns = {"impl": lambda x: x}
    exec(src, ns)
    assert ns["x"].dtype == np.float32 and np.array_equal(ns["x"], x)


def test_every_spec_matches_the_numpy_kernel_signature():
    import inspect
    for op, sp in SPECS.items():
        params = inspect.signature(registry.get(op, "numpy")).parameters
        assert list(params)[: len(sp.arrays)] == list(sp.arrays), op
        for k, v in sp.params.items():
            assert params[k].default == v, (op, k)


# --------------------------------------------------------------------------
# torch's implementations pass (converted in and out)
# --------------------------------------------------------------------------


@pytest.mark.crosscheck
def test_torch_implementations_pass():
    torch = require("torch")
    F = torch.nn.functional

    def sdpa(q, k, v, causal=False, scale=None):
        g = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        Lq, Lk = q.shape[1], k.shape[1]
        mask = None
        if causal:   # bottom-right aligned, as the contract (torch's is_causal is top-left)
            mask = torch.arange(Lk)[None, :] <= (Lk - Lq + torch.arange(Lq))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    impls = {
        "matmul": torch.matmul,
        "softmax": lambda x: torch.softmax(x, dim=-1),
        "attention": sdpa,
        "layer_norm": lambda x, w, b, eps=1e-5: F.layer_norm(x, w.shape, w, b, eps),
        "rms_norm": lambda x, w, eps=1e-6: F.rms_norm(x, w.shape, w, eps),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
    }
    torch.set_num_threads(1)
    for op, f in impls.items():
        rep = check(f, op, examples=EX)
        assert rep.passed, rep.text()
    # torch's exact GELU is not the tanh GELU: caught
    assert not check(F.gelu, "gelu_tanh", examples=5).passed


def test_torch_conversion_in_auto_mode():
    torch = require("torch")
    rep = check(lambda x: torch.softmax(x, dim=-1), "softmax", examples=3)
    assert rep.passed
    assert math.isfinite(rep.worst_ratio)


def test_all_masked_rows_option():
    def nan_on_masked_rows(x):         # what most libraries do for a row of only -inf
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        assert check(nan_on_masked_rows, "softmax", examples=20).passed
        assert check(registry.get("softmax", "numpy"), "softmax", examples=20, all_masked_rows=True).passed
        assert not check(nan_on_masked_rows, "softmax", examples=20, all_masked_rows=True).passed


def test_cli_verify_python_target(tmp_path):
    import subprocess
    import sys
    (tmp_path / "mykern.py").write_text(
        "import numpy as np\n"
        "def good(x):\n    e = np.exp(x - x.max(-1, keepdims=True))\n    return e / e.sum(-1, keepdims=True)\n"
        "def bad(x):\n    e = np.exp(x)\n    return e / e.sum(-1, keepdims=True)\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "refimpl", "verify", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    ok = run("mykern:good", "--op", "softmax", "--examples", "10", "--json", "r.json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    bad = run(str(tmp_path / "mykern.py") + ":bad", "--op", "softmax", "--examples", "10")
    assert bad.returncode == 1 and "logits near exp overflow" in bad.stdout
    assert run("mykern:nothere", "--op", "softmax").returncode == 2
    assert run("mykern:good", "--op", "softmax", "--param", "eps=1").returncode == 2
    assert run("mykern:good", "--op", "nosuchop").returncode == 2


# --------------------------------------------------------------------------
# tiled kernels: a bug in a later tile is caught (cases span several tiles)
# --------------------------------------------------------------------------


def matmul_bug_in_later_row_blocks(a, b):
    """Blocked GEMM, 64 rows a block; bug: row blocks after the first skip the last k."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    M, K = a.shape
    out = np.empty((M, b.shape[1]))
    for i0 in range(0, M, 64):
        kk = K if i0 == 0 else K - 1
        out[i0:i0 + 64] = a64[i0:i0 + 64, :kk] @ b64[:kk]
    return out.astype(np.float32)


def attention_bug_in_later_query_tiles(q, k, v, causal=False, scale=None):
    """Flash-style, query tiles of 8 rows; bug: the causal offset uses the tile-local row index."""
    q64, k64, v64 = (t.astype(np.float64) for t in (q, k, v))
    H, Lq, D = q.shape
    Hkv, Lk, _ = k.shape
    sc = 1 / np.sqrt(D) if scale is None else scale
    out = np.empty((H, Lq, D))
    for h in range(H):
        g = h // (H // Hkv)
        for t0 in range(0, Lq, 8):
            s = q64[h, t0:t0 + 8] @ k64[g].T * sc
            if causal:
                rows = np.arange(s.shape[0])            # should be t0 + arange
                s = np.where(np.arange(Lk)[None, :] <= (Lk - Lq + rows)[:, None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[h, t0:t0 + 8] = p / p.sum(-1, keepdims=True) @ v64[g]
    return out.astype(np.float32)


def test_bugs_in_later_tiles_are_caught():
    rep = check(matmul_bug_in_later_row_blocks, "matmul", examples=0)
    assert {c.name for c in rep.failures} == {"tiles 131x257x133 (M, K, N past 64 and 128)"}, rep.text()
    rep = check(attention_bug_in_later_query_tiles, "attention", examples=0)
    assert {c.name for c in rep.failures} == {"causal Lq=Lk=130 D=16 (query and key tiles)",
                                              "causal Lq=67 < Lk=131, GQA H=4 Hkv=2 (several tiles)"}, rep.text()


# --------------------------------------------------------------------------
# SIMD kernels: a bug in the remainder loop after a vector body is caught
# --------------------------------------------------------------------------


def _body(n: int, W: int) -> int:
    """Elements a W-lane kernel runs in whole blocks; below W its scalar path runs them all."""
    return n - n % W if n >= W else n


def softmax_denominator_without_tail(W):
    def f(x):
        e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        return (e / e[..., :_body(x.shape[-1], W)].sum(-1, keepdims=True)).astype(x.dtype)
    return f


def softmax_max_without_tail(W):
    def f(x):
        with np.errstate(all="ignore"):         # float32 exp overflows: that is the bug
            e = np.exp(x - x[..., :_body(x.shape[-1], W)].max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
    return f


def layer_norm_mean_without_tail(W):
    def f(x, w, b, eps=1e-5):
        x64 = x.astype(np.float64)
        mu = x64[..., :_body(x.shape[-1], W)].sum(-1, keepdims=True) / x.shape[-1]
        var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
        return ((x64 - mu) / np.sqrt(var + eps) * w + b).astype(x.dtype)
    return f


def rms_norm_squares_without_tail(W):
    def f(x, w, eps=1e-6):
        x64 = x.astype(np.float64)
        ms = (x64[..., :_body(x.shape[-1], W)] ** 2).sum(-1, keepdims=True) / x.shape[-1]
        return (x64 / np.sqrt(ms + eps) * w).astype(x.dtype)
    return f


def activation_tail_left_unprocessed(fn, W):
    def f(x):
        y = fn(x.astype(np.float64)).astype(x.dtype)
        k = _body(x.shape[-1], W)
        y[..., k:] = x[..., k:]
        return y
    return f


def matmul_k_without_tail(W):
    def f(a, b):
        k = _body(a.shape[1], W)
        return (a[:, :k].astype(np.float64) @ b[:k].astype(np.float64)).astype(a.dtype)
    return f


def attention_scores_without_d_tail(W):
    def f(q, k, v, causal=False, scale=None):
        D = q.shape[-1]
        q_body = q.astype(np.float64)
        q_body[..., _body(D, W):] = 0.0         # q.k summed over the vector body of D only
        mask = L.causal_mask(q.shape[1], k.shape[1]) if causal else None
        return L.multi_head_attention(q_body, k.astype(np.float64), v.astype(np.float64), mask,
                                      1 / math.sqrt(D) if scale is None else scale).astype(q.dtype)
    return f


def rope_tail_pairs_not_rotated(W):
    def f(x, positions, theta=10000.0):
        y = L.rope(x.astype(np.float64), positions, theta).astype(x.dtype)
        half = x.shape[-1] // 2
        k = _body(half, W)
        y[..., k:half], y[..., half + k:] = x[..., k:half], x[..., half + k:]
        return y
    return f


TAIL_BUGS = [("softmax", softmax_denominator_without_tail), ("softmax", softmax_max_without_tail),
             ("layer_norm", layer_norm_mean_without_tail), ("rms_norm", rms_norm_squares_without_tail),
             ("gelu_tanh", lambda W: activation_tail_left_unprocessed(L.gelu_tanh, W)),
             ("silu", lambda W: activation_tail_left_unprocessed(L.silu, W)),
             ("matmul", matmul_k_without_tail), ("attention", attention_scores_without_d_tail),
             ("rope", rope_tail_pairs_not_rotated)]


@pytest.mark.parametrize("W", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("op, bug", TAIL_BUGS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(TAIL_BUGS)])
def test_bugs_in_vector_tails_are_caught(op, bug, W):
    """Before the vector-tail cases, a softmax dropping the last n % 16 terms of its denominator
    passed every case (the long row n=4099 hides 3 dropped terms inside its own budget), as did
    a D-tail bug in attention's q.k and untouched RoPE tail pairs at every width."""
    rep = check(bug(W), op, examples=0)
    assert not rep.passed
    assert any("vector tail" in c.name for c in rep.failures), rep.text()


def _tier_of_each_element(n: int) -> np.ndarray:
    """Which loop of a 64 -> 32 -> 16 -> 8 -> 4 -> 1 cascade runs each of n elements."""
    tier, pos = np.zeros(n, int), 0
    for w in (64, 32, 16, 8, 4, 1):
        while n - pos >= w:
            tier[pos:pos + w], pos = w, pos + w
    return tier


@pytest.mark.parametrize("tier", [64, 32, 16, 8, 4, 1])
def test_a_bug_in_any_tier_of_a_remainder_cascade_is_caught(tier):
    """A kernel that runs 64 lanes, then 32, 16, 8, 4, then scalars, with one of those loops
    wrong: a row of 127 = 64 + 32 + 16 + 8 + 4 + 3 runs each of them once."""
    def softmax_tier_dropped(x):
        e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        keep = _tier_of_each_element(x.shape[-1]) != tier
        return (e / (e * keep).sum(-1, keepdims=True)).astype(x.dtype)

    def silu_tier_unwritten(x):
        y = L.silu(x.astype(np.float64)).astype(x.dtype)
        y[..., _tier_of_each_element(x.shape[-1]) == tier] = 0.0
        return y
    for op, bug in (("softmax", softmax_tier_dropped), ("silu", silu_tier_unwritten)):
        rep = check(bug, op, examples=0)
        assert any("vector tail" in c.name for c in rep.failures), (op, rep.text())


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_project_tiled_kernels_pass_the_multi_tile_cases(backend):
    if backend == "numba":
        require("numba")
    for op in ("matmul", "attention", "rope"):
        rep = check(registry.get(op, backend), op, examples=0)
        assert rep.passed, rep.text()
        names = {c.name for c in rep.cases}
        assert names & {"tiles 131x257x133 (M, K, N past 64 and 128)", "causal Lq=Lk=130 D=16 (query and key tiles)",
                        "D=128 (a real head width) H=2 T=5"}, names


@pytest.mark.parametrize("op", OPS)
def test_project_c_kernels_pass_every_edge_case_on_every_simd_path(op):
    """The C library's AVX-512, AVX2 and portable paths each run their own vector bodies and
    remainder loops: each path, forced in turn, passes every edge case, vector tails included."""
    from refimpl.kernels.cdispatch import forced_path, runnable_paths
    for path in runnable_paths():
        with forced_path(path):
            rep = check(registry.get(op, "c"), op, examples=0)
        assert rep.passed, f"{path}: " + rep.text()
        assert any("vector tail" in c.name for c in rep.cases)


# --------------------------------------------------------------------------
# a nondeterministic implementation, reproducers, user files
# --------------------------------------------------------------------------


def _wrong_on_first_call():
    calls = [0]

    def softmax_racy(x):
        calls[0] += 1
        p = L.softmax(x.astype(np.float64), axis=-1)
        return (p * (1.01 if calls[0] == 1 else 1.0)).astype(np.float32)
    return softmax_racy


def test_nondeterministic_implementation_is_a_failure_not_a_crash(tmp_path, capsys):
    rep = check(_wrong_on_first_call(), "softmax", examples=20, edge=False)
    assert not rep.passed
    (hyp,) = rep.cases
    assert "nondeterministic: same input, different output" in hyp.error and hyp.example
    # the command line prints the same verdict (exit 1), no traceback; every case is called twice,
    # so a result that differs on the second call of an edge case fails there
    from refimpl.cli import main
    wrong_call = 2 * 3                                       # the second call of the third edge case
    (tmp_path / "racy.py").write_text("import numpy as np\n_n = [0]\n"
                                      "def softmax(x):\n    _n[0] += 1\n"
                                      "    e = np.exp(x - x.max(-1, keepdims=True))\n"
                                      f"    return e / e.sum(-1, keepdims=True) * (1.01 if _n[0] == {wrong_call} else 1.0)\n")
    assert main(["verify", f"{tmp_path / 'racy.py'}:softmax", "--op", "softmax", "--examples", "20"]) == 1
    out = capsys.readouterr().out
    assert "nondeterministic: same input, different output: two calls differ first at" in out and "FAIL" in out
    assert edge_cases("softmax", np.float32)[2].name in out


def test_reproducer_with_all_masked_rows_rebuilds_the_same_input():
    def wrong_on_long_rows(x):
        p = L.softmax(x.astype(np.float64), axis=-1)
        return (p * (1.01 if x.shape[-1] > 1000 else 1.0)).astype(np.float32)
    rep = check(wrong_on_long_rows, "softmax", examples=0, all_masked_rows=True)
    (bad,) = rep.failures
    assert bad.name == "long row n=4099"
    ns = {"impl": wrong_on_long_rows}
    exec(bad.example, ns)
    want = next(c for c in edge_cases("softmax", np.float32, (), all_masked_rows=True) if c.name == bad.name)
    np.testing.assert_array_equal(ns["case"].arrays["x"], want.arrays["x"])


def test_a_user_file_named_like_a_stdlib_module_does_not_replace_it(tmp_path):
    import random
    import sys

    from refimpl.verify.cli import load_target
    (tmp_path / "random.py").write_text("def softmax(x):\n    return x\n")
    f = load_target(f"{tmp_path / 'random.py'}:softmax")
    assert f.__module__ != "random" and sys.modules["random"] is random
    assert 0 <= random.random() < 1


def test_assert_within_names_the_first_nonfinite_mismatch():
    from refimpl.verify.compare import assert_within
    want = np.array([1.0, 2.0, np.nan, np.inf, 5.0])
    got = np.array([1.0, 2.5, 3.0, np.inf, 5.0])          # element 1 is the max ratio, element 2 the NaN mismatch
    with pytest.raises(AssertionError) as e:
        assert_within(got, want, 1e-3)
    msg = str(e.value)
    assert "non-finite mismatch" in msg and "element (2,)" in msg and "oracle nan" in msg and "got 3.0" in msg
    assert "ratio 0" not in msg



def test_check_stays_the_function_after_its_first_call():
    """`refimpl.verify.check` was a lazy wrapper whose first call imported the submodule of the
    same name, which rebound the package's attribute: the next `from refimpl.verify import
    check` (a notebook cell run twice, `refimpl bench`'s edge-case pass) got the module.
    A fresh interpreter, since the first import is what rebinds."""
    import subprocess
    import sys
    code = ("from refimpl.verify import check\n"
            "from refimpl.kernels import registry\n"
            "assert check(registry.get('silu', 'numpy'), 'silu', examples=0).passed\n"
            "from refimpl.verify import check as again\n"
            "assert callable(again), type(again)\n"
            "assert again(registry.get('silu', 'numpy'), 'silu', examples=0).passed\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_cli_verify_reports_a_file_target_as_written(tmp_path, monkeypatch, capsys):
    from refimpl.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mykern.py").write_text("import numpy as np\n\ndef good(x):\n"
                                        "    e = np.exp(x - x.max(-1, keepdims=True))\n"
                                        "    return e / e.sum(-1, keepdims=True)\n")
    assert main(["verify", "mykern.py:good", "--op", "softmax", "--examples", "3", "--json", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "PASS refimpl verify: mykern.py:good as softmax" in out and "_refimpl_verify_target" not in out
    assert json.loads((tmp_path / "r.json").read_text())["impl"] == "mykern.py:good"
    assert main(["verify", "mykern.py:good", "--op", "softmax", "--json", "nonexist/r.json"]) == 2
    assert "--json nonexist/r.json: directory 'nonexist' does not exist" in capsys.readouterr().err


def test_cli_output_to_a_closed_pipe_or_a_full_disk(tmp_path):
    """`refimpl verify ... | head`: rich used to turn the closed pipe into exit 1 (FAIL) for a
    passing kernel and lose --json; now exit 141 with the report written.  A report that cannot
    be written (a full disk) is exit 2 naming --json, after the verdict is printed."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "refimpl", "verify", "refimpl.kernels.numpy_kernels:silu", "--op", "silu",
           "--examples", "3", "--json"]
    p = subprocess.Popen(cmd + [str(tmp_path / "r.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                   # the reader leaves before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err, err
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    if os.path.exists("/dev/full"):
        r = subprocess.run(cmd + ["/dev/full"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "PASS" in r.stdout, r.stdout + r.stderr
        assert "refimpl verify: error: --json /dev/full: [Errno 28]" in r.stderr and "Traceback" not in r.stderr


def test_an_implementation_that_exits_fails():
    """sys.exit(0) in the code under test ended `refimpl verify` with status 0 and no report."""
    import sys

    def leaves(x):
        sys.exit(0)
    rep = check(leaves, "silu", examples=0)
    assert not rep.passed and all("tried to exit the process (SystemExit: 0)" in c.error for c in rep.cases)


@pytest.mark.parametrize("op, params, err, match", [
    ("rms_norm", {"eps": float("nan")}, ValueError, "'eps' must be finite and >= 0, got nan"),
    ("rms_norm", {"eps": -1e30}, ValueError, "'eps' must be finite and >= 0"),
    ("layer_norm", {"eps": "1e-5"}, TypeError, "'eps' must be a real number"),
    ("attention", {"scale": float("inf")}, ValueError, "'scale' must be finite"),
    ("rope", {"theta": 0}, ValueError, "'theta' must be finite and > 0"),
    ("rope", {"interleaved": "yes"}, TypeError, "'interleaved' must be a bool"),
    ("attention", {"causal": 2}, TypeError, "'causal' must be a bool"),
])
def test_op_parameters_are_checked_by_name(op, params, err, match):
    """eps=nan made every bound NaN, and an all-NaN implementation passed."""
    with pytest.raises(err, match=match):
        check(lambda *a, **k: np.full_like(a[0], np.nan), op, examples=0, **params)


@pytest.mark.parametrize("op, impl", [
    ("rms_norm", lambda x, w, eps=1e-6: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w),
    ("layer_norm", lambda x, w, b, eps=1e-5: L.layer_norm(x.astype(np.float64), w, b, 1e-5).astype(np.float32)),
    ("rope", lambda x, positions, theta=10000.0, interleaved=False:
        L.rope(x.astype(np.float64), positions, 10000.0, interleaved).astype(np.float32)),
    ("rope", lambda x, positions, theta=10000.0, interleaved=False:
        L.rope(x.astype(np.float64), positions, theta, False).astype(np.float32)),
])
def test_a_parameter_taken_and_ignored_fails(op, impl):
    """eps, theta and interleaved were only ever passed at their defaults: an implementation that
    takes them and ignores them passed.  The edge cases alone catch it (rms_norm had none)."""
    assert not check(impl, op, examples=20).passed
    assert not check(impl, op, examples=0).passed


def test_silu_by_x_over_one_plus_exp_minus_x_passes_where_exp_overflows():
    """torch's float32 SiLU gives -0 for x in (-103, -88.7), where exp(-x) overflows and the true
    value is below 2.6e-37: silu_bound allows 0 there (and only there, only down from |ref|)."""
    def silu32(x):
        with np.errstate(over="ignore"):
            return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)
    assert check(silu32, "silu", examples=50).passed
    assert not check(lambda x: np.where(x < -88.75, np.float32(-1e-30), silu32(x)), "silu", examples=0).passed
    torch = require("torch")
    assert check(torch.nn.functional.silu, "silu", examples=50).passed


@pytest.mark.parametrize("value, words", [("nan", "must be finite and >= 0, got nan"), ("--nan", "got str '--nan'"),
                                          ("-1e30", "must be finite and >= 0"), ("abc", "got str 'abc'")])
def test_cli_names_a_bad_param_value_exit_2(value, words, capsys):
    """--param eps=nan crashed with NumPy's error; eps=--nan with float()'s (exit 1, a traceback)."""
    from refimpl.cli import main
    assert main(["verify", "refimpl.kernels.numpy_kernels:rms_norm", "--op", "rms_norm", "--param",
                 f"eps={value}", "--examples", "0"]) == 2
    assert words in capsys.readouterr().err
