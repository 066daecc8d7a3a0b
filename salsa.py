"""What every SALSA stage shares: distributed setup, models, chat data, log-probs, checkpoints.

SALSA (arXiv 2411.01798) is PPO whose KL reference is a model soup instead of the SFT model:
    sft.py (x2 seeds) -> soup.py -> reward.py -> ppo.py --ref soup -> eval.py
Each stage script imports this module and nothing else of ours. Every function here is plain
and takes its inputs explicitly; the stage scripts hold the algorithms.
"""
import contextlib
import dataclasses
import inspect
import json
import os
import random
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------- flags
def arg(default, help: str):
    """A dataclass field whose help text becomes the flag's `--help` line."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass of `arg(...)` fields: `max_len` becomes `--max-len`."""
    import argparse
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, default = hints[f.name], (f.default_factory() if callable(f.default_factory) else f.default)
        help = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        opts = {"help": f"{help} (default: {default})", "default": default}
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            opts["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            opts.update(nargs="*", type=typing.get_args(kind)[0])
        else:
            opts["type"] = kind
        if typing.get_origin(kind) is typing.Literal:
            opts.update(type=str, choices=typing.get_args(kind))
        parser.add_argument("--" + f.name.replace("_", "-"), **opts)
    return cls(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(seed: int) -> Dist:
    """No-op in one process; under torchrun reads RANK/WORLD_SIZE/LOCAL_RANK (nanoGPT style).
    Device from the environment: CUDA if present (nccl), else CPU (gloo). Seeds with seed + rank."""
    cuda = torch.cuda.is_available()
    d = Dist()
    if "RANK" in os.environ:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    d.device = torch.device(f"cuda:{d.local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(d.device)
    random.seed(seed + d.rank)
    torch.manual_seed(seed + d.rank)
    return d


def log0(dist: Dist, *msg):
    """Print on rank 0 only."""
    if dist.main:
        print(*msg, flush=True)


def all_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum over ranks, in place (one process: x itself)."""
    if dist.world > 1:
        torch.distributed.all_reduce(x)
    return x


# ---------------------------------------------------------------- FSDP
# Under torchrun every model is sharded with FSDP2 here and nowhere else (torchtitan style): the stage
# scripts call models as in one process. Each function below is a collective: every rank calls it.
def distribute(build, dist: Dist, train: bool = False):
    """The model `build()` returns on CPU, moved to dist.device; under torchrun sharded without a full
    copy per rank: rank 0 builds it, the others an empty (meta) model of its class and config, and
    weights and buffers (RoPE's inv_freq is in no state dict) are broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if dist.world == 1:
        return build().to(dist.device)
    full = build() if dist.main else None
    spec = [(type(full), full.config, getattr(full, "generation_config", None), full.dtype) if dist.main else None]
    torch.distributed.broadcast_object_list(spec, src=0)
    cls, config, generation_config, dtype = spec[0]
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    if generation_config is not None:  # a causal LM's own: pad id, sampling defaults
        model.generation_config = generation_config
    disable_dropout(model)
    shard(model.train(train), dist, train).to_empty(device=dist.device)
    set_model_state_dict(model, full.state_dict() if dist.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            torch.distributed.broadcast(buf.copy_(full.get_buffer(name)) if dist.main else buf, src=0)
    return model


def shard(model, dist: Dist, train: bool = False):
    """FSDP2 in place (one process: nothing). Units: each decoder layer, then the root (embeddings,
    final norm, heads; a tied lm_head is the embedding's parameter, so it is in one unit). Roots stay
    gathered after forward (token_logprobs and reward_scores read the head's weight after it), so
    build optimizers before the first forward, or after `reshard`. Trained models get non-reentrant
    activation checkpointing; gradients are summed over ranks, not averaged (the scripts divide by
    global counts). CUDA: bf16 compute, fp32 master weights and reduce."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from transformers.modeling_layers import GradientCheckpointingLayer
    if dist.world == 1:
        return model
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if dist.device.type == "cuda" else MixedPrecisionPolicy()
    if train and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and not isinstance(m, FSDPModule):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    if hasattr(model, "generate"):  # FSDP picks its root at the first forward: generate must count as one
        register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gathered(model):
    """FSDP: what the block's first forward gathers stays gathered to its end (else generate would
    gather every layer again for every token), then is sharded again."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(isinstance(m, GradientCheckpointingLayer), recurse=False)
        reshard(model)


def reshard(model):
    """Shard every unit: a root stays gathered after a no-grad forward, and the state-dict functions
    want the shards registered."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(model, dist: Dist) -> dict:
    """The whole state dict on rank 0's CPU (other ranks: empty), a tied weight under its first name
    only, as save_pretrained writes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if dist.world > 1:
        reshard(model)
    state = model.state_dict() if dist.world == 1 else \
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if k not in tied}


def full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (a gradient norm under FSDP) gathered whole; any other tensor as it is."""
    return x.full_tensor() if isinstance(x, torch.distributed.tensor.DTensor) else x


@dataclass
class Sharded:
    """Under FSDP, optimizer_state's value: when saved, this rank's shards of the trained module and its
    optimizer (DTensors, nothing gathered); when loaded, the checkpoint directory holding them."""
    state: dict | str


def optimizer_state(model, opt, dist: Dist):
    """opt.state_dict(); under FSDP the Sharded state of `model` (the module `opt` trains) and `opt`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    if dist.world == 1:
        return opt.state_dict()
    reshard(model)
    return Sharded(dict(zip(("model", "optim"), get_state_dict(model, opt))))


def load_optimizer_state(model, opt, state, dist: Dist):
    """Inverse of optimizer_state, for the same number of ranks; under FSDP it also restores the
    weights of `model` from the checkpoint's shards (a sharded checkpoint has no HF weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if dist.world == 1:
        return opt.load_state_dict(state)
    reshard(model)
    shards = dict(zip(("model", "optim"), get_state_dict(model, opt)))  # the layout dcp.load fills in place
    dcp.load(shards, checkpoint_id=state.state)
    set_state_dict(model, opt, model_state_dict=shards["model"], optim_state_dict=shards["optim"])


# ---------------------------------------------------------------- models and tokenizers
# The <|user|>/<|assistant|> format of the paper's Fig. 6 sample (zephyr's, which TRL used on UltraChat),
# for base models that ship no template; EOS closes each assistant turn, so PPO knows when to stop.
BASE_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                      "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def load_tokenizer(path: str):
    """Left-padding tokenizer with a pad token distinct from EOS.

    Padding with EOS would make a padded position indistinguishable from a real stop, so when the
    tokenizer has no pad (or pad == eos) we take its unknown token if that is distinct, else add
    `<|pad|>` (load_model then grows the embedding)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "left"
    if tok.chat_template is None:  # a base model (Llama-2-7B, Mistral-7B, Gemma-2B): the paper's own format
        tok.chat_template = BASE_CHAT_TEMPLATE
    return tok


def load_model(path: str, tok=None, dtype: str = "float32", attn: str = "sdpa", device="cpu", dist=None,
               train: bool = False):
    """A causal LM from a local directory or hub name, dropout off (RL needs the rollout and the
    training forward to be the same function), pad id set from the tokenizer. Under torchrun
    (`dist.world > 1`) it comes back sharded by `distribute`, `train` saying it will be trained."""
    from transformers import AutoModelForCausalLM
    if not (Path(path).is_dir() or "/" in path):
        raise FileNotFoundError(f"{path}: not a local model directory nor a hub name (org/model)")

    def build():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
        if tok is not None:
            if len(tok) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tok))
            model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
        disable_dropout(model)
        return model
    return distribute(build, dist or Dist(device=torch.device(device)), train)


def disable_dropout(model: torch.nn.Module):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama-style attention copies the config
            m.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def convert_gguf(gguf_file: str, out: str):
    """GGUF -> safetensors directory without accelerate (the offline default, SmolLM2-135M-Instruct).
    `from_pretrained(gguf_file=...)` would mark the model quantized and refuse to save it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder, name = os.path.split(os.path.abspath(gguf_file))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        raise ValueError(f"{gguf_file}: missing {missing}, unexpected {unexpected}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    save_atomic(out, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))


# ---------------------------------------------------------------- chat data
ROLES = {"system", "user", "assistant"}


def read_rows(source: str, split: str = "train") -> list[dict]:
    """Rows from a local .json/.jsonl/.parquet file or a hub dataset name (with `split`)."""
    if os.path.exists(source):
        if source.endswith(".jsonl"):
            rows = []
            with open(source) as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{source} line {i}: not valid JSON ({e})") from None
            return rows
        if source.endswith(".json"):
            return json.load(open(source))
        if source.endswith(".parquet"):
            import datasets
            return list(datasets.Dataset.from_parquet(source))
        raise ValueError(f"{source}: expected .json, .jsonl or .parquet")
    if source.endswith((".json", ".jsonl", ".parquet")) or source.count("/") != 1:
        raise FileNotFoundError(f"{source}: no such file, and not a hub dataset name (org/name)")
    import datasets
    return list(datasets.load_dataset(source, split=split))


def check_messages(messages, where: str) -> list[dict]:
    """UltraChat-200k schema: a list of {role, content}; raise naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {j} must be {{'role': system|user|assistant, 'content': str}}, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message to learn from")
    return messages


def render(tok, messages: list[dict], add_generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tok, messages: list[dict], max_len: int, where: str = "row"):
    """(input_ids, labels) with labels = -100 except on assistant tokens.

    Templates rarely mark assistant spans ({% generation %}), so we render the conversation prefix
    by prefix: the tokens an assistant message adds after its generation prompt are its own
    (content and end-of-turn token; template text after the EOS is not learnt). Truncation rule: keep the first `max_len` tokens; a row
    whose first assistant token falls beyond them is returned as None (the caller counts it)."""
    ids, labels = [], []
    for i, m in enumerate(messages):
        before = render(tok, messages[:i], add_generation_prompt=True) if m["role"] == "assistant" else ids
        after = render(tok, messages[: i + 1])
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise ValueError(f"{where}: chat template does not extend prefix by prefix at message {i}")
        span = after[len(before):]
        if m["role"] == "assistant" and tok.eos_token_id in span:  # nothing after the stop token is learnt
            span = span[: span.index(tok.eos_token_id) + 1]
        labels += [-100] * (len(before) - len(ids)) + (span if m["role"] == "assistant" else [])
        labels += [-100] * (len(after) - len(labels))
        ids = after
    ids, labels = ids[:max_len], labels[:max_len]
    return (ids, labels) if any(t != -100 for t in labels) else None


def prompt_ids(tok, prompt, where: str = "row") -> list[int]:
    """Token ids of a user prompt (str or messages ending with a user turn) plus the assistant header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
        raise ValueError(f"{where}: prompt must be a string or messages ending with a user turn")
    return render(tok, messages, add_generation_prompt=True)


def pad(seqs: list[list[int]], pad_id: int, left: bool = True, device="cpu"):
    """(ids, mask), each (B, T): left padding for prompts (generation appends on the right)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def generation_config(tok, temperature: float, max_new_tokens: int):
    """Plain temperature sampling (greedy at 0) from a fresh config, so no warper of the model's own
    generation_config.json (top_k, top_p, repetition penalty) changes what is sampled: PPO scores
    the samples with temperature-scaled log-probs, which must be the sampling distribution."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    return GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


# ---------------------------------------------------------------- log-probs
def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the same positions as an unpadded one."""
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)


