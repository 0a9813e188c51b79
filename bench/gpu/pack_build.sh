#!/usr/bin/env bash
# On the GPU machine, after setup.sh built llama-cpp-python: pack the build into $OUT as xz pieces
# of at most 15 MiB (the device tool brings back files of up to 16 MiB), with the libraries' .so
# and .so.0 names as symbolic links (pip writes three copies of each). Bring the pieces back into
# .gpu/ and the next setup.sh unpacks them instead of compiling.
set -euo pipefail
SITE=/tmp/site
stage=$(mktemp -d)
cp -a $SITE/llama_cpp "$stage"/
(cd "$stage"/llama_cpp/lib
 for f in *.so.*.*; do
     base=${f%%.so.*}.so
     major=$(echo "$f" | sed -E 's/^(.*\.so\.[0-9]+)\..*/\1/')
     ln -sf "$f" "$major"; ln -sf "$f" "$base"
 done)
find "$stage"/llama_cpp -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$stage" llama_cpp | xz -T0 -6 | split -b 15M -d - "${OUT:?}/llama_cpp-cuda.tar.xz.part"
rm -rf "$stage"
ls -la "$OUT"
