#!/usr/bin/env bash
# Builds the CUDA path (`--features cuda`) on a machine without a GPU or a CUDA install, then runs the
# built binary there to show it starts and falls back to the CPU.
#
# The toolkit comes from NVIDIA's PyPI wheels (nvcc, headers, runtime, NVRTC, cuBLAS, cuRAND), all pinned to
# CUDA 13.0: cudarc 0.19 knows CUDA up to 13.4, and wheels of different minor versions do not mix (a newer
# nvvm's PTX is rejected by an older ptxas). candle links the driver library libcuda.so at build time; with
# no NVIDIA driver installed it is taken from Debian's non-free `libcuda1` package (downloaded, not
# installed). The GPU code is compiled to PTX for compute capability 8.0 (Ampere) unless CUDA_COMPUTE_CAP
# says otherwise; the driver JIT-compiles PTX for newer GPUs.
#
# Usage: scripts/check_cuda_build.sh            (venv in ~/.cache/pictor-cuda, binary in target/cuda/release)
# Needs: python3 with venv, network access to PyPI and deb.debian.org, about 3 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${PICTOR_CUDA_CACHE:-$HOME/.cache/pictor-cuda}
venv=$cache/venv
root=$cache/cuda-root
mkdir -p "$cache"

if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
wheels=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

# A CUDA root in the layout cudarc and candle-kernels look for: bin/nvcc, include, nvvm, lib64 with
# unversioned library names for the linker.
mkdir -p "$root/lib64"
for d in bin include nvvm; do ln -sfn "$wheels/$d" "$root/$d"; done
for f in "$wheels"/lib/*.so.*; do
    name=$(basename "$f")
    ln -sf "$f" "$root/lib64/$name"
    ln -sf "$f" "$root/lib64/${name%%.so*}.so"
done
if [ ! -e "$root/lib64/libcuda.so.1" ]; then
    system_libcuda=$( (/sbin/ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 /{print $NF; exit}')
    if [ -n "$system_libcuda" ]; then
        ln -sf "$system_libcuda" "$root/lib64/libcuda.so.1"
    else
        apt_dir=$cache/apt
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
        cat > "$apt_dir/non-free.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt_options=(-o "Dir::Etc::sourcelist=$apt_dir/non-free.sources" -o Dir::Etc::sourceparts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
        apt-get "${apt_options[@]}" update >/dev/null
        (cd "$apt_dir/deb" && apt-get "${apt_options[@]}" download libcuda1 >/dev/null 2>&1)
        dpkg-deb -x "$apt_dir"/deb/libcuda1_*.deb "$apt_dir/extracted"
        cp "$(find "$apt_dir/extracted" -name 'libcuda.so.[0-9]*.*' | head -1)" "$root/lib64/libcuda.so.1"
    fi
fi
ln -sf libcuda.so.1 "$root/lib64/libcuda.so"

export PATH=$root/bin:$PATH CUDA_ROOT=$root CUDA_PATH=$root
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
nvcc --version | tail -2
cargo clippy -p pictor-engine -p pictor-cli --features pictor-cli/cuda --all-targets -- -D warnings
cargo build --release -p pictor-cli --features cuda

# Run the CUDA build here: with no GPU it must say so and produce the image on the CPU.
bin=$CARGO_TARGET_DIR/release/pictor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
LD_LIBRARY_PATH=$root/lib64 "$bin" make-demo-model "$work/models/checkpoints/demo"
LD_LIBRARY_PATH=$root/lib64 "$bin" img2img --models-dir "$work/models" --model demo \
    --init-image tests/fixtures/init-64.png --prompt "a fox" --num-inference-steps 4 --out "$work/out" \
    2>&1 | tee "$work/log"
grep -q "running on the CPU instead" "$work/log"
ls "$work/out"/*.png >/dev/null
echo "CUDA build OK: $bin"
