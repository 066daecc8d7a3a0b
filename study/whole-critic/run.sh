#!/usr/bin/env bash
# The study rerun with the whole critic (ppo.py --critic reward, the default since 2026-12-03): the grid
# {PPO, SALSA} x β {0.01, 0.05, 0.2} x seeds {1, 2}, 15 PPO steps a run, run in one session on one machine
# (2026-12-03, an Intel Xeon with AVX-512 and AMX, 2 cores), because a run pairs only with runs on the same
# shared stages, and those rebuild bit for bit only on the same kind of CPU (README, "Bit for bit only on the
# same kind of CPU"). 15 steps (--ppo-steps 15; the study default is 20), so that the 12 runs (413-705 s
# each here, 113 min in all; times.json), their answers and the reward model's scores fit one 3-hour session. amd-epyc/ holds four
# 20-step β-0.2 runs an earlier session finished on an AMD EPYC before it ended; their shared stages differ
# from these, so they are a separate replication of one cell, not pooled.
#
#   bash study/whole-critic/run.sh            the study in runs/study (rebuilt from the records if missing)
#   bash study/whole-critic/run.sh collect    copy the finished runs' records into study/whole-critic
#
# When runs/study is missing (a fresh machine), the shared stages are rebuilt with the study's seeds and
# flags and must match SHA256SUMS bit for bit. Then the finished runs' records are restored, so their
# stages and answers are skipped and only runs added to the command (--ablations) run.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=runs/study W=study/whole-critic P=.venv/bin/python
if [ "${1:-}" = collect ]; then
  mkdir -p $W/answers $W/metrics $W/shared
  for f in sft-seed1 sft-seed2 rm; do cp $R/$f.ckpt/metrics.jsonl $W/shared/$f.metrics.jsonl; done
  cp $R/rm/metrics.json $W/shared/rm.metrics.json
  for d in $R/*-beta*-seed*/; do  # a run's directory exists only once it finished
    n=$(basename "$d")
    [ -e $R/answers/$n.jsonl ] && [ "$(wc -l < $R/answers/$n.jsonl)" -ge 256 ] || continue
    mkdir -p $W/metrics/$n
    cp $R/$n.ckpt/metrics.jsonl $R/$n.ckpt/samples.jsonl $R/$n/args.json $W/metrics/$n/
    cp $R/answers/$n.jsonl $W/answers/
  done
  cp $R/answers/sft.jsonl $R/answers/sft-seed2.jsonl $R/answers/soup.jsonl $W/answers/
  cp -r $R/results $W/
  cp $R/times.json $W/
  for f in report.md frontier.png curves.png; do [ -e $R/$f ] && cp $R/$f $W/; done
  exit 0
fi
if [ ! -e $R ]; then
  # the task, the SFT pair, the soup and the reward model; with no seeds there are no runs, so it ends in
  # write_study's error, which the hash check below makes harmless
  $P salsa.py study --out $R --ppo-steps 15 --seeds || true
  (cd $R && sha256sum -c --quiet ../../$W/SHA256SUMS) || { mv $R $R.unpaired
    echo "the shared stages differ from the records' (moved to $R.unpaired): runs on them cannot be paired with the recorded runs"; exit 1; }
  cp $W/answers/*.jsonl $R/answers/  # eval.py answer skips a finished answer file
  for d in $W/metrics/*/; do
    n=$(basename "$d")
    mkdir -p $R/$n $R/$n.ckpt  # $R/$n marks the run as done; write_study reads its metrics and samples
    cp "$d"/metrics.jsonl "$d"/samples.jsonl $R/$n.ckpt/
    cp "$d"/args.json $R/$n/
  done
fi
$P salsa.py study --out $R --ppo-steps 15 "$@"
# Measured before the grid (README, "Speed and memory"), A = --micro-batch 8 (salsa.py's --ppo-micro-batch),
# B = --micro-batch 1, in turn, on runs/study's shared stages:
#   flags="--ref sft --init-kl-coef 0.2 --no-adaptive-kl --seed 1 --model runs/study/sft-seed1 --reward runs/study/rm
#     --data runs/study/data/ppo.jsonl --steps 3 --lr 1e-05 --max-new-tokens 64 --save-every 50 --sample-every 100
#     --gold py:salsa:gold_score"
#   farm-bench -n 2 --warmup 0 --timeout 2400 \
#     --vs "sh -c 'd=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --micro-batch 1 --out \$d/o >>/tmp/b1.log 2>&1'" \
#     -- sh -c "d=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --micro-batch 8 --out \$d/o >>/tmp/b8.log 2>&1"
