"""C functions in a user's shared library: conventions, guard zones, the CLI."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from refimpl.verify import check
from refimpl.verify.cabi import GuardViolation, SignatureError, load_c, parse_signature

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a test library")

SRC = r"""
#include <math.h>
/* C (M,N) = A (M,K) @ B (K,N), row-major */
void sgemm_ok(float* c, const float* a, const float* b, int M, int K, int N) {
  for (int i = 0; i < M; i++) for (int j = 0; j < N; j++) { float s = 0;
    for (int k = 0; k < K; k++) s += a[i*K + k] * b[k*N + j]; c[i*N + j] = s; } }
/* bug: reads one element past the end of each row of A (k <= K) */
void sgemm_row_overread(float* c, const float* a, const float* b, int M, int K, int N) {
  for (int i = 0; i < M; i++) for (int j = 0; j < N; j++) { float s = 0;
    for (int k = 0; k <= K; k++) s += a[i*K + k] * (k < K ? b[k*N + j] : 1.0f); c[i*N + j] = s; } }
/* bug: writes one element past the end of C */
void sgemm_overwrite(float* c, const float* a, const float* b, int M, int K, int N) {
  sgemm_ok(c, a, b, M, K, N); c[M*N] = 0.0f; }
/* the other size order, named */
void sgemm_mnk(float* c, const float* a, const float* b, int M, int N, int K) { sgemm_ok(c, a, b, M, K, N); }
/* const-correctness violation: scribbles on its input */
void sgemm_clobber(float* c, float* a, float* b, int M, int K, int N) { sgemm_ok(c, a, b, M, K, N); a[0] = 42; }
/* llama2.c run.c conventions */
void matmul(float* xout, float* x, float* w, int n, int d) {
  for (int i = 0; i < d; i++) { float v = 0; for (int j = 0; j < n; j++) v += w[i*n + j] * x[j]; xout[i] = v; } }
void softmax(float* x, int size) { float m = x[0]; for (int i = 1; i < size; i++) if (x[i] > m) m = x[i];
  float s = 0; for (int i = 0; i < size; i++) { x[i] = expf(x[i] - m); s += x[i]; }
  for (int i = 0; i < size; i++) x[i] /= s; }
void rmsnorm(float* o, float* x, float* weight, int size) { float ss = 0;
  for (int j = 0; j < size; j++) ss += x[j]*x[j]; ss /= size; ss += 1e-5f; ss = 1.0f / sqrtf(ss);
  for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]); }
void silu_d(double* out, const double* x, int n) { for (int i = 0; i < n; i++) out[i] = x[i] / (1.0 + exp(-x[i])); }
/* attention with GQA and a causal flag: out[H,Lq,D] */
void attn(float* out, const float* q, const float* k, const float* v, int H, int Hkv, int Lq, int Lk, int D,
          int causal) {
  float sc = 1.0f / sqrtf((float)D); float p[1024];
  for (int h = 0; h < H; h++) { int g = h / (H / Hkv);
    for (int t = 0; t < Lq; t++) { float m = -INFINITY; int lim = causal ? Lk - Lq + t : Lk - 1;
      for (int s = 0; s <= lim; s++) { float d = 0;
        for (int i = 0; i < D; i++) d += q[(h*Lq + t)*D + i] * k[(g*Lk + s)*D + i];
        p[s] = d * sc; if (p[s] > m) m = p[s]; }
      float sum = 0; for (int s = 0; s <= lim; s++) { p[s] = expf(p[s] - m); sum += p[s]; }
      for (int i = 0; i < D; i++) { float o = 0; for (int s = 0; s <= lim; s++) o += p[s] * v[(g*Lk + s)*D + i];
        out[(h*Lq + t)*D + i] = o / sum; } } } }
