#!/usr/bin/env bash
# Bring FlashAttention-4 (`flash-attn-4`, `flash_attn.cute`) to the GPU machine, which has no package index:
# run here, once, from the repository root, before `experiments/gpu_check.sh`'s two calls.
#
#     bash experiments/fa4_wheels.sh        # ~4 minutes (downloads ~100 MB, recompresses 92 MB)
#
# The wheels are ~100 MB, and one call of the device tool carries at most 64 MiB, the ~28 MB working tree
# included. The 92 MB CuTe-DSL runtime wheel (nvidia-cutlass-dsl-libs-cu13: a 193 MB MLIR library)
# is unpacked and recompressed as tar.xz (63.5 MB), then split: .fa4/a holds its first 36 MB, .fa4/b
# the rest and the six small wheels (36 MB). Call 1 carries .fa4/a, call 2 .fa4/b; a carried folder
# stays on a warm machine, so call 2 finds both (`gpu_check.sh 2` installs them into /tmp/site).
# A wheel's contents are what `pip install` puts in site-packages, so unpacking the tar there installs
# the runtime (its only install-time file, a .pth, comes with the small nvidia-cutlass-dsl wheel and
# is replaced by PYTHONPATH).
#
# Pinned: the versions that resolved on 2026-12-07 for Python 3.12 / x86-64 / CUDA 13 (cu13 flavour:
# the machine's torch 2.11 is built for CUDA 13 and its driver 580 supports it).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5)
SPLIT_AT=36000000
dl=.fa4/dl
mkdir -p "$dl" .fa4/a .fa4/b
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dl" "$wheel"
done
big=$(ls "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl)
if [ ! -s .fa4/cu13.tar.xz ]; then
    tmp=$(mktemp -d)
    python3 -m zipfile -e "$big" "$tmp"
    tar -C "$tmp" -cf - . | xz -9e -T2 > .fa4/cu13.tar.xz
    rm -rf "$tmp"
fi
rm -f .fa4/a/* .fa4/b/*
head -c "$SPLIT_AT" .fa4/cu13.tar.xz > .fa4/a/cu13.tar.xz.part1
tail -c +"$((SPLIT_AT + 1))" .fa4/cu13.tar.xz > .fa4/b/cu13.tar.xz.part2
for whl in "$dl"/*.whl; do
    [ "$whl" = "$big" ] || cp "$whl" .fa4/b/
done
sha256sum .fa4/cu13.tar.xz | cut -d' ' -f1 > .fa4/b/cu13.tar.xz.sha256
du -b .fa4/a .fa4/b
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "working tree: $tree_bytes bytes; each call carries it plus one piece (64 MiB = 67108864 at most)"
