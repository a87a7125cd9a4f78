#!/usr/bin/env bash
# The GPU runs of issues 3, 6 and 7 as named stages, each under its own time limit, so that one slow
# stage cannot take the others' results with it. Logs and results.jsonl land in OUT_DIR; a short
# summary is printed last. From the repository root:
#   bash cluster/benchmarks/suite.sh OUT_DIR STAGE...
# Stages on one GPU: tests attntests graphtests profile prefill_profile throughput gpu_profile latency prefix
#   phases skinny attention attention_mixed prefixhit hf_generate hf_batch ray (the Ray path's throughput and latency, issue 3 item 7)
#   serve (a `folovllm serve` on this GPU and `folovllm bench serve` against it, issue 6 item 4f)
# Stages on several GPUs (Ray): dp12 dp2 tp2eq (two GPUs), dp4 dp14 dp24 dp24ms tp8b tp32b (four GPUs),
#   dp8ms tp8b8 tp32b8 (eight GPUs)
# cluster/benchmarks/suite_x4.sh runs them on a four-GPU machine in two calls of the device tool.
set -u
out=${1:?usage: suite.sh OUT_DIR STAGE...}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >>"$out/gpu.txt" 2>&1

run() {  # run LOG LIMIT_S COMMAND...
  local log=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$log.log" 2>&1
  local rc=$?
  echo "$log rc=$rc $((SECONDS - t0))s" >>"$out/stages.txt"
  return $rc
}
offline="python -m cluster.benchmarks.offline"
scale="python -m cluster.benchmarks.scale_out"
tp_flags=${TP_FLAGS:-}  # e.g. TP_FLAGS=--enforce-eager for the tensor-parallel stages