def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, d) of the backbone, without the lm_head: callers project only the
    positions they need, so full-vocabulary logits are never materialised over the prompt."""
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    if not isinstance(model, FSDPModule):
        return model.base_model(**kw).last_hidden_state
    # FSDP gathers a unit's own parameters (the embeddings) only in its forward: run it, keep the backbone's output
    out = []
    hook = model.base_model.register_forward_hook(lambda module, args, o: out.append(o.last_hidden_state))
    try:
        model(**kw, **({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}))
    finally:
        hook.remove()
    return out[0]


def _logp_chunk(head_w, h, targets, inv_temp: float, softcap):
    logits = F.linear(h, head_w).float()  # (N, V)
    if softcap:  # Gemma-2's final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    logp_all = torch.log_softmax(logits * inv_temp, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   max_logits: int = 2**27):
    """log pi(target | hidden) and the policy entropy at each position, shapes (...,) like `targets`.

    `hidden[..., i, :]` is the state that predicts `targets[..., i]`. Logits are divided by the
    sampling temperature (as in the rollout), computed in fp32, and in chunks of at most
    `max_logits` floats; under autograd each chunk is recomputed in backward (checkpointing), so a
    256k vocabulary never holds (B*T, V) logits at once."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
    rows = max(1, max_logits // head.weight.shape[0])
    parts = []
    for i in range(0, h.shape[0], rows):
        args = (head.weight, h[i:i + rows], t[i:i + rows], 1.0 / temperature, softcap)
        parts.append(checkpoint(_logp_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _logp_chunk(*args))
    logp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logp.view(targets.shape), ent.view(targets.shape)


def sft_nll(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed NLL of the labelled (assistant) tokens and their count, -Σ_t log π(y_t | y_<t): SFT's loss
    and the greedy soup's held-out score. Only labelled positions reach the lm_head."""
    h = hidden_states(model, ids, mask)  # (B, T, d)
    keep = labels[:, 1:] != -100  # (B, T-1): the state at t predicts token t+1
    logp, _ = token_logprobs(model, h[:, :-1][keep], labels[:, 1:][keep])  # (N,)
    return -logp.sum(), int(keep.sum())


# ---------------------------------------------------------------- optimisation
def lr_lambda(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Multiplier of the peak lr: linear warmup for `warmup` steps, then linear or cosine decay to 0."""
    import math
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------- checkpoints and logs
def save_atomic(out: str, write):
    """Call `write(tmp_dir)`, then rename tmp_dir to `out`: a crash leaves no half directory.
    `out` must not exist yet (callers check before any work, so a failed run overwrites nothing)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(str(tmp))
    except BaseException:  # a crash or Ctrl-C leaves neither `out` nor a half-written temp dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)


def save_model(out: str, model, tok, files: dict | None = None, dist: Dist = Dist()):
    """An HF directory `transformers` loads: safetensors weights, config, tokenizer, and extra
    json files (metrics, reward normalisation, ...) given as {name: object}. Under FSDP every rank
    calls it (the weights are gathered) and rank 0 writes."""
    state = full_state_dict(model, dist) if dist.world > 1 else None

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tok.save_pretrained(tmp)
        for name, obj in (files or {}).items():
            Path(tmp, name).write_text(json.dumps(obj, indent=1))
    if dist.main:
        save_atomic(out, write)


def save_checkpoint(ckpt_dir: str, step: int, model, tok, state: dict, keep: int = 2, dist: Dist = Dist()):
    """A resumable checkpoint `ckpt_dir/step-00000123` (model + trainer state), atomic; the
    older ones beyond `keep` are deleted only after the new one is complete. Under FSDP (a collective)
    no HF weights: each rank writes its shards of the Sharded entry (`*.distcp`, torch.distributed.checkpoint)
    and rank 0 the rest to trainer_state.pt, so nothing is gathered (a 7B model + Adam: ~87 GB on rank 0)."""
    import torch.distributed.checkpoint as dcp
    path = Path(ckpt_dir) / f"step-{step:08d}"
    if dist.world == 1:
        save_atomic(str(path), lambda tmp: (model.save_pretrained(tmp, safe_serialization=True),
                                            tok.save_pretrained(tmp), torch.save(state, Path(tmp, "trainer_state.pt"))))
    else:
        tmp = path.parent / f".{path.name}.tmp"  # one name on every rank (save_atomic's carries the pid)
        dcp.save(next(v.state for v in state.values() if isinstance(v, Sharded)), checkpoint_id=tmp)
        if dist.main:
            tok.save_pretrained(tmp)
            torch.save({k: Sharded("") if isinstance(v, Sharded) else v for k, v in state.items()},
                       tmp / "trainer_state.pt")
            os.replace(tmp, path)  # dcp.save returns once every rank's shards are written
        torch.distributed.barrier()  # no rank goes on (and may crash) before the checkpoint is complete
    if dist.main:
        done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "trainer_state.pt").exists())
        for old in done[:-keep]:
            shutil.rmtree(old)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "trainer_state.pt").exists())
    return str(done[-1]) if done else None


