#!/usr/bin/env bash
# On the GPU machine: a long prompt on a working set (bench_window_ops, the 8B shape, 40K tokens
# on an 8K hot tier), this tree against an older one, alternating, ROUNDS times (default 2); the
# first round of this tree also serves the prompt with all of it hot (--baseline).
# Make the older tree here first: git archive <rev> kvtier bench | gzip > .gpu/base.tar.gz
# Run there: ROUNDS=1 bash bench/gpu/window_ab.sh   (carry .gpu and .whl; ~100 s a round)
set -e
source bench/gpu/setup.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m bench.gpu.make_model model .gpu/vocab.gguf /tmp/kvtier-8b.gguf --shape 8b
mkdir -p /tmp/base && tar xzf .gpu/base.tar.gz -C /tmp/base
ARGS="--model /tmp/kvtier-8b.gguf --hot 8192 --tokens 40000 --generate 32"
for round in $(seq 1 "${ROUNDS:-2}"); do
  python3 -m bench.bench_window_ops $ARGS $([ "$round" = 1 ] && echo --baseline) \
      --out "$OUT/new_$round" 2>&1 | grep -v "budget of" | tail -32
  (cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base python3 -m bench.bench_window_ops $ARGS \
      --out "$OUT/base_$round" 2>&1 | grep -v "budget of" | tail -22)
done
