#!/usr/bin/env bash
# tools/gpu_check.sh: stock Megatron-LM against Megatron-LM run through `folding megatron`, on the
# GPUs of one machine. Trains the same small MoE GPT twice with torchrun (same flags, same seed,
# mock data) and compares the two logs with tools/compare_runs.py: every loss at every iteration
# within RTOL, and the iteration-time ratio. docs/gpu-check.md says what it runs and how to read
# the result. Exit status: compare_runs.py's (0 pass, 1 losses differ or iterations missing),
# 1 when a training run fails, 2 when something it needs is missing.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: MEGATRON_LM=/path/to/Megatron-LM tools/gpu_check.sh [--help]

Runs a small MoE GPT (4 layers, hidden 512, 8 experts top-2, SequentialMLP experts, seq 1024,
mock data, NullTokenizer, bf16, Transformer Engine, alltoall dispatcher, 20 iterations) twice
with torchrun on this machine's GPUs:
  a  torchrun --nproc-per-node N $MEGATRON_LM/pretrain_gpt.py FLAGS
  b  torchrun --nproc-per-node N --no-python folding megatron -- $MEGATRON_LM/pretrain_gpt.py \
         FLAGS --folding-check-mesh --folding-dispatcher --folding-gpus-per-node N
then: python tools/compare_runs.py a.log b.log --rtol RTOL --skip-first 2

Environment (defaults in brackets):
  MEGATRON_LM  Megatron-LM checkout holding pretrain_gpt.py (required)
  NPROC        ranks [number of GPUs nvidia-smi lists]
  TP, PP, EP   tensor, pipeline, expert parallel sizes [1 GPU: TP1 EP1; 8 GPUs: TP2 EP4;
               otherwise TP2 when N is even and >= 4, EP the largest of 8, 4, 2 dividing N/(TP*PP)]
  ETP          expert tensor parallel size [Megatron's default: TP]
  MBS, GBS     micro and global batch size [2; 16, or MBS*DP when that does not divide 16]
  ITERS        training iterations [20]
  SEED         --seed of both runs [1234]
  RTOL         loss tolerance for compare_runs.py [1e-3]
  OUT          output directory [./gpu-check-out]: a.log, b.log, compare.txt, compare.json, env.txt
  CONTROL      1: also run (a) a second time and compare it with the first, to show the noise
               floor of two stock runs [0]
  PYTHON       interpreter for the checks and compare_runs.py [python]
  JOBS_CHECK   1: also run folding train and folding verify with --device cuda, folded
               dispatcher, EP over every GPU (train_cuda.json, verify_cuda.json) [1]
  LAYER_CHECK  1: also time one MoE layer at EP1, folded vs Megatron, with synchronisations
               counted (tools/bench_layer_ep1.py; layer_ep1.txt, layer_ep1.json) [1]
  FOLDING      the folding command [folding]
NCCL_ALGO=Ring, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0, CUBLAS_WORKSPACE_CONFIG=:4096:8 and
CUDA_DEVICE_MAX_CONNECTIONS=1 are set unless already set, so both runs use reproducible kernels.
EOF
}

