"""Crash safety: SIGKILL the real server while clients write, restart it, lose nothing
acknowledged (issue 6). A short run of ``python -m loadtest.crash_soak``, which holds the
workload and every check; the long run (20+ cycles) is the script itself."""

from __future__ import annotations

import pytest

from loadtest import crash_soak


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_loses_no_acknowledged_record_consent_score_or_audit_entry(tmp_path, workers):
    r = crash_soak.run(cycles=3, workers=workers, work_dir=tmp_path, seed=20 + workers, log=lambda text: None)
    examples = "\n".join(r["examples"])
    # The run did what it claims: records, consents and disclosures before every kill.
    assert r["cycles"] == 3
    assert r["snapshot_starts"] >= 3, r  # restarts after SIGKILL and the graceful one mapped a snapshot
    assert r["records_acked"] > 100 and r["consent_ops_acked"] > 30 and r["disclosures"] > 300, r
    assert r["scores_compared"] > 1000 and r["duplicate_probes"] > 0, r
    # Nothing acknowledged is lost or changed.
    assert r["records_lost"] == 0 and r["records_wrong"] == 0 and r["duplicate_probe_failures"] == 0, examples
    assert r["consent_mismatches"] == 0 and r["consent_history_mismatches"] == 0, examples
    assert r["consent_state_vs_store_mismatches"] == 0, examples
    assert r["score_mismatches"] == 0, examples
    # The audit log loses at most its documented window, and a drain loses nothing.
    assert r["audit_missing_beyond_bound"] == 0 and r["audit_duplicates"] == 0, examples
    assert r["graceful"] == {**r["graceful"], "exit_status": 0, "score_mismatches": 0, "audit_missing": 0}, r["graceful"]
    assert r["unexpected_errors"] == 0, examples
    assert r["ok"]