"""
GEMM = "void(float*, const float*, const float*, int, int, int)"
CRASH = """
void sgemm_crash(float* c, const float* a, const float* b, int M, int K, int N) {
  volatile float* nowhere = (volatile float*)0; c[0] = nowhere[M];   /* a bad pointer: SIGSEGV */
}
void exit(int);
void sgemm_exit0(float* c, const float* a, const float* b, int M, int K, int N) { exit(0); }
int fork(void);
unsigned sleep(unsigned);
void _exit(int);
int close(int);
static int forked;
void sgemm_fork(float* c, const float* a, const float* b, int M, int K, int N) {
  /* a helper process left running, holding every fd but stdout / stderr (the test's own pipes) */
  if (!forked) { forked = 1; if (fork() == 0) { close(1); close(2); sleep(60); _exit(0); } }
  sgemm_ok(c, a, b, M, K, N);
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("clib")
    (d / "mine.c").write_text(SRC + CRASH)
    so = d / "libmine.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(so), str(d / "mine.c"), "-lm"], check=True)
    return str(so)


def test_correct_sgemm_passes(lib):
    f = load_c(lib, "sgemm_ok", GEMM, "matmul")
    assert "int -> size M, int -> size K, int -> size N" in f.describe()
    rep = check(f, "matmul", examples=20)
    assert rep.passed, rep.text()


def test_reading_one_past_the_end_of_a_row_is_caught(lib):
    rep = check(load_c(lib, "sgemm_row_overread", GEMM, "matmul"), "matmul", examples=20)
    assert not rep.passed
    # the last row reads A's guard zone (NaN): a non-finite mismatch; other rows read the next row: wrong values
    assert any(c.stats and c.stats.nonfinite_mismatches for c in rep.failures)
    assert rep.cases[-1].example.count("np.array") == 2      # shrunk to a pasteable pair of matrices


def test_writing_past_the_output_is_caught(lib):
    f = load_c(lib, "sgemm_overwrite", GEMM, "matmul")
    with pytest.raises(GuardViolation, match="wrote past the end of its output"):
        f(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))
    rep = check(f, "matmul", examples=5)
    assert not rep.passed and all("GuardViolation" in c.error for c in rep.cases)


def test_modifying_an_input_is_caught(lib):
    f = load_c(lib, "sgemm_clobber", "void(float*, float*, float*, int, int, int)", "matmul")
    with pytest.raises(GuardViolation, match="modified its input"):
        f(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))


def test_named_sizes_reorder(lib):
    f = load_c(lib, "sgemm_mnk", "void(float* C, const float* A, const float* B, int M, int N, int K)", "matmul")
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(f(a, b), a @ b)


@pytest.mark.parametrize("symbol,sig,op,params", [
    ("matmul", "void matmul(float* xout, float* x, float* w, int n, int d)", "matmul", {}),
    ("softmax", "void(float* x, int size)", "softmax", {}),
    ("rmsnorm", "void(float* o, float* x, float* weight, int size)", "rms_norm", {"eps": 1e-5}),
    ("silu_d", "void(double*, const double*, int)", "silu", {}),
    ("attn", "void(float* out, const float* q, const float* k, const float* v, int H, int Hkv, int Lq, int Lk, "
             "int D, int causal)", "attention", {}),
])
def test_llama2c_and_other_conventions_pass(lib, symbol, sig, op, params):
    f = load_c(lib, symbol, sig, op)
    rep = check(f, op, examples=15, **params)
    assert rep.passed, rep.text()
    if symbol == "silu_d":
        assert rep.dtype == "float64"
    if symbol == "attn":
        assert any(c.name.startswith("causal") for c in rep.cases)


def test_llama2c_rmsnorm_eps_is_a_convention(lib):
    f = load_c(lib, "rmsnorm", "void(float* o, float* x, float* weight, int size)", "rms_norm")
    rep = check(f, "rms_norm", examples=0)       # contract default eps 1e-6, the C code uses 1e-5
    assert not rep.passed
    assert "tiny row (eps dominates)" in {c.name for c in rep.failures}


@pytest.mark.parametrize("args,exc,match", [
    ((np.ones((2, 2), np.float32), np.ones((1, 2), np.float32)), ValueError, "inner sizes 2 != 1"),
    ((np.ones((1, 4_000_000), np.float32), np.ones((2, 2), np.float32)), ValueError, "inner sizes"),  # segfaulted
    ((np.ones(4, np.float32), np.ones(4, np.float32)), ValueError, "'a' must be 2-D"),
    ((np.ones((3, 4)), np.ones((4, 2))), TypeError, "'a' has dtype float64, expected float32"),   # was cast
    ((np.ones((3, 4), np.float32),), TypeError, "takes 2 array\\(s\\) \\(a, b\\), got 1"),
])
def test_a_wrapped_c_function_checks_its_arrays_before_the_call(lib, args, exc, match):
    """The matmul wrapper passed the sizes of a's shape and b's columns unchecked: a 2x2 @ 1x2
    came back all NaN (the guard zone read), 3x4 @ 5x2 gave a 3x2 result, 1x4000000 @ 2x2 crashed."""
    f = load_c(lib, "sgemm_ok", GEMM, "matmul")
    with pytest.raises(exc, match=match):
        f(*args)


