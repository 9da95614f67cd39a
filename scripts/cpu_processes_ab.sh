#!/usr/bin/env bash
# One process of two threads against two processes of one thread (accelerate's CPU launch) for the
# default run's training steps, alternating, REPEATS times: `bash scripts/cpu_processes_ab.sh [STEPS] [REPEATS]`.
# Each arm is the real command (python -m diffexp.train, no logger, no metric); its img/s is the median of
# train/img_per_s logged after the first 20 steps (metrics.jsonl). Nothing else should run meanwhile.
set -euo pipefail
steps=${1:-120}; repeats=${2:-3}
out=$(mktemp -d)
common=(logger=none metric=none trainer.eval_every=0 trainer.sample_every=0 trainer.checkpoint_every=0
        trainer.log_every=10 "trainer.max_steps=$steps")
rate() { python - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
print(f"{statistics.median(r['train/img_per_s'] for r in rows if 'train/img_per_s' in r and r['step'] > 20):.1f}")
PY
}
for r in $(seq "$repeats"); do
  python -m diffexp.train "${common[@]}" hydra.run.dir="$out/one-$r" > "$out/one-$r.log" 2>&1
  ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process 1 -m diffexp.train "${common[@]}" \
    hydra.run.dir="$out/two-$r" > "$out/two-$r.log" 2>&1
  echo "repeat $r: one process x 2 threads $(rate "$out/one-$r") img/s; two processes x 1 thread $(rate "$out/two-$r") img/s"
done
