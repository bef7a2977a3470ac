"""Progress bars and log lines that stay quiet when output is not a terminal or when asked."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """``tqdm`` with the package's defaults: shown on a terminal only (a redirected log stays clean);
    SANITIZER_PROGRESS=0 hides the bars everywhere, SANITIZER_PROGRESS=1 shows them everywhere."""
    kwargs.setdefault("disable", {"0": True, "1": False}.get(os.environ.get("SANITIZER_PROGRESS", ""), None))
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


# One line per round and a few status lines go through the "sanitizer" logger: shown on stderr by
# default, silenced with logging.getLogger("sanitizer").setLevel(logging.WARNING), or routed elsewhere
# by giving the logger handlers of your own before importing sanitizer.
LOGGER = logging.getLogger("sanitizer")
if not LOGGER.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def log(message: str) -> None:
    LOGGER.info(message)
