#!/usr/bin/env bash
# The GPU suite: one call on one H100/H200 (about 6-8 minutes; every step has a time cap), JSON under
# benchmarks/results/gpu_suite/ and a summary in gpu_suite.json:
#
#   bash benchmarks/gpu_suite.sh                        # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --dry-run              # the same steps on the CPU at toy sizes (~5 min)
#   bash benchmarks/gpu_suite.sh --table                # only the five-benchmark table, its own call (~8 min)
#   bash benchmarks/gpu_suite.sh --table --dry-run      # the table's runs on the CPU at toy sizes
#   options: --model DIR  encoder folder (default: the packaged all-MiniLM-L6-v2)
#            --data DIR   folder holding mr/{train,validation,test}.parquet (default: $GLOSS_RAY_DATA, ./data,
#                         the user cache, else downloaded)
#            --data DIR   with --table it must hold all five: {mr,r8,r52,ohsumed,20ng}/{train,validation,test}.parquet
#            --out DIR    (default: benchmarks/results/gpu_suite, or gpu_suite_dryrun with --dry-run;
#                         gpu_table / gpu_table_dryrun with --table)
#
# Steps (each timed; a failed step is recorded and the suite goes on):
#   env            torch / CUDA / GPU / Ray / FAISS versions
#   gpu_tests      python -m pytest -m gpu tests/test_gpu.py (skipped without CUDA)
#   loss_overhead  one training step, CE vs CE + G-Loss, batch 128, length 128 (goal: ratio <= 1.05)
#   ray_overhead   the same loop through Ray Train (1 worker) vs one plain process, 6,400 MR documents
#   global_graph   the full kNN graph (k=16) of 1M documents: torch on CUDA in fp16, and FAISS on GPU
#                  where a GPU build imports (faiss.get_num_gpus() > 0)
#   mr_reference   full MR, CE vs G-Loss with the reference settings (configs/paper_minilm.yaml: batch 128,
#                  lr 3e-5, 10 epochs, length 128), seed 0, through `gloss-ray bench --gpu`
# With --table, instead (one call of its own: the per-call limit of a lent machine is 10 minutes):
#   five_benchmarks  CE vs G-Loss (defaults) at the reference settings (configs/paper_minilm.yaml) on MR, R8,
#                  R52, Ohsumed and 20NG, 3 seeds = 30 runs, 8 at a time on the one GPU (gpus_per_worker
#                  0.125: all-MiniLM-L6-v2 at batch 128 needs a few GB and ~1-3 s a training epoch, so one
#                  run alone leaves the GPU idle); the report (tables, paired differences) is copied to
#                  five_benchmarks/ and summarised in gpu_suite.json
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; TABLE=0; MODEL=""; DATA="${GLOSS_RAY_DATA:-}"; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --table) TABLE=1 ;;
    --model) MODEL="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-benchmarks/results/$([ $TABLE = 1 ] && echo gpu_table || echo gpu_suite)$([ $DRY = 1 ] && echo _dryrun)}"
