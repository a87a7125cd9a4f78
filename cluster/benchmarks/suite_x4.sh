#!/usr/bin/env bash
# Issues 3, 6 and 7 on one four-GPU machine (nvidia-h100-x4), one call of the device tool each:
#   bash cluster/benchmarks/suite_x4.sh OUT_DIR part1   # three lanes at once, below
#   bash cluster/benchmarks/suite_x4.sh OUT_DIR part2   # DP=1 and DP=4 (efficiency in one run), Qwen3-8B TP
#   bash cluster/benchmarks/suite_x4.sh OUT_DIR part3   # Qwen3-32B tensor parallel
#   bash cluster/benchmarks/suite_x4.sh OUT_DIR check   # one call: graph tests and latency on GPU 0
#       beside, one Ray run at a time: TP=2 equality (GPUs 2-3), in-process then Ray throughput on
#       GPU 1 back to back and Ray latency (issue 3 item 7), then DP=2 and DP=4 on all four
# part1: GPU 0 the graph tests, decode attention bandwidth and transformers' generate_batch;
#        GPU 1 the offline engine benchmarks and transformers' generate; GPUs 2-3 the Ray path
#        against in-process (issue 3 item 7), DP=1/2 scaling and TP=2 equality (item 8).
# Only lane 3 starts Ray, so no two Ray instances share the host. Everything is packed into
# OUT_DIR/runs.tgz, as the device tool returns at most 8 files.
set -u
out=${1:?usage: suite_x4.sh OUT_DIR part1|part2|part3|check}
work=/tmp/suite_runs
s=cluster/benchmarks/suite.sh
case ${2:?part1, part2, part3 or check} in
  part1)
    CUDA_VISIBLE_DEVICES=0 bash $s $work/gpu0 graphtests attention hf_batch >$work.gpu0.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=1 bash $s $work/gpu1 throughput latency prefix prefill_profile hf_generate \
      >$work.gpu1.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=2,3 bash $s $work/gpu23 ray dp12 tp2eq >$work.gpu23.txt 2>&1 &
    wait
    cat $work.gpu0.txt $work.gpu1.txt $work.gpu23.txt ;;
  part2) bash $s $work/gpu0123 dp14 tp8b ;;  # s4-call6: dp4 alone 77 s; each TP model ~3 min or more
  part3) bash $s $work/gpu0123 tp32b ;;
  check)
    CUDA_VISIBLE_DEVICES=0 bash $s $work/check0 graphtests latency >$work.check0.txt 2>&1 &
    lane0=$!
    CUDA_VISIBLE_DEVICES=2,3 bash $s $work/check23 tp2eq >$work.check23.txt 2>&1
    CUDA_VISIBLE_DEVICES=1 bash $s $work/check1 throughput ray >$work.check1.txt 2>&1
    wait $lane0
    bash $s $work/check0123 dp24 >$work.check0123.txt 2>&1
    cat $work.check0.txt $work.check23.txt $work.check1.txt $work.check0123.txt ;;
esac
mkdir -p "$out"
tar czf "$out/runs.tgz" -C /tmp suite_runs
