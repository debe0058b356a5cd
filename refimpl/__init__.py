"""refimpl: the math of LLM inference, exact, checkable and measurable on a bare CPU.

    import refimpl
    model = refimpl.load("path/to/hf_dir_or_llama2c.bin", dtype="float64")
    logits = model.forward([1, 2, 3])              # [T, V]
    out = model.generate([1, 2, 3], max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)

Layers: refimpl.oracle (the truth, pure NumPy), refimpl.kernels (C and Numba
fast paths with the same contract), refimpl.timing (cycle counter and
harness), refimpl.verify (check your own implementation against the oracle).
"""
__version__ = "0.1.0"


def load(path, dtype="float32", backend="numpy"):
    """Load a Hugging Face model directory or a llama2.c `.bin` as a `refimpl.oracle.model.Model`
    ("tiny:ARCH[:SEED]": the built-in tiny model `tiny_model(ARCH, SEED)`, in this `dtype`)."""
    from refimpl.io.load import load as _load
    return _load(path, dtype=dtype, backend=backend)


def tiny_model(arch="llama", seed=0, dtype="float64", backend="numpy", **config):
    """A built-in tiny random model (no files needed); keywords override its Config (n_layers=3, ...)."""
    from refimpl.oracle.model import tiny_model as _tiny
    return _tiny(arch, seed=seed, dtype=dtype, backend=backend, **config)


__all__ = ["load", "tiny_model", "__version__"]
