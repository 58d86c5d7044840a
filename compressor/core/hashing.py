"""The one sha256 helper set: files, bytes and canonical JSON.

(``profilers/standalone.py`` keeps its own two lines of hashlib on purpose: it is copied alone to
edge devices that have no nasprune.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj, length: int | None = None) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys), optionally truncated to ``length``."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return digest[:length] if length else digest


def sha256_parts(parts) -> hashlib._Hash:
    """A running sha256 over byte/str parts (for identities built from many pieces)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h
