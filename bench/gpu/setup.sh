#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels and a CUDA build of
# llama-cpp-python into /tmp/site, outside the repository (carried paths are replaced each call).
# A build brought back by pack_build.sh (.gpu/llama_cpp-cuda.tar.xz.part*) is unpacked instead of
# compiled (~5 min).
# Source it: `source bench/gpu/setup.sh`; it exports PYTHONPATH.
set -eo pipefail
SITE=/tmp/site
VERSION=0.3.36
export PYTHONPATH=$SITE:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f $SITE/.ready ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE .whl/*.whl
    if ls .gpu/llama_cpp-cuda.tar.xz.part* >/dev/null 2>&1; then
        cat .gpu/llama_cpp-cuda.tar.xz.part* | xz -d | tar xf - -C $SITE
    else
        work=$(mktemp -d)
        tar xzf .gpu/llama-cpp-python-$VERSION-trimmed.tar.gz -C "$work"
        start=$(date +%s)
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-build-isolation \
            --no-deps --no-cache-dir --target $SITE "$work/llama_cpp_python-$VERSION"
        echo "llama-cpp-python CUDA build: $(( $(date +%s) - start )) s"
    fi
    touch $SITE/.ready
fi
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload:',
            bool(llama_cpp.llama_supports_gpu_offload()))"
