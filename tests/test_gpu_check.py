"""`make gpu-check` on a machine without CUDA: the same script on tiny models on the CPU, so it cannot rot."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gc"
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["device"] == "CPU" and r["sft"]["tokens_per_s"] > 0 and 0 < r["sft"]["mfu_probe"]
    assert set(r["ppo"]) == {"tiny2 float32", "tiny2 bfloat16", "tiny float32"}
    for v in r["ppo"].values():  # random-init models never stop early: every rollout has all 16 tokens
        assert v["response_len"] == 16 and 0 < v["rollout_share"] < 1 and v["peak_gb"] > 0
        assert abs(v["step_s"] - v["rollout_s"] - v["score_s"] - v["train_s"]) < 1e-6
    z = r["fsdp"]  # FSDP2 at world size 1: a sharded checkpoint after step 1, resumed to the same step 2 (CPU: exact)
    assert z["shard_files"] == ["__0_0.distcp"] and z["resumed_steps"] == [1, 2] and z["resume_max_abs_diff"] == 0
    assert z["new_tokens"] == 16 and set(r["stage_seconds"]) >= {"sft", "fsdp", "memory_plan"}
    plan = r["memory_plan"]
    # Mistral-7B's policy and its critic, which has no LM head (32,000 x 4,096), at 18 B/param: 240.5 GiB
    assert plan["tiny2"]["params"] > plan["tiny"]["params"] and plan["7.24b_formula_gb"] == pytest.approx(240.5, abs=0.05)
    big = plan["tiny2"]  # its rest, the peak beyond the formula, scaled by L·(d + f): 3·(96 + 192) to 32·(4096 + 14336)
    assert big["rest_gb"] == pytest.approx(big["measured_gb"] - big["formula_gb"])
    assert plan["7.24b_gb"] == pytest.approx(plan["7.24b_formula_gb"] + big["rest_gb"] * 32 * 18432 / (3 * 288))
    md = (out / "report.md").read_text()
    assert "# GPU check" in md and "| tiny2 bfloat16 |" in md
    again = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr  # nothing overwritten


def test_past_the_deadline_stages_are_recorded_and_the_reports_kept(tmp_path):
    """The device gives one try: with no time left every stage after the models' build is refused, each
    refusal is in the reports, and the check exits non-zero."""
    out = tmp_path / "gc"
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--out", str(out), "--budget", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "stage(s) failed: sft, ppo tiny2 float32" in res.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["probe_bf16_flops"] > 0 and r["params"]["tiny"]["lm"] > 0 and "sft" not in r and r["ppo"] == {}
    assert r["errors"]["sft"] == "RuntimeError: sft not started: the check's deadline (--budget) has passed"
    assert set(r["errors"]) == {"sft", "ppo tiny2 float32", "ppo tiny2 bfloat16", "ppo tiny float32", "fsdp",
                                "plain_bf16_fwd_bwd_s", "memory_plan"}
    assert "- **fsdp failed**: RuntimeError: fsdp not started" in (out / "report.md").read_text()
    assert not (out / "work").exists()


def test_a_stage_past_its_timeout_is_killed_with_its_workers(tmp_path):
    """A hung stage under torchrun: the check kills its whole process group, the workers that hold the GPU too."""
    import gpu_check
    (tmp_path / "hang.py").write_text("import time\ntime.sleep(120)\n")  # two ranks that never finish
    out = tmp_path / "hang"
    with pytest.raises(RuntimeError, match=r"hang.py ran past its 8 s"):
        gpu_check.script(str(tmp_path / "hang.py"), "--out", out, ranks=2, logs=tmp_path / "logs", timeout=8)
    time.sleep(0.5)
    alive = [c for c in (Path(p, "cmdline") for p in Path("/proc").glob("[0-9]*")) if c.exists()
             and str(out).encode() in c.read_bytes()]
    assert alive == [] and (tmp_path / "logs" / "hang.log").exists()
