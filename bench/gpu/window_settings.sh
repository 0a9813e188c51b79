#!/usr/bin/env bash
# On the GPU machine: a long prompt on a working set (bench_window_ops, the 8B shape, 40K tokens
# on an 8K hot tier) under several settings of this tree, alternating, ROUNDS times (default 2);
# the first run also serves the prompt with all of it hot (--baseline).
# VARIANTS: settings per variant separated by ';', KEY=VALUE pairs (or bench_window_ops options
# such as --store-threads=8) within one by spaces ('' for the defaults), e.g.
#   VARIANTS="; working_set.query_layer_stride=4" ROUNDS=2 bash bench/gpu/window_settings.sh
# (carry .gpu and .whl; ~60 s a run)
set -e
source bench/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m bench.gpu.make_model model .gpu/vocab.gguf /tmp/kvtier-8b.gguf --shape 8b
ARGS="--model /tmp/kvtier-8b.gguf --hot 8192 --tokens 40000 --generate 32"
IFS=';' read -ra variants <<< "${VARIANTS:-}"
first=--baseline
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in "${!variants[@]}"; do
    sets=()
    for kv in ${variants[$v]}; do
      case $kv in --*) sets+=("$kv") ;; *) sets+=(--set "$kv") ;; esac
    done
    echo "== round $round, variant $v: ${variants[$v]:-defaults}"
    python3 -m bench.bench_window_ops $ARGS $first "${sets[@]}" --out "$OUT/v${v}_$round" 2>&1 \
        | grep -v "budget of" | tail -32
    first=
  done
done