def load_trainer_state(path: str, dist: Dist = Dist()) -> dict:
    """trainer_state.pt of a checkpoint; its Sharded entry (FSDP) comes back pointing at the shards."""
    state = torch.load(Path(path, "trainer_state.pt"), map_location="cpu", weights_only=False, mmap=True)
    if any(isinstance(v, Sharded) for v in state.values()) != (dist.world > 1):
        raise ValueError(f"{path}: written {'by one process' if dist.world > 1 else 'sharded, under torchrun'}: "
                         "resume it the same way, with the same number of ranks")
    return {k: Sharded(path) if isinstance(v, Sharded) else v for k, v in state.items()}


def prepare_out(out: str, resume: bool) -> str:
    """Check `out` before any work: the final model dir must not exist; returns the run's
    checkpoint dir `out.ckpt` (also home of metrics.jsonl), which must be empty unless resuming."""
    if Path(out).exists():
        raise FileExistsError(f"{out} already exists: choose another --out or delete it")
    ckpt = f"{out}.ckpt"
    if not resume and latest_checkpoint(ckpt):
        raise FileExistsError(f"{ckpt} holds checkpoints of an earlier run: pass --resume or delete it")
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    for stale in Path(ckpt).glob(".*.tmp*"):  # half-written saves of a crashed run
        shutil.rmtree(stale)
    if not resume:  # a fresh run: no metrics of a run that died before its first checkpoint
        Path(ckpt, "metrics.jsonl").unlink(missing_ok=True)
    return ckpt


