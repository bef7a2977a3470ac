"""Progress bars and log lines that stay quiet when output is not a terminal or when asked."""

from __future__ import annotations

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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
