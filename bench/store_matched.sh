#!/usr/bin/env bash
# The matched-bytes grid end to end, resumable (each step skips what is finished):
# the peaked teacher, the stores, then the students in two processes (the acceptance
# arms first, for every seed), then the summary, table and plot.
#   nice -n 15 bench/store_matched.sh > bench/.cache/store_matched.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
M=bench/store_matched.py
$PY bench/peaked_teacher.py --until-peaked
$PY $M --phase stores
$PY $M --phase students --arms dense topk64 sampled32 &
$PY $M --phase students --arms topk96 sampled64 plain &
wait
$PY $M --phase students --arms topk8 topk32 sampled4 sampled16 &
$PY $M --phase students --arms topk16 topk128 sampled8 head &
wait
$PY $M