def rng_state(dist: Dist = Dist()):
    """This process's generators; under torchrun a list of every rank's (a collective)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if dist.world == 1:
        return state
    states = [None] * dist.world
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(state, dist: Dist = Dist()):
    state = state[dist.rank] if isinstance(state, list) else state
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def log_jsonl(path: str, row: dict):
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


# ---------------------------------------------------------------- reward models
def load_reward_model(path: str, dtype: str = "float32", attn: str = "sdpa", device="cpu", dist: Dist | None = None):
    """A reward model saved by reward.py: a standard AutoModelForSequenceClassification (num_labels=1)
    directory whose config.json also carries `reward_bias`, the normalisation reward_scores subtracts.
    Eval mode, dropout off, sharded under torchrun; freezing it (requires_grad) is the caller's choice."""
    from transformers import AutoModelForSequenceClassification
    if not (Path(path).is_dir() or "/" in path):
        raise FileNotFoundError(f"{path}: not a local reward-model directory nor a hub name (org/model)")

    def build():
        rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
        if rm.config.num_labels != 1 or not isinstance(getattr(rm.config, "reward_bias", None), (int, float)):
            raise ValueError(f"{path}: a reward model needs num_labels=1 and a numeric `reward_bias` in config.json "
                             "(train it with reward.py, or add \"reward_bias\": 0.0 to use its raw scores)")
        disable_dropout(rm)
        return rm
    return distribute(build, dist or Dist(device=torch.device(device))).eval()


