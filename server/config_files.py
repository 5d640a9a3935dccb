"""Reading the service's configuration files (config/*.toml, the development tokens file).

    >>> path, doc = read_toml(None, DEFAULT_CONFIG_DIR / "scenarios.toml", ValueError)
    >>> path.name, doc["campus_fitness"]["min_score"]
    ('scenarios.toml', 581)
"""

from __future__ import annotations

import tomllib
from pathlib import Path

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def read_toml(path: str | Path | None, default: Path | None, error: type[Exception]) -> tuple[Path, dict]:
    """(the path read, its document): ``path``, or ``default`` when it is None. A file that
    cannot be read or is not TOML raises ``error`` naming the file and the problem."""
    path = Path(path) if path else default
    if path is None:
        raise error("no configuration file given")
    try:
        with open(path, "rb") as fh:
            return path, tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: {exc}") from exc
