#!/usr/bin/env bash
# Here (a machine with PyPI): everything the GPU machine needs and cannot download, into .gpu/ and
# .whl/ at the repository root (both git-ignored): llama-cpp-python's sdist trimmed to what a CUDA
# build compiles (~3.7 MB instead of 77 MB), and py3.12 wheels of the packages its image lacks.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=0.3.36
mkdir -p .gpu .whl
if [ ! -f .gpu/llama-cpp-python-$VERSION-trimmed.tar.gz ]; then
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
        llama-cpp-python==$VERSION -d "$work"
    tar xzf "$work"/llama_cpp_python-$VERSION.tar.gz -C "$work"
    src="$work/llama_cpp_python-$VERSION"
    rm -rf "$src"/{.git,.github,examples,docs,tests,docker}
    (cd "$src/vendor/llama.cpp" && rm -rf models docs media benches tests examples tools gguf-py \
        conversion pocs app .devops .git .github)
    for d in "$src"/vendor/llama.cpp/ggml/src/ggml-*/; do
        case $(basename "$d") in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$d" ;; esac
    done
    tar czf .gpu/llama-cpp-python-$VERSION-trimmed.tar.gz -C "$work" "llama_cpp_python-$VERSION"
    rm -rf "$work"
fi
# The GPU image has numpy, numba, aiohttp, msgpack, xxhash, jinja2, prometheus-client, tqdm and
# typing-extensions; these it lacks (diskcache: llama_cpp's high-level module imports it).
for p in lmdb rocksdict zstandard gguf diskcache pydantic pydantic-core annotated-types \
         typing-inspection typing-extensions; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$p"
done
ls -la .gpu .whl
