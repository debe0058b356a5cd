"""Dev script: the C float32 matmul against NumPy (OpenBLAS), 1 thread, warm cache, one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/matmul_tune.py [--paths avx512,avx2]

M = rows of a, K = inner size, N = columns of b.  Every shape is first checked
against the float64 oracle under contracts.matmul_bound, then timed:
  numpy  : min over samples of one `a @ b` call (fenced TSC reads around the Python call)
  c call : the same for refimpl.kernels.get("matmul", "c")(a, b)
  c loop : min over samples of rf_time_thunk(prepare(a, b)) / reps (no Python in the region)
speed ratio = numpy time / C time (>= 1: C is faster).  FLOP = 2 M K N; peak
per TSC tick = 32 FLOP/core cycle x core/TSC (measured here by an add chain).
Samples of numpy and C alternate, so drift and noise hit both alike.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import threadpoolctl

from refimpl._clock import ffi as cffi_clock, lib as clock
from refimpl.kernels import get
from refimpl.kernels import c_matmul as cm
from refimpl.kernels.cdispatch import forced_path
from refimpl.kernels.contracts import matmul_bound
from refimpl.verify.compare import assert_within

SHAPES = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (128, 768, 768), (1, 768, 3072),
          (2, 768, 3072), (4, 768, 3072), (1, 4096, 4096),
          (1, 768, 768), (1, 3072, 768), (8, 768, 768), (37, 301, 129)]
PEAK_PER_CORE_CYCLE = 32.0


def core_per_tsc() -> float:
    """Core cycles per TSC tick: a dependent 1-cycle add chain at n and 2n adds."""
    n = 4_000_000
    t1 = min(clock.rf_add_chain_ticks(n) for _ in range(15))
    t2 = min(clock.rf_add_chain_ticks(2 * n) for _ in range(15))
    return n / (t2 - t1)


def ticks_of_call(fn) -> int:
    cpu = cffi_clock.new("int32_t *")
    t0 = clock.rf_ticks_start()
    fn()
    return clock.rf_ticks_stop(cpu) - t0


def ticks_of_thunk(call, reps) -> float:
    c0, c1 = cffi_clock.new("int32_t *"), cffi_clock.new("int32_t *")
    fn = cffi_clock.cast("void (*)(void *)", call.fn_addr)
    ctx = cffi_clock.cast("void *", call.ctx_addr)
    return clock.rf_time_thunk(fn, ctx, reps, c0, c1) / reps


def bench(shape, samples, path):
    M, K, N = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    mm = get("matmul", "c")
    with forced_path(path):
        assert_within(mm(a, b), a.astype(np.float64) @ b.astype(np.float64),
                      matmul_bound(a, b, np.float32), f"matmul {shape} on {path}")
        call = cm.prepare(a, b)
        flop = 2.0 * M * K * N
        reps = max(1, int(2e7 / max(flop, 1.0)))
        for _ in range(3):   # warm up both
            a @ b
            mm(a, b)
            call.run()
        t_np, t_c, t_loop = [], [], []
        for _ in range(samples):
            t_np.append(ticks_of_call(lambda: a @ b))
            t_c.append(ticks_of_call(lambda: mm(a, b)))
            t_loop.append(ticks_of_thunk(call, reps))
    return flop, min(t_np), min(t_c), min(t_loop)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default="avx512", help="comma-separated SIMD paths to run (avx512,avx2,portable)")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--cpu", type=int, default=None, help="pin to this cpu (default: the current one)")
    args = ap.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})
    threadpoolctl.threadpool_limits(1)
    info = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    ratio = core_per_tsc()
    peak = PEAK_PER_CORE_CYCLE * ratio
    print(f"pinned to cpu {cpu}; OpenBLAS: " + ", ".join(
        f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} threads={i.get('num_threads')}"
        for i in info))
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')}")
    print(f"core/TSC = {ratio:.3f}  ->  fp32 peak {peak:.1f} FLOP per TSC tick")
    for path in args.paths.split(","):
        with forced_path(path) as got:
            if got != path:
                print(f"[{path}: not runnable here, skipped]")
                continue
            print(f"\npath {path}  blocking {cm.blocking()}")
        print(f"{'M x K x N':>18} {'numpy us':>9} {'C call us':>9} {'C loop us':>9} "
              f"{'speed C/np':>10} {'loop/np':>8} {'C FLOP/tick':>11} {'% peak':>7} {'np FLOP/tick':>12}")
        tsc_hz = 2.596e9 if not hasattr(clock, "rf_tsc_hz") else clock.rf_tsc_hz()
        for shape in SHAPES:
            flop, t_np, t_c, t_loop = bench(shape, args.samples, path)
            us = lambda t: t / tsc_hz * 1e6  # noqa: E731
            print(f"{'x'.join(map(str, shape)):>18} {us(t_np):9.1f} {us(t_c):9.1f} {us(t_loop):9.1f} "
                  f"{t_np / t_c:10.3f} {t_np / t_loop:8.3f} {flop / t_loop:11.1f} "
                  f"{100 * flop / t_loop / peak:6.1f}% {flop / t_np:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
