#!/usr/bin/env bash
# Sanitizer lane for refimpl's C kernels.
#
#   scripts/sanitize.sh [extra pytest args]
#   env: PYTHON=/path/to/python (default python3), REFIMPL_SANITIZE_TESTS="tests/x.py ..." (default
#        tests/test_kernels_c_*.py), REFIMPL_SANITIZE_IN_PLACE=1 (see 5.)
#
# 1. copies the working tree (sources and tests, no .git / build / built .so) to a temporary folder,
#    so the in-place development build in refimpl/ is never replaced while others use it;
# 2. builds both native modules there with REFIMPL_SANITIZE=1 (-O1 -g -fsanitize=address,undefined
#    -fno-sanitize-recover=undefined, see csrc/build.py);
# 3. runs the C-kernel tests (tests/test_kernels_c_*.py) against that build with libasan preloaded
#    into Python, output not captured (-s) so a report that aborts the run is still printed
#    (ASAN_OPTIONS=detect_leaks=0: CPython's own allocations are not leaks of ours;
#    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1; PYTHONMALLOC=malloc so ASan sees every buffer);
# 4. fails (exit 1) on any AddressSanitizer / UndefinedBehaviorSanitizer report or test failure;
# 5. removes the temporary copy: the normal (unsanitized) library in refimpl/ is untouched, so there
#    is nothing to rebuild.  With REFIMPL_SANITIZE_IN_PLACE=1 it builds and tests in the working tree
#    instead and rebuilds the normal library at the end, whatever the outcome.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
CC_BIN=${CC:-gcc}

ASAN_LIB=$("$CC_BIN" -print-file-name=libasan.so)
if [[ ! -e "$ASAN_LIB" ]]; then
    echo "sanitize.sh: libasan.so not found ($CC_BIN -print-file-name=libasan.so gave '$ASAN_LIB')" >&2
    exit 2
fi

if [[ "${REFIMPL_SANITIZE_IN_PLACE:-0}" == 1 ]]; then
    WORK=$ROOT
    cleanup() { (cd "$ROOT" && "$PY" csrc/build.py >/dev/null && echo "sanitize.sh: rebuilt the normal library"); }
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/refimpl-sanitize.XXXXXX")
    cleanup() { rm -rf "$WORK"; }
    tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude=__pycache__ \
        --exclude=.hypothesis --exclude=.pytest_cache -cf - . | tar -C "$WORK" -xf -
fi
trap cleanup EXIT

cd "$WORK" || exit 2
echo "sanitize.sh: building with -fsanitize=address,undefined in $WORK"
if ! REFIMPL_SANITIZE=1 "$PY" csrc/build.py kernels clock; then
    echo "sanitize.sh: sanitized build failed" >&2
    exit 1
fi

LOG="$WORK/.sanitize.log"
[[ "$WORK" == "$ROOT" ]] && LOG=$(mktemp "${TMPDIR:-/tmp}/refimpl-sanitize-log.XXXXXX")
shopt -s nullglob
# REFIMPL_SANITIZE_TESTS="tests/a.py tests/b.py" narrows the run (default: every C-kernel test file)
read -r -a TESTS <<< "${REFIMPL_SANITIZE_TESTS:-$(echo tests/test_kernels_c_*.py)}"
if [[ ${#TESTS[@]} -eq 0 ]]; then
    echo "sanitize.sh: no tests/test_kernels_c_*.py found" >&2
    exit 2
fi
echo "sanitize.sh: running ${TESTS[*]} under ASan/UBSan"
CI=${CI:-1} PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" PYTHONMALLOC=malloc \
    LD_PRELOAD="$ASAN_LIB" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$PY" -m pytest "${TESTS[@]}" -q -s -p no:cacheprovider "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}

# the tests must have run against the sanitized build, not an installed copy elsewhere
if ! grep -qE "[0-9]+ passed" "$LOG"; then
    echo "sanitize.sh: FAILED: no test passed (status $status)" >&2
    exit 1
fi
if grep -qE "ERROR: AddressSanitizer|runtime error:|UndefinedBehaviorSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
    echo "sanitize.sh: FAILED: sanitizer report above" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    echo "sanitize.sh: FAILED: pytest exit status $status" >&2
    exit 1
fi
echo "sanitize.sh: OK (no sanitizer reports)"
