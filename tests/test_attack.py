"""`python -m loadtest.attack` end to end, briefly: the slots and audit-flood attacks against
real servers (the hung-store attack has its own test: tests/test_store_hang.py), one JSON
line with what legitimate callers got meanwhile."""

from __future__ import annotations

import json

from loadtest.attack.__main__ import main


def test_attack_command_prints_one_line_of_figures(capsys):
    assert main(["--seconds", "1.5", "--skip", "store_hang"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert set(out) == {"slots", "audit_flood"}
    slots, flood = out["slots"], out["audit_flood"]
    assert slots["checks_ok"] > 50 and slots["health_ok"] > 5 and not slots["health_failed"]
    assert slots["attack_calls"].get("no_credentials:UNAUTHENTICATED", 0) > 0  # refused at once, holding nothing
    assert flood["checks_ok"] > 50 and not flood["checks_failed"]
    # the flooder is held to its quota and its unknown cards are counted, not itemised: a
    # 100,000-token batch of random cards used to add 900 KB to the log (66 MB/s flooded)
    assert flood["flood_batches"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert flood["audit_growth_bytes_per_s"] < 200_000
