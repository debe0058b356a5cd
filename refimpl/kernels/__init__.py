"""Fast paths with the oracle's contract: `get(op, backend)`, `available()`, `info()`."""
from refimpl.kernels.registry import BACKENDS, OPS, available, get, info, register

__all__ = ["get", "available", "info", "register", "OPS", "BACKENDS"]
