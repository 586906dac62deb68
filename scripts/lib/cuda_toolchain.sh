# Sourced by scripts/check_cuda_build.sh and scripts/gpu_check.sh: a CUDA 13.0 toolchain for building
# `--features cuda` on a machine without a GPU or a CUDA install.
#
# The toolkit comes from NVIDIA's PyPI wheels (nvcc, headers, runtime, NVRTC, cuBLAS, cuRAND), all pinned to
# CUDA 13.0: cudarc 0.19 knows CUDA up to 13.4, and wheels of different minor versions do not mix (a newer
# nvvm's PTX is rejected by an older ptxas). candle links the driver library libcuda.so at build time; with
# no NVIDIA driver installed it is taken from Debian's non-free `libcuda1` package (downloaded, not
# installed). The GPU code is compiled to PTX for compute capability 8.0 (Ampere) unless CUDA_COMPUTE_CAP
# says otherwise; the driver JIT-compiles PTX for newer GPUs.
#
# cuda_toolchain: sets it up (venv in ${PICTOR_CUDA_CACHE:-~/.cache/pictor-cuda}, about 3 GB; needs python3
# with venv and network access to PyPI and deb.debian.org the first time), exports PATH, CUDA_ROOT,
# CUDA_PATH and CUDA_COMPUTE_CAP, and sets CUDA_TOOLCHAIN_LIB to the folder of the run-time libraries
# (for LD_LIBRARY_PATH).

cuda_toolchain() {
    local cache=${PICTOR_CUDA_CACHE:-$HOME/.cache/pictor-cuda}
    local venv=$cache/venv
    local root=$cache/cuda-root
    mkdir -p "$cache"

    if [ ! -x "$venv/bin/pip" ]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
        "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
    local wheels
    wheels=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

    # A CUDA root in the layout cudarc and candle-kernels look for: bin/nvcc, include, nvvm, lib64 with
    # unversioned library names for the linker.
    mkdir -p "$root/lib64"
    local d f name
    for d in bin include nvvm; do ln -sfn "$wheels/$d" "$root/$d"; done
    for f in "$wheels"/lib/*.so.*; do
        name=$(basename "$f")
        ln -sf "$f" "$root/lib64/$name"
        ln -sf "$f" "$root/lib64/${name%%.so*}.so"
    done
    if [ ! -e "$root/lib64/libcuda.so.1" ]; then
        local system_libcuda
        system_libcuda=$( (/sbin/ldconfig -p 2>/dev/null || true) | awk '/libcuda\.so\.1 /{print $NF; exit}')
        if [ -n "$system_libcuda" ]; then
            ln -sf "$system_libcuda" "$root/lib64/libcuda.so.1"
        else
            local apt_dir=$cache/apt
            mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
            cat > "$apt_dir/non-free.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            local apt_options=(-o "Dir::Etc::sourcelist=$apt_dir/non-free.sources" -o Dir::Etc::sourceparts=/dev/null
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
    CUDA_TOOLCHAIN_LIB=$root/lib64
}
