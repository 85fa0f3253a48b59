#!/usr/bin/env bash
# The benchmarks on a GPU machine (the device tool's), in at most 5 minutes.
#
# The machine has JAX, Flax, Optax and a CUDA PyTorch but no network, so
# torch-optimizer (pure Python) travels as wheels in .whl/, made here by
#   pip download --no-deps torch-optimizer==0.3.0 pytorch-ranger==0.1.1 -d .whl
# Run it there with `carry: [".whl"]` and the command
# `bash benchmarks/speed/gpu.sh`; the reports land in $OUT (the device tool's
# folder that comes back), else results/gpu/. Copy the figures into
# docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/../.."   # the repository root: the scripts run as modules
out="${OUT:-results/gpu}"
mkdir -p "$out"
python=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-deps --no-index .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$python" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())"
} > "$out/machine.txt" 2>&1

run() {  # run <seconds> <name> <module and arguments...>
  local seconds=$1 name=$2
  shift 2
  echo "== $name (at most ${seconds} s)"
  timeout "$seconds" "$python" -m "$@" --json "$out/$name.json" \
    > "$out/$name.md" 2> "$out/$name.err"
  echo "   exit $? ; $(tail -n 1 "$out/$name.md")"
}

# One process per model and benchmark, each with its own budget, so that a
# slow compile loses one report, not all; the cheapest and most asked-for
# first. About 300 s in all.
start=$(date +%s)
for spec in mlp:15:45 transformer:40:70 cnn:20:60; do
  IFS=: read -r model mem steps <<< "$spec"
  run "$mem" "memory_$model" benchmarks.speed.memory --models "$model"
  run "$steps" "steps_$model" benchmarks.speed.step_cost --threads 0 \
    --plan gpu --rounds 6 --block 0.03 --images none --models "$model"
done
run 50 torch benchmarks.speed.vs_torch --threads 0 --rounds 6 --block 0.03 \
  --images none
echo "done in $(( $(date +%s) - start )) s; reports in $out"
