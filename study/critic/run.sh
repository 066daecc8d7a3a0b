#!/usr/bin/env bash
# The critic experiment of 2026-12-02 (README, "Why the critic is a whole critic"): the study's PPO run at β 0.2, seed 1,
# with the value head on the frozen reward model's states instead of the policy's, started either as the
# reward model's own normalised head or at zero. Needs the study's shared stages in runs/study (first
# half of study/second_half.sh, checked against study/shared/SHA256SUMS). The variant is not on main:
# it runs from a worktree of commit bb0cf27 with rm_states.patch applied. Two runs at a time, one thread each, ~17 min.
# The baseline (zero head on the policy's states, --value-lr 1e-3) is study/metrics/ppo-beta0.2-seed1.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$PWD W=/tmp/salsa-critic
rm -rf $W && git worktree add -f --detach $W bb0cf27 >/dev/null && git -C $W apply "$here/study/critic/rm_states.patch"
run() {  # name, --value-lr, VZERO (1: zero head)
  (cd $W && VZERO=$3 OMP_NUM_THREADS=1 "$here/.venv/bin/python" ppo.py --ref sft --init-kl-coef 0.2 --no-adaptive-kl \
    --seed 1 --gold py:salsa:gold_score --model "$here/runs/study/sft-seed1" --reward "$here/runs/study/rm" \
    --data "$here/runs/study/data/ppo.jsonl" --steps 20 --lr 1e-05 --max-new-tokens 64 --save-every 50 \
    --sample-every 5 --value-lr $2 --out "$here/runs/critic/$1") > "$here/runs/critic/$1.log" 2>&1
}
mkdir -p runs/critic
run rm-init-1e-3 1e-3 "" & run rm-init-1e-4 1e-4 "" & wait
run zero-1e-3 1e-3 1 & run zero-1e-2 1e-2 1 & wait
git worktree remove --force $W
# the value warm-up (warmup.patch, on commit 4c4e18f): main's critic, the policy's lr 0 for the first 10 of 30
# steps, so the head alone learns on the initial policy's rollouts (the records stopped after 9 steps)
rm -rf $W && git worktree add -f --detach $W 4c4e18f >/dev/null && git -C $W apply "$here/study/critic/warmup.patch"
warm() {  # name, --value-lr
  (cd $W && WARM=10 OMP_NUM_THREADS=1 "$here/.venv/bin/python" ppo.py --ref sft --init-kl-coef 0.2 --no-adaptive-kl \
    --seed 1 --gold py:salsa:gold_score --model "$here/runs/study/sft-seed1" --reward "$here/runs/study/rm" \
    --data "$here/runs/study/data/ppo.jsonl" --steps 30 --lr 1e-05 --max-new-tokens 64 --save-every 50 \
    --sample-every 5 --value-lr $2 --out "$here/runs/critic/$1") > "$here/runs/critic/$1.log" 2>&1
}
warm warmup10-1e-3 1e-3 & warm warmup10-1e-2 1e-2 & wait
git worktree remove --force $W
# 2026-12-03: the whole critic (a trained copy of the reward model), now main's --critic reward (the 1e-5 and
# 1e-4 seed-1 runs ran from whole_critic.patch on f883c29, the same algorithm), and main's head beside it,
# on shared stages rebuilt on an AMD EPYC machine (they fail the hash check: README, "Bit for bit only on
# the same kind of CPU"). Two at a time, one thread each, ~30 min a pair.
main() {  # name, seed, --critic, --value-lr
  OMP_NUM_THREADS=1 "$here/.venv/bin/python" ppo.py --ref sft --init-kl-coef 0.2 --no-adaptive-kl \
    --seed $2 --gold py:salsa:gold_score --model runs/study/sft-seed1 --reward runs/study/rm \
    --data runs/study/data/ppo.jsonl --steps 20 --lr 1e-05 --max-new-tokens 64 --save-every 50 \
    --sample-every 5 --critic $3 --value-lr $4 --out "runs/critic/$1" > "runs/critic/$1.log" 2>&1
}
main whole-rm-1e-5 1 reward 1e-5 & main whole-rm-1e-4 1 reward 1e-4 & wait
main whole-rm-1e-4-seed2 2 reward 1e-4 & main whole-rm-3e-4 1 reward 3e-4 & wait
main head-1e-3 1 head 1e-3
# how much of a rollout's score any critic could know at depth t of the answer (README, "Why the critic is a whole critic")
"$here/.venv/bin/python" study/critic/predictable.py runs/study 32 6
"$here/.venv/bin/python" study/critic/summary.py runs/critic
# the whole critic's cost against the head (README, "Speed and memory"): the study's PPO command, 3 steps, 2 threads,
# A = --critic reward, B = --critic head, in turn; each run writes to a fresh directory (ppo.py never overwrites)
flags="--ref sft --init-kl-coef 0.2 --no-adaptive-kl --seed 1 --model runs/study/sft-seed1 --reward runs/study/rm \
 --data runs/study/data/ppo.jsonl --steps 3 --lr 1e-05 --max-new-tokens 64 --save-every 50 --sample-every 100"
farm-bench -n 3 --warmup 1 --timeout 2400 \
  --vs "sh -c 'd=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --critic head --out \$d/o >>/tmp/bench_head.log 2>&1'" \
  -- sh -c "d=\$(mktemp -d); exec .venv/bin/python ppo.py $flags --critic reward --out \$d/o >>/tmp/bench_whole.log 2>&1"
