"""Reading a YAML config file the one-line way: a missing, unparsable or non-mapping file is a
:class:`NaspruneError` naming the file and the line, never a parser traceback."""

from __future__ import annotations

from pathlib import Path

from compressor.core.errors import NaspruneError


def read_yaml_mapping(path: Path) -> dict:
    """The settings in the YAML (or JSON) file ``path``: a mapping, ``{}`` for an empty file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NaspruneError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NaspruneError(f"config file {path} is not UTF-8 text; pass a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NaspruneError(f"{path} is not valid YAML ({where}{problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NaspruneError(f"{path} must hold YAML settings (key: value lines), not a {type(raw).__name__}")
    return raw
