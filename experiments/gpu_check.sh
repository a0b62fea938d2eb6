#!/usr/bin/env bash
# The GPU check for issue 27, in two calls of the device tool that fit one session's 15 minutes of device
# time on one card (an H100 or an H200: the card is printed first; name it beside every number).
#
# Prepare here, once: `bash experiments/fa4_wheels.sh` (FlashAttention-4's wheels in two pieces under
# .fa4/a and .fa4/b, each small enough to travel beside the working tree). Then, from the repository root:
#
#     call 1, carry [".fa4/a"]:  bash experiments/gpu_check.sh 1    # ~6 min (caps sum to 8.8 min)
#     call 2, carry [".fa4/b"]:  bash experiments/gpu_check.sh 2    # ~4 min (caps sum to 6.8 min)
#
# Make call 2 at once after call 1 returns: the machine stays warm ~30 s after a call, and only a warm
# machine still holds .fa4/a (a fresh one makes part 2 skip FlashAttention-4 and run the rest).
#
# Part 1: the GPU tests (tests/model/test_gpu.py with the 2048-token numerics at Pythia shapes, and
#         test_placement_gpu.py), bench_forward fp16 (every variant) and bf16 (plain forwards),
#         profile_forward, bench_generate (plain and compiled decoding against transformers' sdpa).
# Part 2: FlashAttention-4 installed into /tmp/site from the two pieces, bench_attention_kernels with
#         it beside cuDNN and torch's flash, `neox-lab compare` fp16 against fp32 at 2048 tokens on a
#         trained-like pythia-410m-shaped checkpoint, bench_placement's GPU offload table.
#
# Each step has a hard cap, so a hang cannot eat the session's device time: a capped step reports exit
# code 124 and the script goes on. Output also goes to $OUT/gpu_check_<part>.log when OUT is set.
set -u
cd "$(dirname "$0")/.."
PART=${1:-1}
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check_$PART.log"
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the machine's python3 is the one holding torch
FA4_PATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages

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

environment() {
    echo "=== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) (+ uncommitted changes), part $PART"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for pkg in ("transformers", "accelerate", "hypothesis"):
    spec = importlib.util.find_spec(pkg)
    print(pkg, getattr(__import__(pkg), "__version__", "?") if spec else "not installed")
from neox_lab.model.flash import FLASH_KVCACHE_LEFTPAD, HAVE_FLASH_ATTN
print("neox_lab flash-attn (FA2) path:", HAVE_FLASH_ATTN, "kvcache leftpad:", FLASH_KVCACHE_LEFTPAD)
EOF
}

install_fa4() {  # the pieces of experiments/fa4_wheels.sh into /tmp/site; returns 1 when they are not all here
    if ! ls .fa4/a/cu13.tar.xz.part1 .fa4/b/cu13.tar.xz.part2 >/dev/null 2>&1; then
        echo "FlashAttention-4 pieces missing (.fa4/a comes with call 1 and stays only on a warm machine)"
        return 1
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .fa4/b/*.whl \
        || return 1
    $PY - <<'EOF' || return 1
import hashlib, io, lzma, pathlib, tarfile
blob = pathlib.Path(".fa4/a/cu13.tar.xz.part1").read_bytes() + pathlib.Path(".fa4/b/cu13.tar.xz.part2").read_bytes()
expected = pathlib.Path(".fa4/b/cu13.tar.xz.sha256").read_text().split()[0]
assert hashlib.sha256(blob).hexdigest() == expected, "the two pieces do not join into the prepared archive"
with tarfile.open(fileobj=io.BytesIO(lzma.decompress(blob))) as tar:
    tar.extractall("/tmp/site", filter="tar")
print("FlashAttention-4 and the CuTe-DSL runtime unpacked into /tmp/site")
EOF
    PYTHONPATH=$FA4_PATH $PY -c "import flash_attn.cute as f; print('flash_attn.cute', f.__version__, 'imports')"
}

checkpoint_410m() {  # a trained-like pythia-410m-shaped checkpoint (weights ~N(0, 5 / d_model)) for compare
    $PY - "$1" <<'EOF'
import math, sys
from neox_lab import PRESETS, NeoXForCausalLM
from neox_lab.testing.pairs import make_trained_like
cfg = PRESETS["pythia-410m"]
model = make_trained_like(NeoXForCausalLM(cfg), seed=1, std=math.sqrt(5 / cfg.hidden_size), bias_std=0.1)
model.save_pretrained(sys.argv[1])
print("wrote", sys.argv[1])
EOF
}

export -f install_fa4 checkpoint_410m  # so that `timeout` (in step) can run them through bash
export PY FA4_PATH
{
    environment
    if [ "$PART" = 1 ]; then
        step "GPU tests" 200 $PY -m pytest tests/model/test_gpu.py tests/model/test_placement_gpu.py -q -rs \
            --maxfail=10 --tb=short --durations=10
        step "bench_forward fp16" 100 $PY experiments/bench_forward.py --dtype fp16
        step "bench_forward bf16" 70 $PY experiments/bench_forward.py --dtype bf16 --backends flash \
            --no-hf-eager --forward-only
        step "profile_forward" 45 $PY experiments/profile_forward.py
        step "bench_generate" 110 $PY experiments/bench_generate.py --variants hf_sdpa neox neox_compile
    else
        step "FlashAttention-4 install" 90 bash -c install_fa4
        # Without the pieces /tmp/site is empty and the benchmark says FlashAttention-4 does not import.
        step "attention kernels" 150 env PYTHONPATH="$FA4_PATH" $PY experiments/bench_attention_kernels.py
        step "checkpoint" 40 bash -c "checkpoint_410m /tmp/ckpt_410m"
        step "compare fp16 vs fp32 at 2048" 100 $PY -m neox_lab compare /tmp/ckpt_410m /tmp/ckpt_410m \
            --dtype-a float16 --dtype-b float32 --backend-a flash --backend-b eager --seq-len 2048 --batch 1 \
            --device cuda --only-failures
        step "bench_placement (GPU offload)" 100 $PY experiments/bench_placement.py --device cuda \
            --preset pythia-1.4b --tokens 2048 --repeats 3
    fi
    echo "=== done in ${SECONDS}s"
} 2>&1 | tee "$LOG"