json_error() {  # the final JSON line of a run that stopped before the comparison
    local msg=$1
    msg=${msg//\\/\\\\}
    msg=${msg//\"/\\\"}
    echo "{\"ok\": false, \"error\": \"$msg\"}"
}

die() {
    echo "gpu_check.sh: $*" >&2
    json_error "$*"
    exit 2
}

for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$arg' (settings come from the environment; see --help)" ;;
    esac
done

# ---------------------------------------------------------------- what the runs need
[[ -n "${MEGATRON_LM:-}" ]] \
    || die "MEGATRON_LM is not set: point it at a Megatron-LM checkout (the directory with" \
           "pretrain_gpt.py)"
[[ -f "$MEGATRON_LM/pretrain_gpt.py" ]] \
    || die "$MEGATRON_LM/pretrain_gpt.py does not exist: MEGATRON_LM must be a Megatron-LM checkout"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
FOLDING=${FOLDING:-folding}
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON)"
command -v torchrun >/dev/null || die "torchrun not found on PATH (it comes with torch)"
command -v "$FOLDING" >/dev/null \
    || die "$FOLDING not found on PATH (pip install -e . in the folding checkout, or set FOLDING)"
# Megatron-LM's own megatron/ package, for both runs (pretrain_gpt.py finds it next to itself;
# the launcher's run needs it on the path too), ahead of any installed megatron-core.
export PYTHONPATH="$MEGATRON_LM${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import transformer_engine.pytorch" 2>/dev/null \
    || die "Transformer Engine does not import with $PYTHON (pip install -e '.[gpu]')"

if [[ -z "${NPROC:-}" ]]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: set NPROC to the number of GPUs"
    NPROC=$(nvidia-smi -L | grep -c '^GPU ' || true)
fi
[[ "$NPROC" =~ ^[0-9]+$ ]] && (( NPROC >= 1 )) || die "no GPU to run on (NPROC=$NPROC)"

# ---------------------------------------------------------------- parallel sizes and batch
PP=${PP:-1}
if [[ -z "${TP:-}" ]]; then
    if (( NPROC >= 4 && NPROC % 2 == 0 )); then TP=2; else TP=1; fi
fi
(( NPROC % (TP * PP) == 0 )) || die "TP*PP = $((TP * PP)) does not divide $NPROC GPUs"
DP=$(( NPROC / (TP * PP) ))
if [[ -z "${EP:-}" ]]; then
    EP=1
    for e in 8 4 2; do
        if (( DP % e == 0 )); then EP=$e; break; fi
    done
fi
MBS=${MBS:-2}
if [[ -z "${GBS:-}" ]]; then
    if (( 16 % (MBS * DP) == 0 )); then GBS=16; else GBS=$(( MBS * DP )); fi
fi
ITERS=${ITERS:-20}
SEED=${SEED:-1234}
RTOL=${RTOL:-1e-3}
OUT=${OUT:-./gpu-check-out}
CONTROL=${CONTROL:-0}

# Reproducible kernels and collectives: run-to-run noise would otherwise hide (or fake) a
# difference between the two dispatchers.
export NCCL_ALGO=${NCCL_ALGO:-Ring}
export NVTE_ALLOW_NONDETERMINISTIC_ALGO=${NVTE_ALLOW_NONDETERMINISTIC_ALGO:-0}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

# ---------------------------------------------------------------- the model: one flag list, both runs
# No --moe-grouped-gemm: the folded dispatcher builds SequentialMLP experts, so the stock run
# must use them too for the losses to be comparable.
FLAGS=(
    --num-layers 4 --hidden-size 512 --ffn-hidden-size 2048 --num-attention-heads 8
    --group-query-attention --num-query-groups 4
    --seq-length 1024 --max-position-embeddings 1024
    --position-embedding-type rope --normalization RMSNorm --swiglu
    --disable-bias-linear --untie-embeddings-and-output-weights
    --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1024
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --train-iters "$ITERS" --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
    --weight-decay 0.1 --clip-grad 1.0 --init-method-std 0.02 --seed "$SEED"
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32000
    --bf16 --transformer-impl transformer_engine
    --log-interval 1 --log-throughput --eval-iters 0 --eval-interval 1000
    --distributed-timeout-minutes 10
)
if [[ -n "${ETP:-}" ]]; then FLAGS+=(--expert-tensor-parallel-size "$ETP"); fi
if (( TP > 1 )); then FLAGS+=(--sequence-parallel); fi   # Megatron's MoE layer requires it with TP
# Megatron's non-TE linears (the output layer) fuse gradient accumulation only with Apex's
# extension; without it Megatron refuses to build the model unless fusion is off.
if ! "$PYTHON" -c "import fused_weight_gradient_mlp_cuda" 2>/dev/null; then
    FLAGS+=(--no-gradient-accumulation-fusion)
fi

mkdir -p "$OUT"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "NPROC=$NPROC TP=$TP PP=$PP EP=$EP ETP=${ETP:-TP} DP=$DP MBS=$MBS GBS=$GBS" \
         "ITERS=$ITERS SEED=$SEED"
    commit=$(git -C "$MEGATRON_LM" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)")
    echo "Megatron-LM: $MEGATRON_LM $commit"
    "$PYTHON" - <<'PY' 2>&1 || true
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
for name in ("transformer_engine", "flash_attn", "apex", "megatron.core", "folding"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no version)"), getattr(module, "__file__", ""))
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(name, "not importable:", type(e).__name__)
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    echo "flags: ${FLAGS[*]}"
} >"$OUT/env.txt"

# ---------------------------------------------------------------- the runs
train() {  # train NAME COMMAND...: COMMAND's output to $OUT/NAME.log; on failure its tail, exit 1
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    if ! "$@" >"$OUT/$name.log" 2>&1; then
        echo "gpu_check.sh: run $name failed; the end of $OUT/$name.log:" >&2
        tail -n 40 "$OUT/$name.log" >&2
        json_error "run $name failed; see $OUT/$name.log"
        exit 1
    fi
    echo "   done in $(( SECONDS - start )) s, log $OUT/$name.log"
}

