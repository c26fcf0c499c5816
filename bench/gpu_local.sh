#!/usr/bin/env bash
# The GPU figures, on a lent machine with CUDA (the `device` tool): no servers there and no
# registry, so the project's Python dependencies that its image lacks travel as wheels
# (`make gpu-wheels` puts them in .gpu-wheels/, which git ignores) and the project runs from
# its source tree. Writes $OUT/gpu-<card>-local.json, the card and the CUDA tests' log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/client"
OUT="${OUT:-bench}"
python3 -m pip install -q --no-deps --no-index .gpu-wheels/*.whl 2>&1 | grep -v WARNING | tail -3
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$card-card.txt"
# The CUDA code paths' tests (skipped where CUDA is missing, so they run here).
python3 -m pytest -q --noconftest -p no:cacheprovider -o addopts="-ra" \
  tests/shared/imaging/test_preprocess.py tests/shared/imaging/test_decode.py \
  2>&1 | tee "$OUT/gpu-$card-tests.txt" | tail -5
python3 -m bench.throughput --local --images 512 --repeat 8 --batch-size 16 \
  --loader-threads "${THREADS:-14}" --loader-processes "${THREADS:-14}" \
  --out "$OUT/gpu-$card-local.json" 2>&1 | tail -40
