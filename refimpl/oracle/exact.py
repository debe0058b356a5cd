"""Exact arithmetic for teaching: fractions where the value is rational, decimals otherwise.

A value is a `Fraction` while every operation so far kept it rational
(sums, products, quotients of integers; sqrt of a perfect square; exp(0) = 1;
softmax of a row of equal entries = 1/n).  Anything else (sqrt(2), exp(x) for
rational x != 0) becomes a `Decimal` computed with PREC significant digits,
which is far beyond float64 (16 digits): the printed values are correct to
every digit shown.

Matrices are lists of rows (lists of numbers).  Shapes are checked: a
mismatch raises ValueError naming both shapes.
"""
from __future__ import annotations

import decimal
from decimal import Decimal
from fractions import Fraction

PREC = 50
_CTX = decimal.Context(prec=PREC)

Number = Fraction | Decimal


def exact(x) -> Number:
    """An int, str ('1/3', '0.5') or float (Python's or a NumPy scalar / 0-d array) as a
    Fraction; a Decimal stays Decimal.

    A float is read as the decimal it prints as (0.1 -> 1/10, as a person
    writing 0.1 means), not as its binary value 3602879701896397/2^55; a NumPy
    float32 prints in its own shortest digits (np.float32(0.1) -> 1/10 too).
    """
    if isinstance(x, (Fraction, Decimal)):
        return x
    if getattr(x, "ndim", None) == 0 and hasattr(x, "dtype"):     # a NumPy scalar or 0-d array
        dtype, x = x.dtype, x[()]
        kind = dtype.kind
        if kind not in "biuf":
            raise TypeError(f"a {dtype} value is not a real number here")
        x = bool(x) if kind == "b" else int(x) if kind in "iu" else x
    if isinstance(x, bool):
        raise TypeError("a bool is not a number here")
    if isinstance(x, float) or getattr(x, "dtype", None) is not None:
        if x != x or abs(float(x)) == float("inf"):
            raise ValueError(f"{x} is not a finite number")
        return Fraction(str(x))                       # str: shortest digits that read back (NumPy: in its dtype)
    return Fraction(x)


def to_decimal(x: Number) -> Decimal:
    """A Fraction or Decimal as a Decimal with PREC digits."""
    if isinstance(x, Decimal):
        return x
    x = Fraction(x)
    return _CTX.divide(Decimal(x.numerator), Decimal(x.denominator))


def _mixed(a: Number, b: Number):
    """Both as Fractions if both are, else both as Decimals."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a, b
    return to_decimal(a), to_decimal(b)


def add(a: Number, b: Number) -> Number:
    a, b = _mixed(a, b)
    return a + b if isinstance(a, Fraction) else _CTX.add(a, b)


def sub(a: Number, b: Number) -> Number:
    a, b = _mixed(a, b)
    return a - b if isinstance(a, Fraction) else _CTX.subtract(a, b)


def mul(a: Number, b: Number) -> Number:
    a, b = _mixed(a, b)
    return a * b if isinstance(a, Fraction) else _CTX.multiply(a, b)


def div(a: Number, b: Number) -> Number:
    a, b = _mixed(a, b)
    return a / b if isinstance(a, Fraction) else _CTX.divide(a, b)


def sqrt(x: Number) -> Number:
    """sqrt(x): a Fraction when x is the square of a rational, else a Decimal."""
    if isinstance(x, Fraction):
        if x < 0:
            raise ValueError(f"sqrt of a negative number {x}")
        n, d = _isqrt_exact(x.numerator), _isqrt_exact(x.denominator)
        if n is not None and d is not None:
            return Fraction(n, d)
    return _CTX.sqrt(to_decimal(x))


def _isqrt_exact(n: int):
    import math
    r = math.isqrt(n)
    return r if r * r == n else None


def exp(x: Number) -> Number:
    """exp(x): exactly 1 at x = 0, otherwise a Decimal (exp of a nonzero rational is irrational)."""
    if x == 0:
        return Fraction(1)
    return _CTX.exp(to_decimal(x))


def total(xs) -> Number:
    s: Number = Fraction(0)
    for x in xs:
        s = add(s, x)
    return s


# --------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------


def matrix(rows) -> list[list[Number]]:
    """A rectangular list of rows of exact numbers."""
    rows = [[exact(v) for v in r] for r in rows]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError(f"a matrix needs equal-length, non-empty rows; got row lengths {[len(r) for r in rows]}")
    return rows


def shape(A) -> tuple[int, int]:
    return len(A), len(A[0])


def transpose(A):  # [m,n] -> [n,m]
    return [list(col) for col in zip(*A)]


def matmul(A, B):  # [m,k] @ [k,n] -> [m,n]
    """(A B)[i][j] = sum_c A[i][c] B[c][j], exactly."""
    (m, k), (k2, n) = shape(A), shape(B)
    if k != k2:
        raise ValueError(f"matmul: A is {m}x{k} and B is {k2}x{n}: inner sizes {k} != {k2}")
    return [[total(mul(A[i][c], B[c][j]) for c in range(k)) for j in range(n)] for i in range(m)]


def scale(A, c: Number):
    """c A."""
    return [[mul(v, c) for v in r] for r in A]


def softmax(row) -> list[Number]:
    """exp(x_j - max x) / sum_k exp(x_k - max x); exactly 1/n when all entries are equal."""
    m = max(row)                                      # Fraction and Decimal compare exactly
    e = [exp(sub(x, m)) for x in row]
    s = total(e)
    return [div(v, s) for v in e]


def argmax(row) -> int:
    """The first index of the largest value (ties go to the lowest index)."""
    best = 0
    for i, v in enumerate(row):
        if v > row[best]:                             # exact: Decimal compares with Fraction by value
            best = i
    return best


# --------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------


def fmt(x: Number, digits: int = 4) -> str:
    """A Fraction as an integer or p/q; a Decimal rounded to `digits` decimals."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    q = Decimal(1).scaleb(-digits)
    room = decimal.Context(prec=max(PREC, x.adjusted() + digits + 2))   # every integer digit kept
    v = x.quantize(q, rounding=decimal.ROUND_HALF_EVEN, context=room)
    return str(room.add(v, 0)) if v != 0 else "0." + "0" * digits    # add 0: no "-0.0000"


def fmt_decimal(x: Number, digits: int = 4) -> str:
    """Any value as a decimal rounded to `digits` places (fractions too)."""
    return fmt(to_decimal(x), digits)


def fmt_matrix(A, digits: int = 4) -> str:
    return "[" + ", ".join("[" + ", ".join(fmt(v, digits) for v in r) + "]" for r in A) + "]"
