#!/usr/bin/env bash
# One-shot GPU check for issue 4 (the fast fp16/bf16 path): the CUDA tests, then both benchmarks with
# their default GPU settings. Meant for a session with a lent H100, run once from the repository root:
#
#     bash experiments/gpu_check.sh            # output also goes to $OUT/gpu_check.log when OUT is set
#
# Estimated wall time on one H100: ~1-2.5 min tests (hypothesis "fast" profile, ~110 small examples,
# plus random-init pythia-410m / 1.4b at 2048 tokens), ~1 min bench_forward (two presets, 5 variants,
# 13 timed calls each), ~1.5 min bench_generate (transformers' sdpa generate at ~19 tokens/s is the
# slow part, so it is timed once): about 5 minutes. Each step has a hard cap (180 + 40 + 120 + 50 + 140 s < 9 min,
# under the device tool's 10-minute limit per command) so a hang cannot eat the session's device time; a
# capped step reports exit code 124 and the script goes on. The benchmarks print each row as measured.
set -u
cd "$(dirname "$0")/.."
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
fi

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (cap ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    return 0
}

{
    echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) (+ uncommitted changes)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for pkg in ("transformers", "flash_attn", "hypothesis"):
    spec = importlib.util.find_spec(pkg)
    version = getattr(__import__(pkg), "__version__", "?") if spec else "not installed"
    print(pkg, version)
from neox_lab.model.flash import FLASH_KVCACHE_LEFTPAD, HAVE_FLASH_ATTN
print("neox_lab flash-attn path:", HAVE_FLASH_ATTN, "kvcache leftpad:", FLASH_KVCACHE_LEFTPAD)
EOF
    step "GPU tests" 180 python -m pytest tests/model/test_gpu.py -q -rs --maxfail=10 --tb=short --durations=8
    step "attention kernels" 40 python experiments/bench_attention_kernels.py
    step "bench_forward" 120 python experiments/bench_forward.py
    step "profile_forward" 50 python experiments/profile_forward.py
    step "bench_generate" 140 python experiments/bench_generate.py
    echo "=== done in ${SECONDS}s"
} 2>&1 | tee "$LOG"
