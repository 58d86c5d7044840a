"""The output-ownership rule: nasprune never deletes or replaces what it did not write.

Every command that writes (extract, importance, train, refine, profile, predictor fit, search,
export, compress, check) claims its ``--out`` through :func:`claim_output` *before* any long work
starts, and again when it moves the finished result into place:

* an ``--out`` that does not exist is created;
* an existing *empty* directory is used;
* an existing output of the *same kind* written by nasprune (its marker file) is replaced only
  with ``overwrite=True`` (``--overwrite``), or continued where the command resumes;
* anything else -- a non-empty directory nasprune did not write, a nasprune output of another
  kind, a file -- is refused with one line, and left untouched.

The marker is a small JSON file, :data:`MARKER`, inside the output. Outputs written before the
marker existed are recognised by the file each kind has always had (``LEGACY``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from compressor.core.errors import NaspruneError

MARKER = ".nasprune-output.json"
KINDS = ("model", "training", "predictor", "search", "bundle", "bundles", "run", "check", "profile-export")
LEGACY = {  # kind -> a file every output of that kind has held since before the marker
    "model": "nasprune.json",
    "predictor": "manifest.json",
    "search": "pareto.json",
    "bundle": "manifest.json",
    "run": "run.json",
    "check": "check.json",
    "training": "train_log.jsonl",
    "profile-export": "jobs.json",
}


def output_kind(directory: Path) -> str | None:
    """The kind of nasprune output ``directory`` holds (from its marker), or None."""
    marker = Path(directory) / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError, OSError):
            return None
        return kind if kind in KINDS else None
    return None


def _is_kind(directory: Path, kind: str) -> bool:
    found = output_kind(directory)
    if found is not None:
        return found == kind
    legacy = LEGACY.get(kind)
    return bool(legacy) and (directory / legacy).is_file()


def claim_output(out: Path, kind: str, *, overwrite: bool = False, resume: bool = False) -> str:
    """Check that nasprune may write a ``kind`` output at ``out``; return how: "new", "empty",
    "replace" (``overwrite``) or "resume". Raises a one-line :class:`NaspruneError` otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise NaspruneError(f"cannot create {out}: {parent} is a file, not a directory; choose another --out")
        return "new"
    if not out.is_dir():
        raise NaspruneError(
            f"--out {out} is an existing file, not written by nasprune; nasprune never replaces it, "
            "choose another --out"
        )
    entries = [p for p in out.iterdir()]
    if not entries:
        return "empty"
    if _is_kind(out, kind):
        if resume:
            return "resume"
        if overwrite:
            return "replace"
        how = "--overwrite to replace it" + (" or --resume to continue it" if kind in ("training", "run") else "")
        raise NaspruneError(f"--out {out} already holds a nasprune {kind} output; pass {how}, or choose another --out")
    found = output_kind(out)
    what = f"a nasprune {found} output, not a {kind}" if found else "files nasprune did not write"
    raise NaspruneError(
        f"--out {out} is a non-empty directory holding {what}; nasprune never replaces it, "
        "choose a new or empty directory"
    )


def mark_output(directory: Path, kind: str) -> None:
    """Write the ownership marker into ``directory`` (inside the temporary dir of an atomic write)."""
    from compressor import __version__

    path = Path(directory) / MARKER
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"kind": kind, "nasprune": __version__}) + "\n")
    os.replace(tmp, path)
