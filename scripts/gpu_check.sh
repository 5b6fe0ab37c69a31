#!/usr/bin/env bash
# The checks only a GPU shows, as one short run (about 10 minutes on one GPU) for a machine that has one:
#   bash scripts/gpu_check.sh            # writes $OUT (default outputs/gpu_check) and prints a summary
# 1. CUDA capture parity: the integration tier (SmolLM2) with the model on CUDA: captured states equal a
#    plain forward's hidden_states, /v1/score equals generation's p_correct.
# 2. A short default run on CUDA (600 questions): extraction throughput and the same probe pipeline.
# 3. vLLM on the GPU behind the proxy (scripts/engine_check.py with a CUDA vLLM): p_correct agreement and
#    proxy overhead at 1, 4 and 16 clients (target on a GPU: <= 5% p50); then extraction throughput on 600
#    questions, extract.engine=openai (vLLM generates, one teacher-forced forward captures) vs hf's generate.
# Nothing here runs in `make test`; every step is bounded by `timeout` so a stuck step cannot eat the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
TORCH_INDEX="${TORCH_INDEX:---index-url https://download.pytorch.org/whl/cu128}"
status=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (rc $?) in $((SECONDS - start)) s: tail of $OUT/$name.log"; tail -5 "$OUT/$name.log"
    status=1
  fi
}

step install 600 make install-dev TORCH_INDEX="$TORCH_INDEX"
step cuda_visible 60 .venv/bin/python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
# PROBECAL_TEST_DEVICE=cuda makes the integration tier load SmolLM2 on the GPU (model.device from config)
step capture_parity 600 env PROBECAL_TEST_DEVICE=cuda HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m integration tests/integration
step short_run 600 env HF_HUB_OFFLINE=1 .venv/bin/probecal run model.device=cuda data.limit=600 \
  extract.store_root="$OUT/stores" hydra.run.dir="$OUT/short_run"
step vllm_proxy 900 env HF_HUB_OFFLINE=1 ENGINE_VENV="${ENGINE_VENV:-$HOME/.cache/probecal/engines/vllm-cuda}" \
  .venv/bin/python scripts/engine_check.py --engine vllm --questions 16 --extract 600 --device cuda
grep -h "extract facts\|questions/s\|answers equal\|p50\|overhead\|max difference" "$OUT"/*.log | tail -20
exit $status
