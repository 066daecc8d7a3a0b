import torch
import salsa
from transformers import AutoModelForCausalLM


def test_tiny_loads(tiny, tok):
    model = salsa.load_model(tiny, tok)
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert isinstance(AutoModelForCausalLM.from_pretrained(tiny), torch.nn.Module)