train a torchrun --standalone --nproc-per-node "$NPROC" "$MEGATRON_LM/pretrain_gpt.py" "${FLAGS[@]}"
train b torchrun --standalone --nproc-per-node "$NPROC" --no-python "$FOLDING" megatron -- \
    "$MEGATRON_LM/pretrain_gpt.py" "${FLAGS[@]}" \
    --folding-check-mesh --folding-dispatcher --folding-gpus-per-node "$NPROC"

if [[ "$CONTROL" == 1 ]]; then
    train a2 torchrun --standalone --nproc-per-node "$NPROC" "$MEGATRON_LM/pretrain_gpt.py" \
        "${FLAGS[@]}"
    echo "== control: stock against stock (informational)"
    "$PYTHON" "$HERE/compare_runs.py" "$OUT/a.log" "$OUT/a2.log" --rtol "$RTOL" --skip-first 2 \
        >"$OUT/control.txt" || true
    awk 'summary && !/^[{]/; /^$/ { summary = 1 }' "$OUT/control.txt"
fi

# ---------------------------------------------------------------- the comparison
jobs_failed=()
echo "== compare: $PYTHON tools/compare_runs.py $OUT/a.log $OUT/b.log --rtol $RTOL --skip-first 2"
rc=0
"$PYTHON" "$HERE/compare_runs.py" "$OUT/a.log" "$OUT/b.log" --rtol "$RTOL" --skip-first 2 \
    >"$OUT/compare.txt" || rc=$?
cat "$OUT/compare.txt"
tail -n 1 "$OUT/compare.txt" >"$OUT/compare.json"

# ---------------------------------------------------------------- one layer, all overhead visible
# One MoE layer at EP1 (8k tokens, 64 experts, top-8, bf16) on one GPU, folded against Megatron's
# alltoall, with CUDA's sync debug mode counting synchronisations (targets: ratio <= 1.1, equal).
echo "== one MoE layer at EP1: $PYTHON tools/bench_layer_ep1.py --device cuda"
if [[ "${LAYER_CHECK:-1}" == 1 ]]; then
    "$PYTHON" "$HERE/bench_layer_ep1.py" --device cuda >"$OUT/layer_ep1.txt" 2>&1 || rc=1
    grep -v '^{' "$OUT/layer_ep1.txt" | tail -n 3
    tail -n 1 "$OUT/layer_ep1.txt" >"$OUT/layer_ep1.json"
fi
# ---------------------------------------------------------------- the project's own jobs on GPUs
# folding train and verify with one GPU per rank (NCCL): the folded dispatcher on GPUs, checked
# against a single process on the same device.
if [[ "${JOBS_CHECK:-1}" == 1 ]]; then
    echo "== $FOLDING train --device cuda --nproc $NPROC --dispatcher folded --steps 5 --json"
    "$FOLDING" train --device cuda --nproc "$NPROC" --tp 1 --ep "$NPROC" --gpus-per-node "$NPROC" \
        --dispatcher folded --steps 5 --json >"$OUT/train_cuda.json" 2>"$OUT/train_cuda.err" \
        || { rc=1; jobs_failed+=(train); tail -n 5 "$OUT/train_cuda.err"; }
    echo "== $FOLDING verify --device cuda --world-size $NPROC --ep $NPROC --dispatcher folded --json"
    "$FOLDING" verify --device cuda --world-size "$NPROC" --tp 1 --ep "$NPROC" \
        --gpus-per-node "$NPROC" --dispatcher folded --json >"$OUT/verify_cuda.json" \
        2>"$OUT/verify_cuda.err" || { rc=1; jobs_failed+=(verify); tail -n 5 "$OUT/verify_cuda.err"; }
fi

# The last line: compare_runs.py's JSON object, with the other checks' results added.
OUT="$OUT" RC="$rc" JOBS_FAILED="${jobs_failed[*]:-}" "$PYTHON" - <<'PY'
import json, os
out = os.environ["OUT"]
def load(name):
    path = os.path.join(out, name)
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
result = load("compare.json") or {}
result.update(ok=os.environ["RC"] == "0", layer_ep1=load("layer_ep1.json"),
              jobs_failed=os.environ["JOBS_FAILED"].split())
print(json.dumps(result))
PY
exit "$rc"
