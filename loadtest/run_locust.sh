#!/usr/bin/env bash
# Locust against a Qianjiang Score server (loadtest/locustfile.py).
#
#   loadtest/run_locust.sh 127.0.0.1:50051 30s 50     # headless: target, run time, users
#   loadtest/run_locust.sh --web [127.0.0.1:50051]    # web UI on http://127.0.0.1:8089
#
# Headless runs write their CSV stats to data/locust/<time>_{stats,failures,exceptions,stats_history}.csv
# and exit non-zero if any request failed; at the end, calls in flight finish (up to 5 s)
# rather than being cancelled. QJ_DATA_DIR (default data) must be the server's data
# directory (its card-token key) and QJ_CITIZENS (default 100000) the size of its seeded city.
# Extra arguments after the first three go to locust. Loopback targets only.
set -euo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2; }

if [[ -n "${QJ_DATA_DIR:-}" ]]; then export QJ_DATA_DIR="$(realpath -m "$QJ_DATA_DIR")"; fi
cd "$(dirname "$0")/.."
LOCUST="${LOCUST:-.venv/bin/locust}"
[[ -x "$LOCUST" ]] || { echo "no $LOCUST: .venv/bin/pip install -r requirements-loadtest.txt" >&2; exit 2; }

if [[ "${1:-}" == "--web" ]]; then
    exec "$LOCUST" -f loadtest/locustfile.py --host "${2:-127.0.0.1:50051}" --web-host 127.0.0.1 --web-port 8089 "${@:3}"
fi
[[ $# -ge 1 && "$1" != -* ]] || usage
target="$1" run_time="${2:-30s}" users="${3:-50}"
shift $(( $# < 3 ? $# : 3 ))
mkdir -p data/locust
prefix="data/locust/$(date -u +%Y%m%dT%H%M%SZ)"
"$LOCUST" -f loadtest/locustfile.py --headless --host "$target" -u "$users" -r "$users" -t "$run_time" \
    --stop-timeout 5 --csv "$prefix" --only-summary "$@" && status=0 || status=$?
echo "CSV stats: ${prefix}_stats.csv" >&2
exit "$status"
