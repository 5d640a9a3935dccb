#!/bin/sh
# The models' reference calibrations (kernel/models/v1.calibration.npz and
# kernel/models/v2.calibration.npz): each frozen from a synthetic city of 1,000,000 people,
# seed 2018 (kernel/calibration.py REFERENCE_CITIZENS, REFERENCE_SEED), scored by its own
# spec. Served only when the store has no adult to calibrate on (an empty production store);
# rerun after any change of a kernel/models/v*.toml (tests/test_operator_start.py says when:
# it regenerates each table and compares it bit for bit). `$0 v2` regenerates one model only.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for model in ${*:-v1 v2}; do
    "$PY" -m kernel.calibrate --citizens 1000000 --seed 2018 --spec "kernel/models/$model.toml" \
        --out "kernel/models/$model.calibration.npz"
done