for stage in "$@"; do
  case $stage in
    tests) run tests 500 python -m pytest -q --maxfail=10 -p no:cacheprovider tests/gpu ;;  # 424 s on an H100 (s6)
    attntests) run attntests 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_triton_attention.py ;;
    graphtests) run graphtests 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_prefill_graphs.py \
                  tests/gpu/test_engine_gpu.py ;;
    profile)
      run profile1 60 python -m cluster.benchmarks.step_profile --batch 1
      run profile128 60 python -m cluster.benchmarks.step_profile --batch 128 ;;
    prefill_profile) run prefill_profile 90 python -m cluster.benchmarks.step_profile --prefill 128 --steps 20 ;;
    throughput) run throughput 90 $offline throughput --trace --out "$out" ;;
    gpu_profile) run gpu_profile 120 $offline throughput --trace --gpu-profile --out "$out" ;;
    latency) run latency 60 $offline latency --out "$out" ;;
    prefix) run prefix 45 $offline prefix --out "$out" ;;
    phases) run phases 90 python -m cluster.benchmarks.request_phases --kernels ;;
    skinny) run skinny 150 python -m cluster.benchmarks.skinny_gemm_bench --rows 1,4,16 ;;
    attention) run attention 150 python -m cluster.benchmarks.attention_bench --out-dir "$out" ;;
    prefixhit) run prefixhit 120 python -m cluster.benchmarks.attention_bench --no-grid --prefix-hit \
                 --out-dir "$out/prefixhit" ;;
    attention_mixed) run attention_mixed 150 python -m cluster.benchmarks.attention_bench --mixed --no-grid \
                       --out-dir "$out/mixed" ;;
    hf_generate) run hf_generate 300 $offline hf --hf-modes generate --out "$out" ;;
    hf_batch) run hf_batch 300 $offline hf --hf-modes generate_batch --out "$out" ;;
    ray)
      run ray_throughput 100 $offline throughput --use-ray --out "$out"
      run ray_latency 150 $offline latency --use-ray --batches 32 --out "$out" ;;  # start-up alone ~60 s
    serve)
      # the server starts Ray and captures its graphs first: wait for its status to answer
      python -m cluster.cli serve --model ${SERVE_MODEL:-Qwen/Qwen3-0.6B} --load-format dummy --max-model-len 4096 \
        --max-num-seqs 256 --max-num-batched-tokens 16384 --port 50051 >"$out/serve_server.log" 2>&1 &
      server=$!
      for _ in $(seq 60); do
        python -m cluster.cli status --server 127.0.0.1:50051 >/dev/null 2>&1 && break
        kill -0 $server 2>/dev/null || break
        sleep 3
      done
      run serve 200 python -m cluster.cli bench serve --server 127.0.0.1:50051 \
        --request-rates ${SERVE_RATES:-4,16,32,64,inf} --num-prompts 200 --input-len 1024 --output-len 128 \
        --goodput ttft:2000 tpot:100 --label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
        --out "$out"
      kill $server; wait $server ;;
    dp12) run dp12 200 $scale dp --sizes 1,2 --out "$out" ;;
    dp2) run dp2 130 $scale dp --sizes 2 --out "$out" ;;  # no efficiency: divide by the ray stage's DP=1
    tp2eq) run tp2eq 140 $scale tp --sizes 1,2 --equality-only $tp_flags --out "$out" ;;
    dp4) run dp4 130 $scale dp --sizes 4 --out "$out" ;;  # likewise
    dp14) run dp14 220 $scale dp --sizes 1,4 --out "$out" ;;
    dp24) run dp24 280 $scale dp --sizes 1,2,4 --out "$out" ;;
    # multi-step decoding (the scheduler's host work once per k tokens, DP_STEPS, default 4):
    # s7-call3, DP=4 0.48 -> 0.85 with k=4
    dp24ms) run dp24ms 280 $scale dp --sizes 1,2,4 --num-scheduler-steps ${DP_STEPS:-4} --out "$out" ;;
    # eight GPUs; k=8 by default: at DP=8 one actor moved 176k tok/s at k=4, under the ~211k eight
    # H200s ask for, and 0.2-0.3M at k=8 (s15, notes-dp-scaling.md). Run DP_STEPS=16 beside it
    dp8ms) run dp8ms 300 $scale dp --sizes 1,8 --num-scheduler-steps ${DP_STEPS:-8} --out "$out" ;;
    tp8b8) run tp8b8 300 $scale tp --model Qwen/Qwen3-8B --sizes 1,8 --perf-sizes 8 --throughput $tp_flags \
             --out "$out" ;;  # eight GPUs: TP=8 equal to TP=1, then timed
    tp32b8) run tp32b8 300 $scale tp --model Qwen/Qwen3-32B --sizes 4,8 --perf-sizes 8 --throughput \
              --gpu-memory-utilization 0.95 $tp_flags --out "$out" ;;  # eight GPUs
    tp8b) run tp8b 220 $scale tp --model Qwen/Qwen3-8B --sizes 1,4 --perf-sizes 4 --throughput $tp_flags \
             --out "$out" ;;
    tp32b) run tp32b 230 $scale tp --model Qwen/Qwen3-32B --sizes 2,4 --perf-sizes 4 \
             --gpu-memory-utilization 0.95 $tp_flags --out "$out" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

cat "$out/stages.txt"
for log in tests attntests graphtests; do [ -f "$out/$log.log" ] && tail -n 2 "$out/$log.log"; done
grep -h "ms_per_step\|ms_per_request" "$out"/*profile*.log 2>/dev/null
grep -h '"bench"' "$out"/phases.log 2>/dev/null
[ -f "$out/results.jsonl" ] && python - "$out/results.jsonl" <<'PY'
import json, sys
keys = ("bench", "engine", "path", "dp", "tp", "model", "batch", "output_tok_per_s", "mean_ttft_ms", "mean_tpot_ms",
        "speedup", "cold_ttft_ms", "warm_ttft_ms", "efficiency", "equal", "decode_GBps", "prefill_s", "decode_s")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: (round(r[k], 2) if isinstance(r[k], float) else r[k]) for k in keys if k in r})
PY
exit 0
