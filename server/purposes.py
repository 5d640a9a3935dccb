"""The purposes a score may be read for (config/purposes.toml).

    >>> purposes = load_purposes()
    >>> purposes["citizen_app_view"].en
    'the citizen views their own score in a city app'

A score read names one of them (or none: "unspecified"); anything else is INVALID_ARGUMENT,
so the audit log's dictionary of purposes is as small as this file, whoever calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.config_files import DEFAULT_CONFIG_DIR, read_toml

DEFAULT_PURPOSES_PATH = DEFAULT_CONFIG_DIR / "purposes.toml"

#: What an empty purpose is audited as (it must be in the file).
UNSPECIFIED = "unspecified"

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class PurposeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Purpose:
    name: str
    zh: str
    en: str


def load_purposes(path: str | Path | None = None) -> dict[str, Purpose]:
    path, doc = read_toml(path, DEFAULT_PURPOSES_PATH, PurposeConfigError)
    out = {}
    for name, item in doc.items():
        where = f"{path.name}: {name}"
        if not _NAME.fullmatch(name):
            raise PurposeConfigError(f"{where}: a purpose's name is 1-64 of [a-z0-9_], starting with a letter")
        if not isinstance(item, dict) or set(item) != {"zh", "en"} or not all(isinstance(v, str) and v for v in item.values()):
            raise PurposeConfigError(f"{where}: expected a table with a non-empty zh and en, nothing else")
        out[name] = Purpose(name, item["zh"], item["en"])
    if UNSPECIFIED not in out:
        raise PurposeConfigError(f"{path.name}: {UNSPECIFIED!r} must be listed (what an empty purpose is audited as)")
    return out
