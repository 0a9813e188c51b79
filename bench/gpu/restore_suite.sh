#!/usr/bin/env bash
# On the GPU machine: the restore and store measurements of docs/benchmarks.md, on a random-weight
# Llama 3.1 8B shape with all layers on the GPU(s) and flash attention on.
#
#     bash bench/gpu/restore_suite.sh q8 f16 q8_0 bs64     # any of the runs, in order
#
# Results (JSON, the printed tables, the GPU's name and driver) go to $OUT (the device tool's
# return folder), else bench/out/. The model is made once per machine in /tmp (~3 min, 15 GB).
set -eo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/setup.sh
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
MODEL=/tmp/kvtier-8b.gguf
if [ ! -f $MODEL ]; then
    start=$(date +%s)
    python3 -m bench.gpu.make_model model .gpu/vocab.gguf $MODEL.part --shape 8b >/dev/null
    mv $MODEL.part $MODEL
    echo "8B model made in $(( $(date +%s) - start )) s"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

run() {
    local name=$1
    shift
    echo "== $name: $*"
    python3 -m bench.bench_restore --model $MODEL --n-gpu-layers -1 --flash-attn on \
        --out "$OUT/$name" "$@" 2>"/tmp/$name.log" | tee "$OUT/$name.txt" \
        || { tail -30 "/tmp/$name.log"; return 1; }
}

for phase in "$@"; do
    case $phase in
        q8) run restore_8b_q8 --lengths 8192 32768 --repeats 3 ;;
        f16) run restore_8b_f16 --lengths 8192 32768 --repeats 3 --warm-format f16 --tiers warm ;;
        q8_0) run restore_8b_q8_0 --lengths 8192 32768 --repeats 3 --cache-type q8_0 \
                  --tiers warm cool ;;
        bs64) run restore_8b_bs64 --lengths 32768 --repeats 3 --block-size 64 --tiers warm ;;
        *) echo "unknown run: $phase" >&2; exit 2 ;;
    esac
done
