#!/usr/bin/env bash
# The study rerun with the whole critic (ppo.py --critic reward, the default since 2026-12-03), begun
# 2026-12-03. It needs more than one 3-hour session on 2 cores (12 PPO runs of 12-13 min each, plus their
# answers), and a session keeps only what is committed, so each session runs this script and commits the
# records that `collect` copies here (no weights). Order: β 0.2 (both seeds, both methods), then β 0.05,
# then the whole grid, so every finished cell holds both methods of one seed.
#
#   bash study/whole-critic/run.sh            resume the study in runs/study (rebuilding it if missing)
#   bash study/whole-critic/run.sh collect    copy the finished runs' records into study/whole-critic
#
# When runs/study is missing (a fresh machine), the shared stages are rebuilt with the study's seeds and
# flags and must match SHA256SUMS bit for bit; they do only on the CPU type they were built on (an AMD
# EPYC with AVX-512 bf16; README, "Bit for bit only on the same kind of CPU"). Then the finished runs'
# records are restored, so their stages and answers are skipped, and the missing runs run.
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
  mkdir -p $R/answers
  cp $W/answers/*.jsonl $R/answers/  # eval.py answer skips a finished answer file
  for d in $W/metrics/*/; do
    n=$(basename "$d")
    mkdir -p $R/$n $R/$n.ckpt  # $R/$n marks the run as done; write_study reads its metrics and samples
    cp "$d"/metrics.jsonl "$d"/samples.jsonl $R/$n.ckpt/
    cp "$d"/args.json $R/$n/
  done
  [ -d $W/results/alpha_line ] && mkdir -p $R/results && cp -r $W/results/alpha_line $R/results/
  # the task, the SFT pair, the soup and the reward model; with no seeds there are no runs, so it ends
  # in write_study's error, which the hash check below makes harmless
  $P salsa.py study --out $R --seeds || true
  (cd $R && sha256sum -c --quiet ../../$W/SHA256SUMS) || {
    echo "the shared stages differ from the records': runs on them cannot be paired with the recorded runs"; exit 1; }
fi
$P salsa.py study --out $R --betas 0.2 --seeds 1 2
$P salsa.py study --out $R --betas 0.05 0.2 --seeds 1 2
$P salsa.py study --out $R
# Measured before the grid (README, "Speed and memory"), A = --micro-batch 8 (salsa.py's --ppo-micro-batch),
# B = --micro-batch 1, in turn, on runs/study's shared stages:
#   flags="--ref sft --init-kl-coef 0.2 --no-adaptive-kl --seed 1 --model runs/study/sft-seed1 --reward runs/study/rm
#     --data runs/study/data/ppo.jsonl --steps 3 --lr 1e-05 --max-new-tokens 64 --save-every 50 --sample-every 100
#     --gold py:salsa:gold_score"
#   farm-bench -n 2 --warmup 0 --timeout 2400 \
#     --vs "sh -c 'd=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --micro-batch 1 --out \$d/o >>/tmp/b1.log 2>&1'" \
#     -- sh -c "d=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --micro-batch 8 --out \$d/o >>/tmp/b8.log 2>&1"
