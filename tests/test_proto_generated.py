"""The committed generated code in qianjiang/ is exactly what scripts/gen_proto.sh makes."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regenerating_the_contracts_changes_nothing(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True, cwd=ROOT, env={**os.environ, "PY": sys.executable},
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "qianjiang").rglob("*.py*") if "__pycache__" not in p.parts)
    assert fresh == committed, "scripts/gen_proto.sh makes other files than are committed"
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), f"{rel} differs: run scripts/gen_proto.sh"


def test_every_rpc_and_field_is_commented():
    """Each rpc and field line in proto/ carries a comment (on it or just above)."""
    for proto in (ROOT / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_field = s.endswith(";") and "=" in s and not s.startswith(("option", "syntax", "package", "import", "//"))
            if s.startswith("rpc ") or is_field:
                above = lines[i - 1].strip() if i else ""
                if "//" not in line and not above.startswith("//") and not s.split()[0].isupper():
                    raise AssertionError(f"{proto.name}:{i + 1} has no comment: {s}")
