#!/usr/bin/env bash
# Ran once, on 2026-12-02, to the report in study/report.md. study/ now holds every run's record, so a rerun
# restores the SALSA runs too and stops when ppo.py refuses to overwrite them: it is kept as the record of what ran.
# The study's second half (README, "The study"). A working session here keeps only what is committed and
# the whole study needs more than one session on 2 cores, so the first half (the shared stages, the
# premise, the six PPO runs) left its records in study/. This rebuilds the shared stages with the same
# seeds and flags, stops unless they are the first half's bit for bit, restores the PPO records, runs the
# six SALSA runs as the PPO runs ran (one thread each, two at once), answers them, and lets
# `salsa.py study` score every answer with the reward model and write runs/study/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
R=runs/study
P=.venv/bin/python
[ -e $R ] && { echo "$R exists: move it away first"; exit 1; }
mkdir -p $R
cp -r study/answers study/results $R/  # the SFT pair's and the soup's answers, the α line: stages that then skip
for d in study/metrics/*/; do
  n=$(basename "$d")
  mkdir -p $R/$n $R/$n.ckpt  # $R/$n marks the run as done; write_study reads its metrics and samples
  cp "$d"/metrics.jsonl "$d"/samples.jsonl $R/$n.ckpt/
  cp "$d"/args.json $R/$n/
done
# the task, the SFT pair, the soup and the reward model (2 threads, as in the first half); with no seeds
# there are no runs, so it ends in write_study's error, which the hash check below makes harmless
$P salsa.py study --out $R --seeds || true
(cd $R && sha256sum -c --quiet ../../study/shared/SHA256SUMS) || {
  echo "the shared stages differ from the first half's: its PPO runs cannot be paired with new SALSA runs"; exit 1; }
lane() {  # the study's own SALSA command and answer stage (salsa.py recipe), one seed, the three β
  for b in 0.01 0.05 0.2; do
    n=salsa-beta$b-seed$1
    OMP_NUM_THREADS=1 $P ppo.py --ref soup --soup $R/soup --init-kl-coef $b --no-adaptive-kl --seed $1 \
      --gold py:salsa:gold_score --model $R/sft-seed1 --reward $R/rm --data $R/data/ppo.jsonl --steps 20 \
      --lr 1e-05 --max-new-tokens 64 --save-every 5 --sample-every 5 --resume --out $R/$n
    OMP_NUM_THREADS=1 $P eval.py answer --model $R/$n --model-id $n --questions $R/data/eval.jsonl \
      --max-new-tokens 64 --batch-size 32 --out $R/answers/$n.jsonl
  done
}
lane 1 > $R/lane1.log 2>&1 &
lane 2 > $R/lane2.log 2>&1 &
wait
for n in salsa-beta{0.01,0.05,0.2}-seed{1,2}; do
  [ -d $R/$n ] && [ "$(wc -l < $R/answers/$n.jsonl)" -ge 256 ] || { echo "$n did not finish: see $R/lane*.log"; exit 1; }
done
$P - <<'PY'  # paired: one seed gives both methods the same first rollouts (the PPO records' step 1)
import salsa
for b in ("0.01", "0.05", "0.2"):
    for s in (1, 2):
        ppo, soup = (salsa.read_jsonl(f"runs/study/{m}-beta{b}-seed{s}.ckpt/metrics.jsonl")[0] for m in ("ppo", "salsa"))
        assert [ppo[k] for k in ("objective/score", "objective/gold")] == [soup[k] for k in ("objective/score", "objective/gold")], (b, s)
print("paired: each SALSA run's first rollouts score as its PPO run's")
PY
$P salsa.py study --out $R  # every stage skips but reward-hist (all 15 answer files); then report.md
