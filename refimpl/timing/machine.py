"""The machine model: CPU, SIMD, peak FLOP per cycle, caches, measured bandwidths.

    describe(bandwidth=False) -> Machine     (cached per process)
    peak_table(uarch, flags, peak=None) -> ({dtype: FLOP per *core* cycle, one core}, source)
                                  (also describe().peak_flop_per_cycle)
    cache_sizes()              -> [{level, type, size, line, shared_cpus}] from sysfs
    measure_bandwidth()        -> {level: {"read": B/tick, "copy": B/tick, "bytes": test size,
                                           "capacity": cache size (None for DRAM)}}

Peak FLOP per core cycle (FMA = 2 FLOP), one core, by microarchitecture:

| uarch | fp32 | fp64 | why |
|---|---|---|---|
| zen4 | 32 | 16 | 2 x 256-bit FMA pipes; zmm FMA is double-pumped |
| zen5 | 64 | 32 | 2 x 512-bit FMA pipes (full-width AVX-512) |
| zen5-mobile (Strix Point, Krackan Point) | 32 | 16 | 2 x 256-bit FMA pipes; AVX-512 double-pumped |
| zen2, zen3 | 32 | 16 | 2 x 256-bit FMA pipes |
| zen1 | 16 | 8 | 2 x 128-bit FMA pipes |
| haswell .. comet lake (AVX2 client/server) | 32 | 16 | 2 x 256-bit FMA ports |
| skylake-x, cascade lake, ice lake server, sapphire / emerald / granite rapids | 64 | 32 | 2 x 512-bit FMA ports (Xeon Bronze, Silver and some Gold 5xxx parts have one: override) |
| ice lake / tiger lake client | 32 | 16 | 1 x 512-bit FMA port (or 2 x 256) |

Unknown CPUs fall back on the flags (avx512f or avx2+fma -> 32/16, avx -> 16/8,
sse2 -> 8/4, aarch64 asimd -> 16/8) and say so in `peak_source`.  Override with
the argument `peak={"float32": x, "float64": y}` or the environment variable
REFIMPL_PEAK_FLOPS="float32=32,float64=16".

Bandwidths are measured in C (`rf_bw_read`: a streaming sum of 64-bit words;
`rf_bw_copy`: vector loads and ordinary stores) on buffers sized to sit in each
level: L1 = L1d/2, L2 = L2/2, L3 = L3/8 (at least 2 x L2, at most L3/2), DRAM =
max(4 x L3, 128 MiB).  Read bandwidth counts the bytes read; copy bandwidth counts
bytes read + bytes written (2 x the copied size).  Units: bytes per TSC tick (best
of `trials`).  A roofline minimum is time >= bytes / bandwidth of the smallest
level whose capacity (the cache's size) holds the op's bytes, so each level's
figure must be the fastest a working set in that level gets: on this VM the L3
(32 MiB, shared with other tenants) read 34-38 B/tick at 2-10 MiB, 29 at 12, 26 at
16 and 15 at 24 MiB; at the former L3/2 test size a 9.4 MiB GEMV ran 12 % faster
than its "minimum".
"""
from __future__ import annotations

import glob
import math
import os
import platform
from dataclasses import asdict, dataclass, field

import numpy as np

from refimpl._clock import ffi, lib
from refimpl.kernels.buffers import aligned_empty
from refimpl.timing.counter import calibrate

# uarch -> (FMA pipes per core, FMA datapath width in bits); peak FLOP per core
# cycle = pipes x (bits / element bits) x 2 (an FMA is a multiply and an add)
FMA_TABLE = {
    "zen1": (2, 128), "zen2": (2, 256), "zen3": (2, 256), "zen4": (2, 256), "zen5": (2, 512),
    "zen5-mobile": (2, 256),   # Strix Point, Krackan Point: AVX-512 on 256-bit datapaths
    "haswell": (2, 256), "broadwell": (2, 256), "skylake": (2, 256),
    "skylake-x": (2, 512), "cascadelake": (2, 512), "icelake-server": (2, 512),
    "sapphirerapids": (2, 512), "graniterapids": (2, 512), "icelake-client": (1, 512),
}


