"""The critic experiment's table (README, "Why the critic is a whole critic"): explained variance and gold per run.

    python study/critic/summary.py [DIR]     DIR: where run.sh wrote the runs (default: study/critic, the records)
"""
import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "study/critic")
names = {"rm-init-1e-3": "RM's head, RM states, 1e-3", "rm-init-1e-4": "RM's head, RM states, 1e-4",
         "zero-1e-3": "zero head, RM states, 1e-3", "zero-1e-2": "zero head, RM states, 1e-2",
         "warmup10-1e-3": "main's critic, 1e-3, policy frozen for 10 steps",
         "warmup10-1e-2": "main's critic, 1e-2, policy frozen for 10 steps",
         # 2026-12-03, on shared stages rebuilt on another CPU (README, "Bit for bit only on the same kind of CPU")
         "head-1e-3": "zero head, policy states, 1e-3 (rebuilt stages)",
         "whole-rm-1e-5": "whole critic (trained RM copy), 1e-5 (rebuilt stages)",
         "whole-rm-1e-4": "whole critic, 1e-4 (rebuilt stages)",
         "whole-rm-1e-4-seed2": "whole critic, 1e-4, seed 2 (rebuilt stages)",
         "whole-rm-3e-4": "whole critic, 3e-4 (rebuilt stages)"}
files = {"zero head, policy states, 1e-3 (the study's run)": Path("study/metrics/ppo-beta0.2-seed1/metrics.jsonl"),
         **{label: runs / f"{n}.ckpt" / "metrics.jsonl" if (runs / f"{n}.ckpt").exists() else runs / f"{n}.metrics.jsonl"
            for n, label in names.items()}}
print("| critic, `--value-lr` | steps | EV step 1 | EV mean | EV last 10 | EV last 5 | EV range | gold, last 5 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, path in files.items():
    if not path.exists():
        continue
    rows = [json.loads(line) for line in open(path)]
    ev, gold = [r["val/explained_var"] for r in rows], [r["objective/gold"] for r in rows]
    last10 = ev[-10:]
    print(f"| {name} | {len(rows)} | {ev[0]:+.2f} | {sum(ev) / len(ev):+.3f} | {sum(last10) / len(last10):+.3f} | "
          f"{sum(ev[-5:]) / 5:+.3f} | {min(ev):+.2f}..{max(ev):+.2f} | {sum(gold[-5:]) / 5:.3f} |")
