"""Trainer adapters, installed as ``sanitizer.integrations`` (Lightning, Hugging Face)."""

if __name__ != "sanitizer.integrations":
    # From the repository root the folder is also importable as plain ``integrations``, which would give a
    # second copy of every adapter class (isinstance checks and checkpoints would not match): refuse it.
    raise ImportError(f"import the adapters as sanitizer.integrations (e.g. from sanitizer.integrations.lightning "
                      f"import SanitizerCallback), not as {__name__!r}")