def fma_peak(pipes: int, bits: int) -> tuple[float, float]:
    """(fp32, fp64) FLOP per core cycle of `pipes` FMA units `bits` wide."""
    return 2.0 * pipes * bits / 32, 2.0 * pipes * bits / 64


PEAK_TABLE = {k: fma_peak(*v) for k, v in FMA_TABLE.items()}   # uarch -> (fp32, fp64)

# Intel family 6 model numbers
_INTEL = {
    "haswell": {0x3C, 0x3F, 0x45, 0x46}, "broadwell": {0x3D, 0x47, 0x4F, 0x56},
    "skylake": {0x4E, 0x5E, 0x8E, 0x9E, 0xA5, 0xA6}, "skylake-x": {0x55},
    "icelake-server": {0x6A, 0x6C}, "icelake-client": {0x7D, 0x7E, 0x8C, 0x8D},
    "sapphirerapids": {0x8F, 0xCF}, "graniterapids": {0xAD, 0xAE},
}


def cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor block of /proc/cpuinfo as {key: value} ({} if unreadable)."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                k, _, v = line.partition(":")
                out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def microarch(vendor: str, family: int | None, model: int | None) -> str | None:
    """Name of the microarchitecture from cpuid family/model (None if unknown)."""
    if family is None or model is None:
        return None
    if vendor == "AuthenticAMD":
        if family == 0x17:
            return "zen2" if model >= 0x30 else "zen1"
        if family == 0x19:
            if model <= 0x0F or 0x20 <= model <= 0x5F:
                return "zen3"
            return "zen4"   # 0x10-0x1F Genoa, 0x60-0x7F Raphael/Phoenix, 0xA0-0xAF Bergamo
        if family == 0x1A:   # 0x20-0x2F Strix Point, 0x60-0x6F Krackan Point: the mobile parts
            return "zen5-mobile" if 0x20 <= model <= 0x2F or 0x60 <= model <= 0x6F else "zen5"
    if vendor == "GenuineIntel" and family == 6:
        for name, models in _INTEL.items():
            if model in models:
                return name
    return None


def simd_bits(flags) -> int:
    flags = set(flags)
    if "avx512f" in flags:
        return 512
    if "avx2" in flags or "avx" in flags:
        return 256
    if "sse2" in flags or "asimd" in flags or platform.machine() == "aarch64":
        return 128
    return 0


def _parse_override(text: str) -> dict:
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in ("float32", "float64"):
            raise ValueError(f"REFIMPL_PEAK_FLOPS: unknown dtype {k!r} (use float32=..,float64=..)")
        try:
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"REFIMPL_PEAK_FLOPS: {part.strip()!r} must be dtype=number "
                             "(e.g. float32=32,float64=16)") from None
        if not (math.isfinite(out[k]) and out[k] > 0):
            raise ValueError(f"REFIMPL_PEAK_FLOPS: {k} must be a finite number > 0, got {v!r}")
    return out


def peak_table(uarch, flags, peak: dict | None = None) -> tuple[dict, str]:
    """({dtype: FLOP per core cycle}, where the numbers come from)."""
    flags = set(flags)
    if uarch in PEAK_TABLE:
        f32, f64 = PEAK_TABLE[uarch]
        pipes, bits = FMA_TABLE[uarch]
        src = f"table ({uarch}: {pipes} x {bits}-bit FMA)"
    elif "avx512f" in flags or ("avx2" in flags and "fma" in flags):
        f32, f64, src = 32, 16, "flags heuristic (2 x 256-bit FMA assumed)"
    elif "avx" in flags:
        f32, f64, src = 16, 8, "flags heuristic (AVX, separate add and mul pipes)"
    elif "asimd" in flags or platform.machine() == "aarch64":
        f32, f64, src = 16, 8, "flags heuristic (2 x 128-bit NEON FMA assumed)"
    else:
        f32, f64, src = 8, 4, "flags heuristic (SSE2)"
    out = {"float32": float(f32), "float64": float(f64)}
    env = os.environ.get("REFIMPL_PEAK_FLOPS")
    if env:
        out.update(_parse_override(env))
        src = f"REFIMPL_PEAK_FLOPS={env}"
    if peak:
        for k, v in peak.items():
            if (k not in out or not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool)
                    or not (math.isfinite(v) and v > 0)):
                raise ValueError(f"peak: expected {{'float32'|'float64': a finite number > 0}}, got {peak!r}")
            out[k] = float(v)
        src = "argument"
    return out, src


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in mult:
        return int(text[:-1]) * mult[text[-1]]
    return int(text)