def reward_scores(rm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised reward (B,) in fp32: the scalar head on the last real token (the last mask == 1,
    i.e. the EOS closing the response), minus config.reward_bias. Rows may be padded on both sides.

    HF's own forward is not used: it finds the last token by comparing ids with pad_token_id (wrong
    if a real token shares that id) and gives left-padded rows shifted positions."""
    h = hidden_states(rm, ids, mask)  # (B, T, d)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
    h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, d)
    # the head in fp32, so a bf16 model's rewards are not rounded to 8 mantissa bits
    return F.linear(h_last.float(), rm.score.weight.float()).squeeze(-1) - rm.config.reward_bias


def toy_preferences(chat_file: str, out: str, seed: int = 0):
    """Preference pairs (UltraFeedback-binarized schema) from a chat file, for the offline default:
    chosen = a conversation's own last answer, rejected = the last answer of another conversation
    (off-topic). Trivially learnable; the recipe issue brings a judged task."""
    rows = [check_messages(r.get("messages"), f"{chat_file} row {i}") for i, r in enumerate(read_rows(chat_file))]
    rows = [m for m in rows if m[-1]["role"] == "assistant"]
    other = random.Random(seed).sample(range(len(rows)), len(rows))
    with open(out, "w") as fh:
        for m, j in zip(rows, other):
            if rows[j][-1]["content"] != m[-1]["content"]:
                prompt = next(x["content"] for x in reversed(m) if x["role"] == "user")
                fh.write(json.dumps({"prompt": prompt, "chosen": m, "rejected": m[:-1] + [rows[j][-1]]}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert-gguf"] and len(sys.argv) == 4:
        convert_gguf(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["toy-preferences"] and len(sys.argv) == 4:
        toy_preferences(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python salsa.py convert-gguf FILE.gguf OUT_DIR | toy-preferences CHAT.jsonl OUT.jsonl")
