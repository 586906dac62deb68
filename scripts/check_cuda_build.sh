#!/usr/bin/env bash
# Builds the CUDA path (`--features cuda`) on a machine without a GPU or a CUDA install, then runs the
# built binary there to show it starts and falls back to the CPU.
#
# The toolchain (CUDA 13.0 from NVIDIA's PyPI wheels, libcuda from Debian's non-free `libcuda1`, PTX for
# compute capability 8.0 unless CUDA_COMPUTE_CAP says otherwise) is set up by scripts/lib/cuda_toolchain.sh,
# which scripts/gpu_check.sh shares.
#
# Usage: scripts/check_cuda_build.sh            (venv in ~/.cache/pictor-cuda, binary in target/cuda/release)
# Needs: python3 with venv, network access to PyPI and deb.debian.org, about 3 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/cuda_toolchain.sh
. scripts/lib/cuda_toolchain.sh
cuda_toolchain
root_lib=$CUDA_TOOLCHAIN_LIB

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
nvcc --version | tail -2
cargo clippy -p pictor-engine -p pictor-cli --features pictor-cli/cuda --all-targets -- -D warnings
cargo build --release -p pictor-cli --features cuda

# Run the CUDA build here: with no GPU it must say so and produce the image on the CPU.
bin=$CARGO_TARGET_DIR/release/pictor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
LD_LIBRARY_PATH=$root_lib "$bin" make-demo-model "$work/models/checkpoints/demo"
LD_LIBRARY_PATH=$root_lib "$bin" img2img --models-dir "$work/models" --model demo \
    --init-image tests/fixtures/init-64.png --prompt "a fox" --num-inference-steps 4 --out "$work/out" \
    2>&1 | tee "$work/log"
grep -q "running on the CPU instead" "$work/log"
ls "$work/out"/*.png >/dev/null
echo "CUDA build OK: $bin"
