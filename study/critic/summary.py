"""The critic experiment's table (README, "Value function"): explained variance and gold per run.

    python study/critic/summary.py [DIR]     DIR: where run.sh wrote the runs (default: study/critic, the records)
"""
import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "study/critic")
files = {"zero head, policy states, 1e-3 (main)": Path("study/metrics/ppo-beta0.2-seed1/metrics.jsonl"),
         **{n: runs / f"{n}.ckpt" / "metrics.jsonl" if (runs / f"{n}.ckpt").exists() else runs / f"{n}.metrics.jsonl"
            for n in ("rm-init-1e-3", "rm-init-1e-4", "zero-1e-3", "zero-1e-2", "warmup10-1e-3", "warmup10-1e-2")}}
print("| critic | steps | EV step 1 | EV mean | EV last 5 | EV range | gold, last 5 |\n|---|---:|---:|---:|---:|---:|---:|")
for name, path in files.items():
    rows = [json.loads(line) for line in open(path)]
    ev, gold = [r["val/explained_var"] for r in rows], [r["objective/gold"] for r in rows]
    print(f"| {name} | {len(rows)} | {ev[0]:+.2f} | {sum(ev) / len(ev):+.3f} | {sum(ev[-5:]) / 5:+.3f} | "
          f"{min(ev):+.2f}..{max(ev):+.2f} | {sum(gold[-5:]) / 5:.3f} |")
