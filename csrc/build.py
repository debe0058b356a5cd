"""cffi builders for refimpl's two native modules (out-of-line API mode).

Each module is one folder of C sources.  Every public header in the folder
(``*.h`` not starting with ``_``) is both ``#include``d by the generated module
and fed to ``ffi.cdef`` after its preprocessor lines are dropped, so a header
is the single statement of that part of the C API.  Headers starting with
``_`` are private (SIMD helpers, inline functions).

Flags: portable ``-O3`` only.  SIMD variants use per-function
``__attribute__((target(...)))`` and are chosen at run time by cpuid, so the
default build never needs ``-march=native``.

Environment:
  REFIMPL_SANITIZE=1   build with -fsanitize=address,undefined (see scripts/sanitize.sh)
  REFIMPL_CFLAGS="..." extra compiler flags appended (for experiments)

Run ``python csrc/build.py`` from the repository root to rebuild both modules
in place (into ``refimpl/``) during development.
"""
import glob
import os
import re
import shlex
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _public_headers(folder):
    return sorted(h for h in glob.glob(os.path.join(HERE, folder, "*.h"))
                  if not os.path.basename(h).startswith("_"))


def _cdef_text(header):
    """The header minus preprocessor lines and comments: what cffi can parse."""
    with open(header, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _flags():
    cflags = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-Wall",
              "-Wno-unused-function"]
    ldflags = []
    if os.environ.get("REFIMPL_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined"]
        cflags = [f for f in cflags if f != "-O3"] + ["-O1", "-g"] + san
        ldflags += san
    cflags += shlex.split(os.environ.get("REFIMPL_CFLAGS", ""))
    return cflags, ldflags


def _builder(module, folder, absolute=False):
    rel = (lambda p: p) if absolute else (lambda p: os.path.relpath(p, ROOT))
    ffi = FFI()
    headers = _public_headers(folder)
    for h in headers:
        ffi.cdef(_cdef_text(h))
    sources = sorted(glob.glob(os.path.join(HERE, folder, "*.c")))
    cflags, ldflags = _flags()
    ffi.set_source(
        module,
        "\n".join(f'#include "{os.path.basename(h)}"' for h in headers),
        # setuptools wants paths relative to setup.py's folder
        sources=[rel(s) for s in sources],
        include_dirs=[rel(os.path.join(HERE, folder)), rel(HERE)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        libraries=["m"],
    )
    return ffi


kernels_ffi = _builder("refimpl._kernels", "kernels")
clock_ffi = _builder("refimpl._clock", "clock")


if __name__ == "__main__":
    # In-place development build: python csrc/build.py [kernels|clock]
    os.chdir(ROOT)
    wanted = sys.argv[1:] or ["kernels", "clock"]
    for name, module in (("kernels", "refimpl._kernels"), ("clock", "refimpl._clock")):
        if name in wanted:
            ffi = _builder(module, name, absolute=True)  # ffi.compile changes directory
            tmp = os.path.join(ROOT, "build", f"cffi-{name}-{os.getpid()}")
            out = ffi.compile(tmpdir=tmp, verbose=False)
            dest = os.path.join(ROOT, "refimpl", os.path.basename(out))
            os.replace(out, dest)
            print("built", os.path.relpath(dest, ROOT))
