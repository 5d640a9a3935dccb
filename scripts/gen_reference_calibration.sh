#!/bin/sh
# The v1 model's reference calibration (kernel/models/v1.calibration.npz): frozen from a
# synthetic city of 1,000,000 people, seed 2018 (kernel/calibration.py REFERENCE_CITIZENS,
# REFERENCE_SEED). Served only when the store has no adult to calibrate on (an empty
# production store); rerun after any change of kernel/models/v1.toml (a test says when).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m kernel.calibrate --citizens 1000000 --seed 2018 --out kernel/models/v1.calibration.npz
