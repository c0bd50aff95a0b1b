"""One logger for the package, and `warn_once` for the documented fallbacks (exact attention where a variant
cannot honour a feature), so a 30-layer model does not print the same line 30 times per step."""
from __future__ import annotations

import logging

logger = logging.getLogger("patchattn")
_seen: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _seen:
        _seen.add(message)
        logger.warning(message)
