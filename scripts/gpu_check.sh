#!/usr/bin/env bash
# The GPU check in one go, 9.5 minutes at most (each part has its own time limit): the tests,
# the benchmark against the reference's PyTorch loop, the README's two-minute look, and the whole
# `all` protocol, timed. Everything
# it measures goes under $OUT (default ./gpu_check_out); run from the repository root with the
# corpus in $TINYLM_DATA:
#   PYTHONPATH=. TINYLM_DATA=data/input.txt OUT=/tmp/out bash scripts/gpu_check.sh
# QUICK=1 cuts every part short (one 2-step epoch, 2-step measurements) to try it on a CPU.
set -uo pipefail
shopt -s nullglob
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
: "${TINYLM_DATA:?set TINYLM_DATA to the corpus}"
if [[ ${QUICK:-0} == 1 ]]; then  # a CPU is slower everywhere: cut the work, allow more time
    run_flags=(--max-steps-per-epoch 2 --max-epochs 1)
    bench_flags=(--steps 2 --repeats 1)
    limits=(900 600 900 900)
else
    run_flags=()
    bench_flags=()
    limits=(180 150 30 180)  # tests, benchmark, each of the look's two commands, `all`: 9.5 min
fi
status=0

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
        || echo "no nvidia-smi"
    python -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/machine.txt" 2>&1

# The numerics tests (model, golden train step, torch parity) check this image's packages; they
# pin CPU numerics, so they run on the host's CPUs. The whole suite is CI's job: it no longer
# fits this script's time.
JAX_PLATFORMS=cpu timeout ${limits[0]} python -m pytest -q -x tests/test_model.py \
    tests/test_train.py tests/test_interop.py tests/test_bf16.py > "$OUT/tests.log" 2>&1 \
    || status=1
tail -n 3 "$OUT/tests.log"

timeout ${limits[1]} python scripts/benchmark.py ${bench_flags[@]+"${bench_flags[@]}"} \
    --out "$OUT/benchmark.md" \
    > "$OUT/benchmark.log" 2>&1 || status=1
tail -n 12 "$OUT/benchmark.log"

# The README's two-minute look, each command timed.
look=$(mktemp -d)
for command in "scripts/run_experiment.py baseline --max-epochs 1 --max-steps-per-epoch 50 \
--out $look/look --no-progress" "scripts/analyze.py all $look/look"; do
    began=$(date +%s%N)
    timeout ${limits[2]} python $command >> "$OUT/look.log" 2>&1 || status=1
    echo "$command: $(( ($(date +%s%N) - began) / 1000000 )) ms" | tee -a "$OUT/look_times.txt"
done
rm -rf "$look"

runs=$(mktemp -d)
began=$(date +%s%N)
timeout ${limits[3]} python scripts/run_experiment.py all --out "$runs" --no-progress \
    ${run_flags[@]+"${run_flags[@]}"} \
    > "$OUT/all.log" 2>&1 || status=1
ended=$(date +%s%N)
echo "all protocol wall time: $(( (ended - began) / 1000000 )) ms" | tee "$OUT/all_wall_time.txt"
for run in "$runs"/*/; do
    name=$(basename "$run")
    mkdir -p "$OUT/runs/$name"
    cp "$run"/history.csv "$run"/summary.json "$OUT/runs/$name/" 2>/dev/null
done
cp "$runs"/comparison.md "$runs"/val_ppl_comparison.png "$OUT/runs/" 2>/dev/null
cat "$runs"/comparison.md 2>/dev/null
rm -rf "$runs"
exit $status