def test_a_wrapped_c_function_checks_every_op_s_shapes(lib, tmp_path):
    import pathlib
    f = load_c(pathlib.Path(lib), "rmsnorm", "void(float* o, float* x, float* weight, int size)", "rms_norm")
    with pytest.raises(ValueError, match="'w' has shape \\(3,\\), expected \\(4,\\)"):
        f(np.ones((2, 4), np.float32), np.ones(3, np.float32))
    g = load_c(lib, "attn", "void(float* out, const float* q, const float* k, const float* v, int H, int Hkv, "
                            "int Lq, int Lk, int D, int causal)", "attention")
    q, kv = np.ones((4, 3, 8), np.float32), np.ones((2, 5, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        g(q, np.ones((3, 5, 8), np.float32), np.ones((3, 5, 8), np.float32))
    with pytest.raises(ValueError, match="causal needs Lq <= Lk"):
        g(np.ones((4, 6, 8), np.float32), kv, kv, causal=True)
    assert g(q, kv, kv).shape == q.shape


def test_signature_errors(lib):
    with pytest.raises(SignatureError, match="pointers to pointers"):
        parse_signature("void(float**, int)")
    with pytest.raises(SignatureError, match="return type"):
        parse_signature("float*(float*, int)")
    with pytest.raises(SignatureError, match="float pointers"):
        load_c(lib, "sgemm_ok", "void(float*, const float*, int, int, int)", "matmul")
    with pytest.raises(SignatureError, match="integer sizes"):
        load_c(lib, "sgemm_ok", "void(float*, const float*, const float*, int)", "matmul")
    with pytest.raises(AttributeError, match="not found"):
        load_c(lib, "no_such_fn", GEMM, "matmul")
    with pytest.raises(FileNotFoundError):
        load_c(lib + ".missing", "sgemm_ok", GEMM, "matmul")
    with pytest.raises(SignatureError, match="fit no convention"):
        load_c(lib, "attn", "void(float*, const float*, const float*, const float*, int H, int H, int D)", "attention")
    # named sizes pick the convention: 3 sizes + a causal flag = one head per call
    f = load_c(lib, "attn", "void(float* o, const float* q, const float* k, const float* v, int Lq, int Lk, int D, "
                            "int causal)", "attention")
    assert "int causal -> causal flag" in f.describe() and f.refimpl_accepts == {"causal"}
    ret, ps = parse_signature("int my_fn(const float * restrict a, unsigned int n, long long m)")
    assert ret == "int" and [p.base for p in ps] == ["float", "unsigned int", "long long"]
    assert ps[0].const and ps[0].pointer and ps[0].name == "a"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_verify_c_exit_codes(lib, tmp_path):
    ok = _cli("verify", "--lib", lib, "--symbol", "sgemm_ok", "--signature", GEMM, "--op", "matmul",
              "--examples", "10", "--json", str(tmp_path / "r.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and (tmp_path / "r.json").exists()
    bad = _cli("verify", "--lib", lib, "--symbol", "sgemm_row_overread", "--signature", GEMM, "--op", "matmul",
               "--examples", "10")
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    usage = _cli("verify", "--lib", lib, "--symbol", "sgemm_ok", "--signature", "void(float**)", "--op", "matmul")
    assert usage.returncode == 2 and "pointers to pointers" in usage.stderr
    missing = _cli("verify", "--lib", lib, "--op", "matmul")
    clash = _cli("verify", "--lib", lib, "--symbol", "sgemm_ok", "--signature", GEMM, "--op", "matmul",
                 "--dtype", "float64")             # was FAIL (exit 1) with a TypeError in every case
    assert clash.returncode == 2 and "dtype float64 conflicts with the function's own float32" in clash.stderr
    assert missing.returncode == 2
    crash = _cli("verify", "--lib", lib, "--symbol", "sgemm_crash", "--signature", GEMM, "--op", "matmul",
                 "--examples", "5")
    assert crash.returncode == 1 and "crashed the check with SIGSEGV" in crash.stderr, crash.stderr
    gone = _cli("verify", "--lib", lib, "--symbol", "sgemm_exit0", "--signature", GEMM, "--op", "matmul",
                "--examples", "5")     # exit(0) in the function: read as a pass (status 0, no report)
    assert gone.returncode == 1 and "ended the check's process with exit status 0" in gone.stderr, gone.stderr
    # a process the function starts keeps the report pipe open: the verifier waited for it (60 s here)
    kept = _cli("verify", "--lib", lib, "--symbol", "sgemm_fork", "--signature", GEMM, "--op", "matmul",
                "--examples", "5", timeout=30)
    assert kept.returncode == 0 and "PASS" in kept.stdout, kept.stdout + kept.stderr
