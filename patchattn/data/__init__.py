"""Evaluation text shipped inside the package, so perplexity runs need no download."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_TEXT = "shakespeare.txt"


def default_text_path() -> Path:
    """Path of the shipped Shakespeare text (a real file for a normal install or checkout)."""
    return Path(str(files(__name__).joinpath(DEFAULT_TEXT)))


def read_text(path: str | Path | None = None) -> str:
    """Read ``path``, or the shipped Shakespeare text when ``path`` is None.

    A bare file name that exists in this package (e.g. ``"kjv_sample.txt"``) is read from here.
    """
    if path is None:
        path = DEFAULT_TEXT
    resource = files(__name__).joinpath(str(path))
    if not Path(path).exists() and resource.is_file():
        return resource.read_text(encoding="utf-8")
    return Path(path).read_text(encoding="utf-8")
