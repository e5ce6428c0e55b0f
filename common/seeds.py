"""Seeds derived from names: the same parts give the same 31-bit seed in every process."""

from __future__ import annotations

import hashlib
from typing import Any


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed derived from the run seed and names (deterministic across processes)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