def cache_sizes(cpu: int = 0) -> list[dict]:
    """Data/unified caches of `cpu` from sysfs: [{level, type, size, line, shared_cpus}]."""
    out = []
    for d in sorted(glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/cache/index*")):
        try:
            rd = lambda n: open(os.path.join(d, n)).read().strip()  # noqa: E731
            typ = rd("type")
            if typ == "Instruction":
                continue
            out.append({"level": int(rd("level")), "type": typ, "size": _size(rd("size")),
                        "line": int(rd("coherency_line_size")) if os.path.exists(os.path.join(d, "coherency_line_size")) else 64,
                        "shared_cpus": rd("shared_cpu_list") if os.path.exists(os.path.join(d, "shared_cpu_list")) else ""})
        except (OSError, ValueError):
            continue
    return out


def _aligned(nbytes: int) -> np.ndarray:
    """`nbytes` zero bytes starting on a cache line, every page touched."""
    buf = aligned_empty(nbytes, np.uint8)
    buf[...] = 0
    return buf


def level_sizes(caches=None) -> dict:
    """Test working-set size per level: L1 = L1d/2, L2 = L2/2, L3 = L3/8 clamped to
    [2 x L2, L3/2], DRAM = max(4 L3, 128 MiB)."""
    caches = cache_sizes() if caches is None else caches
    by = {c["level"]: c["size"] for c in caches}
    out = {}
    for lv in (1, 2):
        if lv in by:
            out[f"L{lv}"] = by[lv] // 2
    if 3 in by:
        out["L3"] = min(by[3] // 2, max(by[3] // 8, 2 * by.get(2, 0)))
    last = max(by.values(), default=8 << 20)
    out["DRAM"] = max(4 * last, 128 << 20)
    return {k: max(4096, v - v % 256) for k, v in out.items()}


_BW: dict | None = None


def measure_bandwidth(trials: int = 3, target_bytes: int = 64 << 20, force: bool = False) -> dict:
    """{level: {"bytes": test working set, "capacity": the cache's size (None for DRAM),
    "read": B/tick, "copy": B/tick}} (cached per process)."""
    global _BW
    if _BW is not None and not force:
        return _BW
    out = {}
    sink = ffi.new("uint64_t *")
    capacity = {f"L{c['level']}": c["size"] for c in cache_sizes()}
    for level, size in level_sizes().items():
        buf = _aligned(size)
        buf[:] = 1
        half = size // 2 - (size // 2) % 256
        dst = _aligned(half)
        dst[:] = 0
        passes = max(1, math.ceil(target_bytes / size))
        if level == "DRAM":
            passes = 1
        p = ffi.cast("void *", buf.ctypes.data)
        q = ffi.cast("void *", dst.ctypes.data)
        lib.rf_bw_read(sink, p, size, 1)                 # warm: fault pages, fill caches
        lib.rf_bw_copy(q, p, half, 1)
        rd = min(int(lib.rf_bw_read(sink, p, size, passes)) for _ in range(trials))
        cp = min(int(lib.rf_bw_copy(q, p, half, passes)) for _ in range(trials))
        out[level] = {"bytes": size, "capacity": capacity.get(level), "read": size * passes / rd,
                      "copy": 2 * half * passes / cp}
    _BW = out
    return out


def dram_copy_bandwidth(trials: int = 3) -> float:
    """Copy bandwidth at the DRAM working set, B/tick (bytes read + written), measured now (not cached):
    for ratios against a memory-bound kernel timed right after it, under the same load."""
    size = level_sizes()["DRAM"]
    half = size // 2 - (size // 2) % 256
    src, dst = _aligned(half), _aligned(half)
    src[:] = 1
    dst[:] = 0
    p, q = ffi.cast("void *", src.ctypes.data), ffi.cast("void *", dst.ctypes.data)
    lib.rf_bw_copy(q, p, half, 1)                        # fault the pages in
    return 2 * half / min(int(lib.rf_bw_copy(q, p, half, 1)) for _ in range(trials))


def blas_info() -> list[dict]:
    """threadpoolctl's view of the BLAS/OpenMP libraries loaded (numpy's BLAS included)."""
    try:
        from threadpoolctl import threadpool_info
        keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
        return [{k: d.get(k) for k in keep} for d in threadpool_info()]
    except Exception as e:  # pragma: no cover - threadpoolctl is a dependency
        return [{"error": str(e)}]


@dataclass
class Machine:
    cpu_model: str
    vendor: str
    family: int | None
    model: int | None
    stepping: int | None
    uarch: str | None
    flags: list
    simd_bits: int
    fma_pipes: int | None          # from the uarch table (None: unknown uarch)
    fma_bits: int | None
    bw_simd_bits: int
    n_cpus: int
    peak_flop_per_cycle: dict      # {dtype: FLOP per core cycle}
    peak_source: str
    caches: list
    counter: str
    tsc_hz: float
    core_per_tsc: float
    overhead_ticks: int
    granularity_ticks: int
    perf_available: bool
    perf_reason: str
    blas: list
    bandwidth: dict = field(default_factory=dict)   # {level: {bytes, capacity, read, copy}}: B/tick
    cpu_ids: bool = True           # the counter's stops read the cpu id (Calibration.cpu_ids)

    def peak_flop_per_tick(self, dtype="float32") -> float:
        """Peak FLOP per TSC tick = per core cycle x core/TSC."""
        return self.peak_flop_per_cycle[str(np.dtype(dtype))] * self.core_per_tsc

    def bandwidth_for(self, nbytes: float, kind: str = "best") -> tuple[str, float]:
        """(level, B/tick) of the smallest level whose capacity (its cache's size) holds `nbytes`.

        kind "read", "copy", or "best" = the larger of the two (the optimistic
        roof: an op's traffic is a mix of streaming reads and writes)."""
        if not self.bandwidth:
            return "none", math.inf
        pick = (lambda d: max(d["read"], d["copy"])) if kind == "best" else (lambda d: d[kind])
        for lv, d in self.bandwidth.items():
            # a report without capacities (older JSON) tested each level at half its size
            if nbytes <= (d.get("capacity") or 2 * d["bytes"]):
                return lv, pick(d)
        lv = list(self.bandwidth)[-1]
        return lv, pick(self.bandwidth[lv])

    def as_dict(self) -> dict:
        return asdict(self)


_MACHINE: dict = {}


def describe(bandwidth: bool = False, peak: dict | None = None) -> Machine:
    """The machine model (cached per process; bandwidths only when asked, they take ~0.5 s)."""
    key = (bandwidth, tuple(sorted((peak or {}).items())))
    if key in _MACHINE:
        return _MACHINE[key]
    info = cpuinfo()
    flags = (info.get("flags") or info.get("Features") or "").split()
    vendor = info.get("vendor_id", info.get("CPU implementer", ""))

    def _int(k):
        try:
            return int(info[k], 0)
        except (KeyError, ValueError):
            return None
    family, model, stepping = _int("cpu family"), _int("model"), _int("stepping")
    ua = microarch(vendor, family, model)
    pk, src = peak_table(ua, flags, peak)
    cal = calibrate()
    m = Machine(cpu_model=info.get("model name", platform.processor() or platform.machine()),
                vendor=vendor, family=family, model=model, stepping=stepping, uarch=ua, flags=flags,
                simd_bits=simd_bits(flags), fma_pipes=FMA_TABLE.get(ua, (None, None))[0],
                fma_bits=FMA_TABLE.get(ua, (None, None))[1], bw_simd_bits=int(lib.rf_bw_simd_bits()),
                n_cpus=os.cpu_count() or 1, peak_flop_per_cycle=pk, peak_source=src,
                caches=cache_sizes(), counter=cal.counter, tsc_hz=cal.tsc_hz,
                core_per_tsc=cal.core_per_tsc, overhead_ticks=cal.overhead_ticks,
                granularity_ticks=cal.granularity_ticks, perf_available=cal.perf_available,
                perf_reason=cal.perf_reason, blas=blas_info(),
                bandwidth=measure_bandwidth() if bandwidth else {}, cpu_ids=cal.cpu_ids)
    _MACHINE[key] = m
    return m
