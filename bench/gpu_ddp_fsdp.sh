#!/usr/bin/env bash
# DDP (one GPU process, bf16 and fp32) and FSDP (one process, bf16) on the same
# distillation recipe: seconds per student step and peak CUDA memory, each configuration
# in a fresh launch. Then a causal_lm recipe (token-level forward KL, GPT-2 vocabulary):
# DDP with one process in bf16 and fp32 and, on a machine with 2+ GPUs, 2 processes with
# the teacher replicated and sharded, and the student under FSDP (1 process; 2 with the
# teacher sharded). Writes docs/results/gpu_ddp_fsdp.json (see
# bench/gpu_ddp_fsdp.py).
#
#   bench/gpu_ddp_fsdp.sh            # needs a CUDA GPU; ~5 minutes on one H100
#   bench/gpu_ddp_fsdp.sh --smoke    # CPU fallback: digits, tiny models, checks the plumbing;
#                                    # writes bench/.cache/gpu_ddp_fsdp_smoke.json, not results
# MNIST=/path/to/mnist overrides where the IDX files are (default ../shared/data/mnist).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"

if [[ -z "$SMOKE" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU here; run with --smoke for the CPU plumbing check" >&2
    exit 2
fi
WORK="$ROOT/bench/.cache/gpu_ddp_fsdp"
rm -rf "$WORK"; mkdir -p "$WORK"
if [[ -n "$SMOKE" ]]; then
    JSON="$ROOT/bench/.cache/gpu_ddp_fsdp_smoke.json"
    export OMP_NUM_THREADS=1
else
    JSON="$ROOT/docs/results/gpu_ddp_fsdp.json"
fi
rm -f "$JSON"
DATA=()
MNIST="${MNIST:-}"
if [[ -z "$MNIST" ]]; then
    for d in "$ROOT/../shared/data/mnist" "$ROOT/shared/data/mnist"; do
        [[ -d "$d" ]] && MNIST="$(cd "$d" && pwd)" && break
    done
fi
[[ -n "$MNIST" && -z "$SMOKE" ]] && DATA=(--mnist "$MNIST")
LMDATA=()  # TinyShakespeare and the GPT-2 tokenizer (default: the recipe's paths)
for d in "$ROOT/../shared/data" "$ROOT/shared/data"; do
    [[ -d "$d/tinyshakespeare" ]] && LMDATA=(--shared "$(cd "$d" && pwd)") && break
done

port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
torchrun1() { "$PY" -m torch.distributed.run --nnodes 1 --nproc_per_node 1 --master_port "$(port)" "$@"; }
fsdp1() {
    "$PY" -m accelerate.commands.launch --use_fsdp --num_processes 1 --num_machines 1 \
        --mixed_precision "$1" --dynamo_backend no --main_process_port "$(port)" "${@:2}"
}
B=(bench/gpu_ddp_fsdp.py)

echo "== teacher (trained once, under the launcher)"
ACCELERATE_MIXED_PRECISION=bf16 torchrun1 "${B[@]}" prepare --out "$WORK/teacher" $SMOKE "${DATA[@]}"
T="$WORK/teacher/teacher/model.safetensors"

echo "== DDP, 1 process, bf16"
DK_BENCH_LAUNCH="ACCELERATE_MIXED_PRECISION=bf16 torchrun --nproc_per_node 1" \
ACCELERATE_MIXED_PRECISION=bf16 torchrun1 "${B[@]}" measure --name ddp_bf16 \
    --out "$WORK/ddp_bf16" --teacher "$T" --json "$JSON" $SMOKE "${DATA[@]}"
echo "== DDP, 1 process, fp32"
DK_BENCH_LAUNCH="torchrun --nproc_per_node 1" \
torchrun1 "${B[@]}" measure --name ddp_fp32 \
    --out "$WORK/ddp_fp32" --teacher "$T" --json "$JSON" $SMOKE "${DATA[@]}"
echo "== FSDP, 1 process, bf16"
DK_BENCH_LAUNCH="accelerate launch --use_fsdp --num_processes 1 --mixed_precision bf16" \
fsdp1 bf16 "${B[@]}" measure --name fsdp_bf16 \
    --out "$WORK/fsdp_bf16" --teacher "$T" --json "$JSON" $SMOKE "${DATA[@]}"
echo "== FSDP, 1 process, fp32"
DK_BENCH_LAUNCH="accelerate launch --use_fsdp --num_processes 1 --mixed_precision no" \
fsdp1 no "${B[@]}" measure --name fsdp_fp32 \
    --out "$WORK/fsdp_fp32" --teacher "$T" --json "$JSON" $SMOKE "${DATA[@]}"

echo "== causal_lm: teacher (trained once, under the launcher)"
torchrun1 "${B[@]}" lm-prepare --out "$WORK/lm_teacher" $SMOKE "${LMDATA[@]}"
LT="$WORK/lm_teacher/teacher/model"
for dtype in bf16 fp32; do
    echo "== causal_lm: DDP, 1 process, $dtype"
    DK_BENCH_LAUNCH="torchrun --nproc_per_node 1" \
    torchrun1 "${B[@]}" lm-measure --name "lm_ddp_$dtype" --dtype "$dtype" \
        --out "$WORK/lm_ddp_$dtype" --teacher "$LT" --json "$JSON" $SMOKE "${LMDATA[@]}"
done
echo "== causal_lm: FSDP, 1 process, bf16"
DK_BENCH_LAUNCH="accelerate launch --use_fsdp --num_processes 1 --mixed_precision bf16" \
fsdp1 bf16 "${B[@]}" lm-measure --name lm_fsdp_bf16 --dtype bf16 \
    --out "$WORK/lm_fsdp_bf16" --teacher "$LT" --json "$JSON" $SMOKE "${LMDATA[@]}"
# two processes: two GPUs, or (smoke) two CPU processes
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [[ -n "$SMOKE" || "$NGPU" -ge 2 ]]; then
    for placement in replicate shard; do
        echo "== causal_lm: DDP, 2 processes, bf16, teacher $placement"
        DK_BENCH_LAUNCH="torchrun --nproc_per_node 2" \
        "$PY" -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --master_port "$(port)" \
            "${B[@]}" lm-measure --name "lm_ddp2_bf16_$placement" --dtype bf16 \
            --placement "$placement" --out "$WORK/lm_ddp2_$placement" --teacher "$LT" \
            --json "$JSON" $SMOKE "${LMDATA[@]}"
    done
    echo "== causal_lm: FSDP student, 2 processes, bf16, teacher shard"
    DK_BENCH_LAUNCH="accelerate launch --use_fsdp --num_processes 2 --mixed_precision bf16" \
    "$PY" -m accelerate.commands.launch --use_fsdp --num_processes 2 --num_machines 1 \
        --mixed_precision bf16 --dynamo_backend no --main_process_port "$(port)" \
        "${B[@]}" lm-measure --name lm_fsdp2_bf16_shard --dtype bf16 --placement shard \
        --out "$WORK/lm_fsdp2_shard" --teacher "$LT" --json "$JSON" $SMOKE "${LMDATA[@]}"
fi
echo "wrote $JSON"
