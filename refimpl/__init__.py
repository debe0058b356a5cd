"""refimpl: the math of LLM inference, exact, checkable and measurable on a bare CPU."""
__version__ = "0.1.0"