mkdir -p "$OUT"; rm -f "$OUT"/*.status
export PYTHONUNBUFFERED=1 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ -n "$DATA" ] && export GLOSS_RAY_DATA="$DATA"
MODEL_ARG=(); [ -n "$MODEL" ] && MODEL_ARG=(--model "$MODEL")
MODEL_SET=(); [ -n "$MODEL" ] && MODEL_SET=(--set "model=$(realpath "$MODEL")")
DATA_SET=(); [ -n "$DATA" ] && DATA_SET=(--set "data_dir=$(realpath "$DATA")")
if [ $DRY = 1 ]; then DEV=cpu; GPU_FLAG=(); else DEV=cuda; GPU_FLAG=(--gpu); fi

step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to NAME.log, record rc and seconds
  local name=$1 cap=$2; shift 2
  echo "=== $name (cap ${cap}s): $*"
  local t0=$SECONDS
  timeout "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"cap_s\": $cap}" > "$OUT/$name.status"
  echo "=== $name: rc $rc, $((SECONDS - t0))s"
}

step env 60 python3 -c "
import json, platform, torch, importlib
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'dry_run': $DRY}
for name in ('ray', 'transformers', 'datasets', 'faiss', 'sentence_transformers'):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as e:
        info[name] = 'missing: ' + type(e).__name__
try:
    import faiss; info['faiss_gpus'] = faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0
except Exception:
    info['faiss_gpus'] = 0
json.dump(info, open('$OUT/env.json', 'w'), indent=1); print(info)"

if [ $TABLE = 1 ]; then
  if [ $DRY = 1 ]; then
    TABLE_SETS=(--seeds 1 --concurrency 2 --set max_train=64 --set max_eval=48 --set epochs=1 --set max_length=32
                --set batch_size=16 --set eval_batch_size=64)
  else
    TABLE_SETS=(--seeds 3 --concurrency 8 --set gpus_per_worker=0.125 --set cpus_per_worker=2)
  fi
  rm -rf "$OUT/runs"
  step five_benchmarks 570 python3 -m gloss_ray.cli bench --config configs/paper_minilm.yaml "${GPU_FLAG[@]}" \
    --benchmarks mr,r8,r52,ohsumed,20ng --losses ce,gloss "${TABLE_SETS[@]}" "${MODEL_SET[@]}" "${DATA_SET[@]}" \
    --set progress=false --storage "$OUT/runs" --name five_benchmarks
  mkdir -p "$OUT/five_benchmarks"
  cp -r "$OUT/runs/five_benchmarks/report/." "$OUT/five_benchmarks/" 2>/dev/null
  rm -rf "$OUT/runs"           # models and checkpoints: the report keeps the figures
  python3 benchmarks/gpu_suite_summary.py "$OUT"
  exit $?
fi

step gpu_tests 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

if [ $DRY = 1 ]; then
  step loss_overhead 300 python3 benchmarks/loss_overhead.py --device cpu --batch-size 8 --max-length 32 --steps 2 \
    --warmup 1 "${MODEL_ARG[@]}" --out "$OUT/loss_overhead.json"
  step ray_overhead 300 python3 benchmarks/ray_overhead.py --max-train 64 --max-eval 32 --epochs 1 --max-length 32 \
    "${MODEL_ARG[@]}" --out "$OUT/ray_overhead.json"
  step global_graph 300 python3 benchmarks/global_graph.py --sizes 5000 --device cpu --backends torch-exact \
    --lookups 2 --out "$OUT/global_graph.json"
  SIZES=(--set max_train=128 --set max_eval=64 --set epochs=1 --set max_length=32 --set batch_size=32)
else
  step loss_overhead 90 python3 benchmarks/loss_overhead.py --device cuda --batch-size 128 --max-length 128 \
    --steps 30 "${MODEL_ARG[@]}" --out "$OUT/loss_overhead.json"
  step ray_overhead 150 python3 benchmarks/ray_overhead.py --gpu --max-train 6400 --max-eval 700 --epochs 2 \
    --batch-size 128 --max-length 128 "${MODEL_ARG[@]}" --out "$OUT/ray_overhead.json"
  step global_graph 150 python3 benchmarks/global_graph.py --sizes 1000000 --device cuda --backends torch-exact \
    --torch-dtype float16 --max-exact-full 2000000 --out "$OUT/global_graph.json"
  if python3 -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
    step global_graph_faiss 150 python3 benchmarks/global_graph.py --sizes 1000000 --device cuda \
      --backends faiss-gpu --out "$OUT/global_graph_faiss.json"
  else
    echo "=== global_graph_faiss: skipped (no FAISS GPU build imports here)"
  fi
  SIZES=()
fi

rm -rf "$OUT/runs"
step mr_reference 300 python3 -m gloss_ray.cli bench --config configs/paper_minilm.yaml "${GPU_FLAG[@]}" \
  --benchmarks mr --losses ce,gloss --seeds 1 "${MODEL_SET[@]}" "${DATA_SET[@]}" "${SIZES[@]}" \
  --set progress=false --storage "$OUT/runs" --name mr_reference
cp "$OUT/runs/mr_reference/report/results.json" "$OUT/mr_reference.json" 2>/dev/null
for r in ce gloss; do
  cp "$OUT/runs/mr_reference/runs/mr/$r/seed0/history.csv" "$OUT/mr_reference_${r}_history.csv" 2>/dev/null
done

rm -rf "$OUT/runs"             # models and checkpoints: the figures are in the files above

python3 benchmarks/gpu_suite_summary.py "$OUT"
