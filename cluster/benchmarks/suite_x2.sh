#!/usr/bin/env bash
# Issues 3 and 6 on one two-GPU machine (nvidia-h100-x2) in two calls of the device tool:
#   bash cluster/benchmarks/suite_x2.sh OUT_DIR part1   # GPU 0: issue 6's engine benchmarks, decode
#       attention (uniform and mixed contexts), graph tests; GPU 1 beside it: transformers'
#       generate and generate_batch on the same workload (4b), then the attention kernel tests
#   bash cluster/benchmarks/suite_x2.sh OUT_DIR part2   # GPU 0: in-process then Ray throughput and
#       Ray latency (issue 3 item 7); GPU 1 beside it: the graph tests, prefix cache, latency and
#       decode attention; then DP=2 (against GPU 0's Ray DP=1) and TP=2 equality (item 8)
# Each lane is cut at LANE_LIMIT seconds (part1: 510 by default) so that the results are always packed into
# OUT_DIR/runs.tgz before the device tool's 600 s limit (it returns at most 8 files).
set -u
out=${1:?usage: suite_x2.sh OUT_DIR part1|part2}
work=/tmp/suite_runs
s=cluster/benchmarks/suite.sh
lane() {  # lane GPUS NAME STAGE...: one suite.sh run on those GPUs, bounded by the lane limit
  local gpus=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout "${LANE_LIMIT:-510}" bash $s $work/$name "$@" >$work.$name.txt 2>&1
}
mkdir -p $work
case ${2:?part1 or part2} in
  part1)
    lane 0 gpu0 throughput prefix latency attention attention_mixed graphtests &
    lane 1 gpu1 hf_generate hf_batch attntests &
    wait
    cat $work.gpu0.txt $work.gpu1.txt ;;
  part2)
    LANE_LIMIT=260 lane 0 gpu0 throughput ray &
    LANE_LIMIT=260 lane 1 gpu1 graphtests prefix latency attention &
    wait
    LANE_LIMIT=220 lane 0,1 gpu01 dp2 tp2eq
    cat $work.gpu0.txt $work.gpu1.txt $work.gpu01.txt ;;
esac
mkdir -p "$out"
tar czf "$out/runs.tgz" -C /tmp suite_runs
