#!/usr/bin/env bash
# The replica set-up on loopback (docs/replicas.md): PostgreSQL, N nodes, HAProxy in front.
#   deploy/cluster.sh start DIR [--nodes 3] [--citizens 20000]   # prints {"front": "127.0.0.1:PORT", ...}
#   deploy/cluster.sh status DIR
#   deploy/cluster.sh stop DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m deploy.cluster "$@"
