"""Shared fixtures: the real SmolLM2 tokenizer (chat template included) and tiny random-init
Llama models built from a config here, saved as HF directories like any checkpoint."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import salsa  # noqa: E402

TOKENIZER = ROOT / "models" / "SmolLM2-135M-Instruct"  # made by `make setup`
# `make test` runs two pytest workers (pytest-xdist) on CI's 2 cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tok():
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.fail(f"{TOKENIZER} is missing: run `make setup` first")
    return salsa.load_tokenizer(str(TOKENIZER))


def make_tiny(path, tok, seed=0, dtype=torch.float32, layers=2, hidden=32):
    """A random-init Llama (tied embeddings, like SmolLM2) saved with the real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tok):
    """Path of a tiny random-init model directory (fp32)."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", tok)
