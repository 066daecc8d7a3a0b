"""What every SALSA stage shares, and the recipe that runs them all: the paper end to end.

SALSA (arXiv 2411.01798) is PPO whose KL reference is a model soup instead of the SFT model:
    sft.py (x2 seeds) -> soup.py -> reward.py -> ppo.py --ref soup -> eval.py
Each stage script imports this module (and soup.py where it needs an in-memory soup); this module
imports no stage script: the recipe's reports read the files the stages wrote. Every function here
is plain and takes its inputs explicitly; the stage scripts hold the algorithms.

    python salsa.py                       the recipe on the offline default (runs/recipe/results.md)
    python salsa.py --ablations gibberish kl-hack mkl soup3      ... plus the paper's ablations
    python salsa.py --model meta-llama/Llama-2-7b-hf --launcher "torchrun --nproc_per_node 8" \
        --sft-data HuggingFaceH4/ultrachat_200k --prefs-data HuggingFaceH4/ultrafeedback_binarized \
        --prompts HuggingFaceH4/ultrafeedback_binarized --questions mt-bench/question.jsonl --judge api \
        --max-len 2048 --sft-steps 0 --sft-lr 2.5e-5 --rm-steps 0 --rm-lr 2e-5 --norm-samples 64 \
        --ppo-steps 0 --ppo-lr 2e-6 --max-new-tokens 512
    python salsa.py study                 SALSA against PPO: {sft, soup} x fixed β x seed (runs/study/report.md)
    python salsa.py study --ablations mkl soup3 alpha0.25 alpha0.75     ... plus the ablations at --ablation-beta
    python salsa.py task --out DIR        only the offline task's data files
    python salsa.py convert-gguf FILE.gguf OUT_DIR

The recipe runs each stage as a subprocess with explicit flags, printed first (copy any line), and
skips a stage whose output exists (rerun = resume). Offline there is no UltraChat, UltraFeedback or
GPT-4, so the default brings a task a program can judge (checkable instructions, below).
"""
import argparse
import array
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------- flags and errors
class InputError(ValueError):
    """Bad input a person can fix (a flag, a file, a row, a tensor): the message names it and says what
    to do. A stage started by `run` ends on it with one `error: ...` line and no traceback, which is
    kept for bugs."""


def run(main, cls, argv=None):
    """A stage's entry point: parse the flags of dataclass `cls`, then `main(args)`."""
    args = parse_args(cls, argv)
    try:
        main(args)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: unbuffered (PYTHONUNBUFFERED), print's text and its
        sys.stderr.flush()  # newline are two, and the ranks' lines interleave into one
        if getattr(e, "every_rank", False):  # raised on every rank at once (distribute): wait until each has
            end_group()  # printed it, or torchrun stops the others when the first one exits
        sys.exit(2)
    end_group()


def end_group():
    """Under torchrun, once every rank is here (rank 0 may still be writing the model), destroy the process
    group. Left to interpreter exit, gloo's threads can be torn down unjoined: "terminate called without an
    active exception", SIGABRT, and a run that saved its model fails (CI's 2-rank PPO did; pytorch#190489)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


DType = typing.Literal["float32", "bfloat16", "float16"]


def arg(default, help: str, low: float | None = None):
    """A dataclass field whose help text becomes the flag's `--help` line; a value below `low` is refused
    by the parser, naming the flag (a zero batch or micro-batch otherwise fails deep in a loop)."""
    meta = {"help": help, "low": low}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(kind, low: float):
    def parse(text: str):
        if (value := kind(text)) < low:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low:g}")
        return value
    return parse


def parse_args(cls, argv=None):
    """Build an argparse parser from a dataclass of `arg(...)` fields: `max_len` becomes `--max-len`. No
    abbreviations: argparse takes a unique prefix for the whole flag, so were ppo.py's `--cliprange` ever
    renamed, an old script's `--cliprange 0.2` would set `--cliprange-value` and run on silently."""
    parser = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__, allow_abbrev=False,
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
            opts["type"] = kind if f.metadata.get("low") is None else at_least(kind, f.metadata["low"])
        if typing.get_origin(kind) is typing.Literal:
            opts.update(type=str, choices=typing.get_args(kind))
        parser.add_argument("--" + f.name.replace("_", "-"), **opts)
    return cls(**vars(parser.parse_args(argv)))


def py_function(spec: str):
    """The function `module:function` (a judge: (prompt, answer) -> score, the prompt a str or messages),
    importable from the working directory."""
    module, _, name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"py:{spec}: {e} (expected py:module:function, the module importable from here)") from None


# ---------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # under torchrun, 1 process included: every model goes through FSDP2

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(seed: int) -> Dist:
    """No-op in one process; under torchrun reads RANK/WORLD_SIZE/LOCAL_RANK (nanoGPT style) and
    shards, also at --nproc_per_node 1 (the FSDP2 path on one GPU: bf16 compute, sharded checkpoints).
    Device from the environment: CUDA if present (nccl), else CPU (gloo). Seeds with seed + rank."""
    cuda = torch.cuda.is_available()
    d = Dist()
    if "RANK" in os.environ:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), sharded=True)
        # NCCL's default timeout is 10 minutes: the other ranks wait in a collective while rank 0 alone builds
        # a 7B soup (distribute) or writes the final policy and critic (~56 GB at fp32), which can take longer
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
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
    weights and buffers (RoPE's inv_freq is in no state dict) are broadcast into the shards. An InputError
    of rank 0's build is raised on every rank (the others would wait for its weights for ever)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if not dist.sharded:
        return build().to(dist.device)
    full, spec = None, [None]
    if dist.main:
        try:
            full = build()
            spec = [(type(full), full.config, getattr(full, "generation_config", None), full.dtype)]
        except InputError as e:
            spec = [e]
    torch.distributed.broadcast_object_list(spec, src=0)
    if isinstance(spec[0], InputError):
        spec[0].every_rank = True
        raise spec[0]
    cls, config, generation_config, dtype = spec[0]
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    if generation_config is not None:  # a causal LM's (load_model: blank but for the pad id)
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
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers.modeling_layers import GradientCheckpointingLayer
    if not dist.sharded:
        return model
    mp = mixed_precision(dist.device)
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


def mixed_precision(device):
    """FSDP2's dtypes: on CUDA, bf16 compute over the fp32 master weights and an fp32 gradient reduce; on the CPU
    the weights' own (its kernels gain little from bf16). tests/test_fsdp.py runs CUDA's on the CPU too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()


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
    """The whole state dict, a tied weight under its first name only, as save_pretrained writes it: under
    FSDP on rank 0's CPU (other ranks: empty), in one process the model's own tensors, where they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if dist.sharded:
        reshard(model)
    state = model.state_dict() if not dist.sharded else \
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if k not in tied}


def sync_grads(model, last: bool):
    """FSDP: reduce gradients only in the backward of a minibatch's last micro-batch; the ones before
    accumulate unsharded on each rank (no communication). One process: nothing to do."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)


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
    if not dist.sharded:
        return opt.state_dict()
    reshard(model)
    return Sharded(dict(zip(("model", "optim"), get_state_dict(model, opt))))


def load_optimizer_state(model, opt, state, dist: Dist):
    """Inverse of optimizer_state, for the same number of ranks; under FSDP it also restores the
    weights of `model` from the checkpoint's shards (a sharded checkpoint has no HF weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not dist.sharded:
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
    `<|pad|>` (load_model then grows the embedding). A chat template must close an assistant turn with
    EOS: generation and PPO stop there, so a template that ends turns with another token (Gemma's
    `<end_of_turn>`, with `<eos>` as EOS) would train a model that never stops."""
    from transformers import AutoTokenizer
    if not Path(path).is_dir() and not is_hub_name(path):
        raise InputError(f"{path}: no such model directory (nor a hub name org/model)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "left"
    if tok.chat_template is None:  # a base model (Llama-2-7B, Mistral-7B, Gemma-2B): the paper's own format
        tok.chat_template = BASE_CHAT_TEMPLATE
    user = [{"role": "user", "content": "Hi"}]
    turn = render(tok, user + [{"role": "assistant", "content": "Hello"}], where=path)
    if tok.eos_token_id is None or tok.eos_token_id not in turn[len(render(tok, user, True, path)):]:
        raise InputError(f"{path}: its chat template ends an assistant turn without the EOS token "
                         f"{tok.eos_token!r}, so a model never learns to stop: set eos_token in its "
                         "tokenizer_config.json to the token that ends a turn, or delete its chat template "
                         "to use the paper's format")
    return tok


def is_hub_name(path: str) -> bool:
    """`org/model` that is no local path: exactly one slash, and neither the path nor its folder exists here."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).parent.exists()


def check_model_dir(path: str, allow_pickle: bool = False):
    """Refuse, naming the file, a local model directory that transformers would fail on with a traceback
    naming neither (no config.json, a truncated safetensors file) or load without asking: pickled weights
    (pytorch_model.bin) run code when loaded, so they need `allow_pickle` (the scripts' --allow-pickle)."""
    d = Path(path)
    if not d.is_dir():
        if is_hub_name(path):
            return
        raise InputError(f"{path}: no such model directory (nor a hub name org/model)")
    if not (d / "config.json").exists():
        raise InputError(f"{path}: no config.json, so not a Hugging Face model directory: give the folder "
                         "save_pretrained wrote")
    index = d / "model.safetensors.index.json"
    files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists() \
        else sorted(d.glob("*.safetensors"))
    pickles = sorted(p.name for p in d.glob("pytorch_model*.bin"))
    if not files and pickles and not allow_pickle:
        raise InputError(f"{path}: weights only as a pickle ({pickles[0]}), which can run code when loaded: "
                         "convert them to safetensors, or pass --allow-pickle if you trust the file")
    if not files and not pickles:
        raise InputError(f"{path}: no weights (model.safetensors) in the directory")
    from safetensors import SafetensorError, safe_open
    for f in files:
        if not f.exists():
            raise InputError(f"{f}: missing (the model directory's index lists it): copy the whole directory")
        try:  # safe_open checks that the header is whole and that the tensors' bytes fill the file
            with safe_open(str(f), "pt"):
                pass
        except SafetensorError:
            raise InputError(f"{f}: truncated or not a safetensors file ({f.stat().st_size} bytes): save or copy "
                             "it again") from None


def check_finite(tensors: dict, where: str):
    """Refuse a model whose weights hold NaN or inf (a diverged run): it would train or score silently
    as NaN, or die deep inside sampling."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{where}: tensor {name} holds NaN or inf values: the checkpoint is broken "
                             "(a diverged run?); use an earlier one")


def vocabulary(path: str):
    """What must match for token ids to mean the same in two models: the config's vocab_size and the
    tokenizer's tokens (read from its files: importing transformers would double a soup's time)."""
    size = json.loads(Path(path, "config.json").read_text())["vocab_size"]
    if Path(path, "tokenizer.json").exists():
        tokenizer = json.loads(Path(path, "tokenizer.json").read_text())
        return size, tokenizer["model"].get("vocab"), [t["content"] for t in tokenizer.get("added_tokens", [])]
    return size, Path(path, "tokenizer.model").read_bytes() if Path(path, "tokenizer.model").exists() else None


def check_vocabularies(paths: list[str]):
    """Refuse models whose token ids mean different things (a soup, a reference or a reward model of
    another tokenizer would score the policy's tokens as other words)."""
    for p in paths[1:]:
        if vocabulary(p) != vocabulary(paths[0]):
            raise InputError(f"{p}: its vocabulary (config vocab_size or tokenizer tokens) differs from "
                             f"{paths[0]}'s: use models fine-tuned from one base, with one tokenizer")


def from_pretrained(cls, path: str, dtype: str = "float32", attn: str = "sdpa", allow_pickle: bool = False, **kw):
    """`cls.from_pretrained(path)` of a checked directory (check_model_dir), refused if a weight is NaN or inf."""
    check_model_dir(path, allow_pickle)
    model = cls.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn,
                                use_safetensors=None if allow_pickle else True, **kw)
    check_finite((model[0] if kw.get("output_loading_info") else model).state_dict(), path)
    return model


def load_model(path: str, tok=None, dtype: str = "float32", attn: str = "sdpa", device="cpu", dist=None,
               train: bool = False, allow_pickle: bool = False):
    """A causal LM from a local directory or hub name, dropout off (RL needs the rollout and the
    training forward to be the same function), pad id set from the tokenizer. Under torchrun
    it comes back sharded by `distribute`, `train` saying it will be trained.

    Its own generation_config.json is dropped for a blank one: transformers merges a model's
    settings (do_sample, top_p, repetition_penalty, ...) into every config passed to generate, so a
    checkpoint saved with sampling settings would make "greedy" sample and PPO's rollouts differ
    from the distribution it scores. Every generate gets a complete salsa.generation_config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    def build():
        model = from_pretrained(AutoModelForCausalLM, path, dtype, attn, allow_pickle)
        check_head(model, path)
        model.generation_config = GenerationConfig()
        if tok is not None:
            if len(tok) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tok))
            model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
        disable_dropout(model)
        return model
    return distribute(build, dist or Dist(device=torch.device(device)), train)


def check_head(model, path: str):
    """token_logprobs computes log-softmax(h·Wᵀ / T) itself (fp32, chunked), with only Gemma-2's softcap on top:
    a head with a bias (Phi) or a config that scales the logits (Granite, Cohere) would make every SFT loss,
    PPO ratio and KL those of another model than the one that samples. Refused, not silently mis-scored."""
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise InputError(f"{path}: its output layer has a bias, which salsa's log-probs (token_logprobs) leave out")
    if scaled := {k: v for k in ("logits_scaling", "logit_scale") if (v := getattr(model.config, k, 1)) not in (1, None)}:
        raise InputError(f"{path}: config.json scales the logits ({scaled}), which salsa's log-probs leave out")


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


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) from a local .json/.jsonl/.parquet file or a hub dataset name (with `split`). `where`
    names the row for error messages, one rule everywhere: "FILE line N" (a jsonl file's line number),
    else "SOURCE row N", counted from 1. A UTF-8 byte-order mark (Windows editors write one) is skipped."""
    if os.path.exists(source):
        if source.endswith(".jsonl"):
            return jsonl_rows(source)
        if source.endswith(".json"):
            try:
                rows = json.loads(Path(source).read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise InputError(f"{source}: not valid JSON ({e})") from None
            if not isinstance(rows, list):
                raise InputError(f"{source}: expected a JSON list of rows")
        elif source.endswith(".parquet"):
            import datasets
            rows = list(datasets.Dataset.from_parquet(source))
        else:
            raise InputError(f"{source}: expected .json, .jsonl or .parquet")
    elif source.endswith((".json", ".jsonl", ".parquet")) or not is_hub_name(source):
        raise InputError(f"{source}: no such file, and not a hub dataset name (org/name)")
    else:
        import datasets
        rows = list(datasets.load_dataset(source, split=split))
        source = f"{source}[{split}]"
    return check_objects([(f"{source} row {i}", row) for i, row in enumerate(rows, 1)])


def jsonl_rows(path: str) -> list[tuple[str, dict]]:
    """(where, row) of a JSON-lines file, where = "FILE line N"; blank lines and a byte-order mark are skipped, and
    a line that is not JSON, or not a JSON object, is refused, naming it. Data, answers and logs alike."""
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append((f"{path} line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {i}: not JSON ({e}): fix or delete that line") from None
    return check_objects(rows)


def check_objects(rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Refuse, naming it, a row that is not a JSON object (a bare string or number line): `"prompt" in row`
    would test a string's letters."""
    for where, row in rows:
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object of fields, got {json.dumps(row)[:60]}")
    return rows


QUESTIONS_SPLIT = "test_prefs"  # eval.py's --split: a hub --questions dataset's (UltraFeedback's test split, §4)


def load_questions(source: str, split: str, limit: int = 0) -> list[dict]:
    """[{id, turns: [str]}] from any of the three question formats (a row without an id: its index from 0)."""
    out, seen = [], {}
    for i, (where, row) in enumerate(read_rows(source, split)[: limit or None]):
        qid = next((row[k] for k in ("question_id", "uid", "prompt_id") if k in row), i)
        turns = [t.get("content") if isinstance(t, dict) else t for t in row.get("turns") or [row.get("prompt")]]
        if not all(isinstance(t, str) and t for t in turns):
            raise InputError(f"{where}: question {qid} has no question: expected `turns` (strings or "
                                   "{content}) or a `prompt` string")
        if str(qid) in seen:
            raise InputError(f"{where}: question {qid} is also {seen[str(qid)]}: ids must be unique")
        seen[str(qid)] = where
        out.append({"id": qid, "turns": turns})
    return out


def rows_note(wheres: list[str], shown: int = 3) -> str:
    """The first few of `wheres`, for a message that says which rows were dropped or kept."""
    return "; ".join(wheres[:shown]) + (f"; and {len(wheres) - shown} more" if len(wheres) > shown else "")


def check_messages(messages, where: str, answered: bool = True) -> list[dict]:
    """UltraChat-200k schema: a list of {role, content}, with an assistant turn if `answered`; raise naming
    `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {j} must be {{'role': system|user|assistant, 'content': str}}, "
                             f"got {m!r:.80}")
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant message to learn from")
    first = next((j for j, m in enumerate(messages) if m["role"] != "system"), None)
    if first is not None and messages[first]["role"] == "assistant":  # nothing to render as its prompt
        raise InputError(f"{where}: message {first} is the assistant's, before any user message: "
                         "a conversation starts with the user")
    return messages


def rows_with_special_text(tok, rows: list[tuple[str, list[dict]]], what: str, dist: Dist) -> set[str]:
    """The `where` of each of `rows` ((where, messages), checked) that writes a special token as text in a
    message (a '<|im_end|>' or '</s>' in code): the tokenizer reads it as that control token, so an SFT target
    ends there and a prompt opens a turn. The trainers drop these rows, counted and named like rows too long."""
    specials = tok.all_special_tokens  # a property that builds its list on every call
    bad = {where: t for where, msgs in rows
           if (t := next((t for m in msgs for t in specials if t in m["content"]), None))}
    if bad:
        log0(dist, f"dropped {len(bad)} {what} that write a special token as text (e.g. {next(iter(bad.values()))!r}"
                   f", which the tokenizer reads as a control token): {rows_note(list(bad))}")
    return set(bad)


def render(tok, messages: list[dict], add_generation_prompt=False, where: str = "row") -> list[int]:
    """Token ids of the chat template's text, with exactly one BOS where the tokenizer adds one (Llama-2,
    Mistral, Gemma: their models never saw text without it) and none where it does not (SmolLM2). The
    text is tokenised without special tokens, so a template that writes its own BOS keeps just that one."""
    from jinja2 import TemplateError
    try:  # a template's own refusal (Gemma's: "System role not supported") is a row's error
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise InputError(f"{where}: the chat template refuses this conversation: {e}") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and tok("")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def tokenize_chat(tok, messages: list[dict], max_len: int, where: str = "row"):
    """(input_ids, labels) with labels = -100 except on assistant tokens.

    Templates rarely mark assistant spans ({% generation %}), so we render the conversation prefix
    by prefix: the tokens an assistant message adds after its generation prompt are its own
    (content and end-of-turn token; template text after the EOS is not learnt). Truncation rule: keep the first `max_len` tokens; a row
    whose first assistant token falls beyond them is returned as None (the caller counts it)."""
    ids, labels = [], []
    for i, m in enumerate(messages):
        before = render(tok, messages[:i], True, where) if m["role"] == "assistant" else ids
        after = render(tok, messages[: i + 1], where=where)
        if after[: len(before)] != before or before[: len(ids)] != ids:
            raise InputError(f"{where}: chat template does not extend prefix by prefix at message {i}")
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
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, False)
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise InputError(f"{where}: prompt must be a non-empty string or messages ending with a user turn")
    return render(tok, messages, add_generation_prompt=True, where=where)


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
    """Plain temperature sampling (greedy at 0), every warper set to off: PPO scores its samples with
    temperature-scaled log-probs, which must be the sampling distribution, and greedy must be greedy.
    (load_model blanks each model's own generation_config, which transformers would merge into this.)"""
    from transformers import GenerationConfig
    sample = temperature > 0
    # top_k 0 is no top-k filter; greedy runs no warper, and 50 is the value transformers takes as unset there
    return GenerationConfig(do_sample=sample, temperature=temperature if sample else 1.0, top_k=0 if sample else 50,
                            top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
                            max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], cfg, batch_size: int, dist: Dist = Dist(), desc: str = "generate"):
    """Responses (token ids) to prompts (token ids), `batch_size` left-padded rows at a time, each cut
    after its first EOS (kept), or whole if it never stops. Under FSDP each batch gathers the weights
    once and the ranks step together until all have finished."""
    from tqdm import tqdm
    out, eos = [], tok.eos_token_id
    for i in tqdm(range(0, len(prompts), batch_size), desc, leave=False, disable=not dist.main or len(prompts) <= batch_size):
        ids, mask = pad(prompts[i:i + batch_size], tok.pad_token_id, device=model.device)  # (B, P)
        with gathered(model):
            seq = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, synced_gpus=dist.world > 1)
        out += [r[:r.index(eos) + 1] if eos in r else r for r in seq[:, ids.shape[1]:].tolist()]
    return out


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
    logits = F.linear(h.float(), head_w)  # (N, V), fp32 (head_w is)
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
    sampling temperature (as in the rollout), computed in fp32 from the matmul on (a bf16 matmul
    rounds them by ~0.02 nats per token under FSDP's bf16 compute, tests/bf16_gap.py: PPO's whole KL
    budget over a 512-token answer), and in chunks of at most `max_logits` floats; under autograd each chunk is recomputed in backward (checkpointing), so a
    256k vocabulary never holds (B*T, V) logits at once."""
    head_w = model.get_output_embeddings().weight.float()  # (V, d); a copy only for a bf16 model
    softcap = getattr(model.config, "final_logit_softcapping", None)
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
    rows = max(1, max_logits // head_w.shape[0])
    parts = []
    for i in range(0, h.shape[0], rows):
        args = (head_w, h[i:i + rows], t[i:i + rows], 1.0 / temperature, softcap)
        parts.append(checkpoint(_logp_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _logp_chunk(*args))
    logp, ent = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logp.view(targets.shape), ent.view(targets.shape)


# ---------------------------------------------------------------- optimisation
def lr_lambda(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Multiplier of the peak lr: linear warmup for `warmup` steps, then linear or cosine decay to 0."""
    import math
    if step < warmup:  # steps 0 .. warmup-1 at 1/(warmup+1) .. warmup/(warmup+1): a 1-step warmup warms
        return (step + 1) / (warmup + 1)
    frac = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def plot(png: Path, draw):
    """Call draw(pyplot) and save the figure (the caller says where it wrote: `png` may be in a temp dir);
    matplotlib is optional: without it the .csv is the result."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print(f"{png.name} not drawn: plots need `pip install matplotlib` (the numbers are in the .csv)")
    draw(plt)
    plt.tight_layout()
    plt.savefig(png, dpi=120)
    plt.close()


# ---------------------------------------------------------------- checkpoints and logs
def save_atomic(out: str, write, replace: bool = False):
    """Call `write(tmp_dir)`, then rename tmp_dir to `out`: a crash leaves no half directory.
    `out` must not exist yet (callers check before any work, so a failed run overwrites nothing), unless
    `replace`: then a complete new `out` takes the old one's place, and a failed run leaves the old one."""
    out = Path(out)
    tmp, old = (out.parent / f".{out.name}.{kind}{os.getpid()}" for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(str(tmp))
        if replace and out.exists():
            os.replace(out, old)
        os.replace(tmp, out)  # fails if `out` appeared meanwhile (a non-empty directory): the temp dir goes too
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # a crash or Ctrl-C leaves neither `out` nor a half-written temp dir
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():  # replace: the old `out` goes back where it was
            os.replace(old, out)
        raise


def save_model(out: str, model, tok, files: dict | None = None, dist: Dist = Dist()):
    """An HF directory `transformers` loads: safetensors weights, config, tokenizer, and extra
    json files (metrics, reward normalisation, ...) given as {name: object}. Under FSDP every rank
    calls it (the weights are gathered) and rank 0 writes."""
    state = full_state_dict(model, dist) if dist.sharded else None

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
    path.parent.mkdir(parents=True, exist_ok=True)
    if not dist.sharded:
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
        for old in checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)


def checkpoints(ckpt_dir: str) -> list[Path]:
    """The complete resumable checkpoints in `ckpt_dir`, oldest first (step numbers are zero-padded)."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "trainer_state.pt").exists())


def latest_checkpoint(ckpt_dir: str) -> str | None:
    done = checkpoints(ckpt_dir)
    return str(done[-1]) if done else None


def load_trainer_state(path: str, dist: Dist = Dist()) -> dict:
    """trainer_state.pt of a checkpoint; its Sharded entry (FSDP) comes back pointing at the shards."""
    state = torch.load(Path(path, "trainer_state.pt"), map_location="cpu", weights_only=False, mmap=True)
    sharded, world = any(isinstance(v, Sharded) for v in state.values()), state.get("world", dist.world)
    if sharded != dist.sharded or world != dist.world:  # shards and generators are per rank
        how = lambda sharded, world: f"under torchrun at world size {world}" if sharded else "by one process"
        e = InputError(f"{path}: written {how(sharded, world)}: resume it the same way (now {how(dist.sharded, dist.world)})")
        e.every_rank = True  # each rank read the same file
        raise e
    return {k: Sharded(path) if isinstance(v, Sharded) else v for k, v in state.items()}


def digest(seqs) -> str:
    """A sha256 of token-id sequences, each with its length (about 1 s per 30M tokens). A resumed run records
    it among its flags: --data names a file, and a file regenerated in place would resume on other rows (with
    another schedule and data order: both are computed from the number of rows)."""
    h = hashlib.sha256()
    for ids in seqs:
        h.update(array.array("q", [len(ids), *ids]).tobytes())
    return h.hexdigest()[:16]


def resume_point(ckpt: str, resume: bool, flags: dict, dist: Dist = Dist()) -> tuple[str | None, dict | None]:
    """(the newest checkpoint in `ckpt`, its trainer state) with --resume, else (None, None); refused
    unless it was made with the same `flags` and data (a resumed run must be the run it continues)."""
    start = latest_checkpoint(ckpt) if resume else None
    state = load_trainer_state(start, dist) if start else None
    if state and (changed := [k for k in flags if state["flags"].get(k) != flags[k]]):
        raise InputError(f"{start} was made with other flags or data ({', '.join(changed)}): resume with the same ones")
    return start, state


def restore(start: str | None, state: dict | None, model, opt, sched, log: str, dist: Dist = Dist()) -> int:
    """Put a checkpoint's optimizer, scheduler and generators back (under FSDP also the weights of
    `model`, the module `opt` trains) and drop the metrics rows logged after it. Returns the step to go
    on from: the checkpoint's, or 0 without one, a fresh start, which deletes the logs of an earlier run
    that died before its first checkpoint: here, once every input is checked and every model loaded, so
    a run refused for bad input keeps them."""
    if not state:
        for path in (log, Path(log).with_name("samples.jsonl")) if dist.main else ():
            Path(path).unlink(missing_ok=True)
        return 0
    load_optimizer_state(model, opt, state["optimizer"], dist)
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], dist)
    if dist.main:
        for path in (log, Path(log).with_name("samples.jsonl")):  # PPO's samples too: the steps after are redone
            truncate_log(path, state["step"])
    log0(dist, f"resuming from {start} at step {state['step']}")
    return state["step"]


def trainer_state(model, opt, sched, step: int, dist: Dist = Dist(), **extra) -> dict:
    """What `restore` reads back (a collective under FSDP), plus the trainer's own `extra` entries."""
    return {"optimizer": optimizer_state(model, opt, dist), "scheduler": sched.state_dict(), "step": step,
            "rng": rng_state(dist), "world": dist.world, **extra}


def check_new(out: str):
    """Refuse an output that exists, before any work: a failed run overwrites nothing."""
    if Path(out).exists():
        raise InputError(f"{out} already exists: choose another --out or delete it")


def prepare_out(out: str, resume: bool) -> str:
    """Check `out` before any work: the final model dir must not exist; returns the run's
    checkpoint dir `out.ckpt` (also home of metrics.jsonl), which must hold no checkpoint unless
    resuming. It is made by the first metrics row or checkpoint, so a run that fails before leaves none."""
    check_new(out)
    ckpt = f"{out}.ckpt"
    if not resume and latest_checkpoint(ckpt):
        raise InputError(f"{ckpt} holds checkpoints of an earlier run: pass --resume or delete it")
    # half-written saves of a killed run: checkpoints, and the final model's temp dir (save_atomic). Under
    # torchrun every rank deletes them at once, and a file another rank took is no error
    for stale in [*Path(ckpt).glob(".*.tmp*"), *Path(out).parent.glob(f".{Path(out).name}.tmp*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return ckpt


def rng_state(dist: Dist = Dist()):
    """This process's generators; on 2 or more ranks a list of every rank's (a collective)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None}  # its own GPU's
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
        torch.cuda.set_rng_state(state["cuda"], dist.device)


def clock(device) -> float:
    """Wall-clock seconds once `device` has run its queued work. CUDA runs kernels asynchronously: a timer read
    without waiting charges a stage's kernels to whatever waits next (PPO's last backward to its log line)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def peak_memory_gb(device) -> float:
    """This process's peak memory so far, GB: the CUDA allocator's on a GPU, the resident set on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports kB


def log_jsonl(path: str, row: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def drop_cut_line(path: str):
    """A JSON-lines file that a killed run was appending to can end in a cut line: drop it (its row is redone)."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        Path(path).write_text(text[:text.rfind("\n") + 1])
        print(f"{path}: dropped its last line, cut short when a run was stopped")


def truncate_log(path: str, step: int):
    """On resume: drop the rows an interrupted run logged past its checkpoint (they are redone)."""
    if Path(path).exists():
        drop_cut_line(path)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step))


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file, checked as jsonl_rows checks them."""
    return [row for _, row in jsonl_rows(path)]


# ---------------------------------------------------------------- reward models
def load_reward_model(path: str, dtype: str = "float32", attn: str = "sdpa", device="cpu", dist: Dist | None = None,
                      allow_pickle: bool = False, train: bool = False):
    """A reward model saved by reward.py: a standard AutoModelForSequenceClassification (num_labels=1)
    directory whose config.json also carries `reward_bias` and `reward_gain` (1 if absent), the
    normalisation reward_scores applies.
    Eval mode, dropout off, sharded under torchrun (`train`: as a trained model, ppo.py's critic);
    freezing it (requires_grad) is the caller's choice."""
    from transformers import AutoModelForSequenceClassification

    if Path(path, "trainer_state.pt").exists():
        raise InputError(f"{path} is a resumable checkpoint of reward.py: its scores are not normalised yet (its "
                         "config has reward_bias 0, reward_gain 1); give the run's final --out")

    def build():
        rm = from_pretrained(AutoModelForSequenceClassification, path, dtype, attn, allow_pickle)
        if rm.config.num_labels != 1 or not isinstance(getattr(rm.config, "reward_bias", None), (int, float)):
            raise InputError(f"{path}: a reward model needs num_labels=1 and a numeric `reward_bias` in config.json "
                             "(train it with reward.py, or add \"reward_bias\": 0.0 to use its raw scores)")
        if not isinstance(gain := getattr(rm.config, "reward_gain", 1.0), (int, float)) or not 0 < gain < float("inf"):
            raise InputError(f"{path}: `reward_gain` in config.json is {gain!r}, expected a positive number")
        disable_dropout(rm)
        return rm
    return distribute(build, dist or Dist(device=torch.device(device)), train).eval()


def reward_scores(rm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised reward (B,) in fp32: the scalar head on the last real token (the last mask == 1,
    i.e. the EOS closing the response), minus config.reward_bias, times config.reward_gain (1 for a
    model from before the gain). Rows may be padded on both sides.

    HF's own forward is not used: it finds the last token by comparing ids with pad_token_id (wrong
    if a real token shares that id) and gives left-padded rows shifted positions."""
    h = hidden_states(rm, ids, mask)  # (B, T, d)
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
    return reward_head(rm, h[torch.arange(h.shape[0], device=h.device), last])  # (B,)


def reward_head(rm, h: torch.Tensor) -> torch.Tensor:
    """The normalised reward (...) of states h (..., d): the scalar head in fp32 (a bf16 model's rewards
    are not rounded to 8 mantissa bits), minus config.reward_bias, times config.reward_gain."""
    raw = F.linear(h.float(), rm.score.weight.float()).squeeze(-1)
    return (raw - rm.config.reward_bias) * getattr(rm.config, "reward_gain", 1.0)


# ---------------------------------------------------------------- the recipe's task: checkable instructions
# Offline there is no UltraFeedback and no GPT-4, so the recipe (below) brings a task whose quality a program
# can judge, in the spirit of IFEval (Zhou et al. 2023): "Write about <topic>." plus 1-3 constraints. The
# gold judge reads the constraints back from the prompt text alone, so it is a (prompt, answer) -> score
# function that eval.py takes as `--judge py:salsa:gold_score`.
TOPICS = ["coffee", "rain", "bicycles", "the moon", "gardens", "music", "libraries", "the ocean", "winter",
          "bread", "trains", "cats", "mountains", "friendship", "rivers", "chess", "candles", "forests", "kites",
          "tea", "bridges", "snow", "maps", "bees", "lighthouses", "soup", "clocks", "deserts", "owls", "painting"]
SENTENCES = ["{T} can make an ordinary day better.", "Many people have a story about {t}.",
             "There is always something new to notice about {t}.", "{T} can look different in every season.",
             "People often remember {t} from their childhood.", "Learning about {t} takes patience.",
             "{T} can bring people together.", "A small detail about {t} can be surprising.",
             "Some say {t} should be enjoyed slowly.", "Writers have praised {t} for centuries."]
WORDS = ["morning", "quiet", "history", "light", "simple", "journey", "color", "home"]  # to include
AVOID = ["people", "day", "always", "small", "best", "new"]  # all but "best" are in sentences above
STARTS = ["Honestly", "Well", "Today", "Indeed", "Surely"]
ENDINGS = ["that is all", "thank you for reading", "the end", "enough said"]
# kind: (instruction with one {}, the regex that reads its value back from a prompt)
CONSTRAINTS = {
    "include": ('Use the word "{}".', r'Use the word "(\w+)"\.'),
    "avoid": ('Do not use the word "{}".', r'Do not use the word "(\w+)"\.'),
    "max_words": ("Answer in at most {} words.", r"Answer in at most (\d+) words\."),
    "bullets": ('Answer with exactly {} bullet points, each on its own line starting with "- ".',
                r"Answer with exactly (\d+) bullet points"),
    "lowercase": ("Write only in lowercase letters{}.", r"Write only in lowercase letters()\."),
    "start": ('Start your answer with the word "{}".', r'Start your answer with the word "(\w+)"\.'),
    "end": ('End your answer with the phrase "{}".', r'End your answer with the phrase "([\w ]+)"\.'),
}


def constraints_of(prompt) -> dict:
    """{kind: value} of the constraints a task prompt states (a str, or messages ending with it)."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return {k: m.group(1) for k, (_, rx) in CONSTRAINTS.items() if (m := re.search(rx, text))}


def meets(kind: str, value: str, answer: str) -> bool:
    """Whether `answer` meets one constraint. Words match whole and case-blind; a bullet is a line "- ..."."""
    word = re.compile(rf"\b{re.escape(value)}\b", re.IGNORECASE)
    first = re.match(r"\W*(\w+)", answer)
    return {"include": lambda: bool(word.search(answer)),
            "avoid": lambda: not word.search(answer),
            "max_words": lambda: 0 < len(answer.split()) <= int(value),
            "bullets": lambda: len(re.findall(r"^\s*- \S", answer, re.MULTILINE)) == int(value),
            "lowercase": lambda: answer == answer.lower() and any(c.isalpha() for c in answer),
            "start": lambda: bool(first) and first.group(1).lower() == value.lower(),
            "end": lambda: re.search(rf"\b{re.escape(value)}[.!]?\s*$", answer, re.IGNORECASE) is not None}[kind]()


# An answer with no content: it meets every constraint it cannot break (a word to avoid, a word limit), so
# the gold score has a floor well above 0. results.md and report.md print its score beside the models'.
NO_CONTENT = "zzz"


def gold_score(prompt, answer: str) -> float:
    """The gold judge: the fraction of the prompt's constraints that the answer meets, in [0, 1]. It reads
    the constraints only, not the topic or whether the answer is prose: see NO_CONTENT."""
    cons = constraints_of(prompt)
    if not cons:
        raise ValueError(f"not a task prompt of the recipe (no constraint found): {str(prompt)[:80]!r}")
    return sum(meets(k, v, answer) for k, v in cons.items()) / len(cons)


def task_prompt(rng: random.Random) -> tuple[str, str, dict]:
    """(prompt, topic, {kind: value}) with 1-3 constraints that one answer can meet together."""
    topic = rng.choice(TOPICS)
    kinds = rng.sample(sorted(CONSTRAINTS), rng.randint(1, 3))
    if "bullets" in kinds and ("start" in kinds or "max_words" in kinds):  # a list starts with "- ", and
        kinds.remove("bullets")  # task_answer does not cut bullets to a word budget
    cons = {k: str(rng.choice({"include": WORDS, "avoid": AVOID, "max_words": [20, 30, 40], "bullets": [2, 3, 4],
                               "lowercase": [""], "start": STARTS, "end": ENDINGS}[k])) for k in sorted(kinds)}
    text = " ".join([f"Write about {topic}."] + [CONSTRAINTS[k][0].format(v) for k, v in cons.items()])
    return text, topic, cons


def task_answer(rng: random.Random, topic: str, cons: dict, keep: set) -> str:
    """An answer written to meet the constraints in `keep` and to break the others, where it can (one with
    every constraint kept meets them all, which make_task asserts for SFT rows; in a preference pair a cut
    to a wrong number of bullets can also drop an included word: the gold judge labels pairs, not `keep`)."""
    sents = [s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in rng.sample(SENTENCES, len(SENTENCES))]
    for k in ("include", "avoid"):
        if k in cons:
            word = re.compile(rf"\b{cons[k]}\b", re.IGNORECASE)
            sents = [s for s in sents if not word.search(s)]
            if (k == "include") == (k in keep):  # an include met, or an avoid broken: the word goes in
                sents.insert(rng.randint(0, 1), f"It makes me think of {cons[k]}.")
    if "bullets" in cons:  # bullets never come with max_words (task_prompt)
        n = int(cons["bullets"]) + (0 if "bullets" in keep else rng.choice([-1, 1]))
    elif "max_words" in keep:  # as many sentences as fit, with room for a start word and an ending; an answer
        n = 3  # that keeps every constraint (SFT's) is never cut before the word to include (that sentence and the
        # longest, 16 words, fit in 20 with either). Only there: wider, it would change the study's committed data
        must = f"It makes me think of {cons.get('include')}." if keep == set(cons) else None
        low = 1 + sents.index(must) if must in sents else 1
        while n > low and len(" ".join(sents[:n]).split()) + 5 > int(cons["max_words"]):
            n -= 1
    else:
        n = len(sents) if "max_words" in cons else rng.randint(2, 3)
    text = "\n".join("- " + s for s in sents[:n]) if "bullets" in cons else " ".join(sents[:n])
    if "start" in cons and "start" in keep:
        text = f"{cons['start']}, {text[0].lower()}{text[1:]}"
    if "end" in cons and "end" in keep:
        text += ("\n" if "bullets" in cons else " ") + cons["end"][0].upper() + cons["end"][1:] + "."
    return text.lower() if "lowercase" in keep else text


def make_task(out: str, n_sft: int, n_prefs: int, n_ppo: int, n_eval: int, seed: int = 0):
    """The recipe's data, written to the directory `out` in the project's schemas:
    sft.jsonl (UltraChat: `messages`, answers meeting every constraint), prefs.jsonl (UltraFeedback:
    `prompt`, `chosen`, `rejected`, the side with the higher gold score chosen, ties never written),
    ppo.jsonl and eval.jsonl (`prompt`, `prompt_id`). A prompt text is in one file only, so no
    evaluation prompt is ever trained on."""
    if Path(out).exists():
        raise InputError(f"--out {out} exists: give the task a new folder (the recipe's is OUT/data)")
    rng, seen, files = random.Random(seed), set(), {}
    for name, n in [("eval", n_eval), ("sft", n_sft), ("prefs", n_prefs), ("ppo", n_ppo)]:
        rows = []
        while len(rows) < n:
            prompt, topic, cons = task_prompt(rng)
            if prompt in seen:
                continue
            if name == "sft":
                answer = task_answer(rng, topic, cons, set(cons))
                assert gold_score(prompt, answer) == 1, (prompt, answer)
                rows.append({"prompt_id": f"sft-{len(rows)}", "messages": [{"role": "user", "content": prompt},
                                                                            {"role": "assistant", "content": answer}]})
            elif name == "prefs":
                pair = [task_answer(rng, topic, cons, {k for k in cons if rng.random() < 0.5}) for _ in range(2)]
                a, b = sorted(pair, key=lambda y: -gold_score(prompt, y))
                if gold_score(prompt, a) == gold_score(prompt, b):
                    continue  # a tie says nothing about preference
                rows.append({"prompt": prompt, **{side: [{"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": y}]
                                                  for side, y in (("chosen", a), ("rejected", b))}})
            else:
                rows.append({"prompt_id": f"{name}-{len(rows)}", "prompt": prompt})
            seen.add(prompt)
        files[name] = rows

    def write(tmp):
        for name, rows in files.items():
            Path(tmp, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_atomic(out, write)


# ---------------------------------------------------------------- the recipe: the paper end to end
@dataclass
class Recipe:
    model: str = arg("models/SmolLM2-135M-Instruct", "base model of the SFT runs (paper: Llama-2-7B, Mistral-7B, Gemma-2B)")
    out: str = arg("runs/recipe", "results folder; a stage whose output is there is skipped, so a rerun resumes")
    launcher: str = arg("", "how sft/reward/ppo start, e.g. 'torchrun --nproc_per_node 8' (empty: this python)")
    sft_data: str = arg("", "SFT rows (UltraChat schema; paper: HuggingFaceH4/ultrachat_200k); empty: the task's")
    prefs_data: str = arg("", "preference pairs (UltraFeedback schema; paper: HuggingFaceH4/ultrafeedback_binarized); "
                              "empty: the task's")
    prompts: str = arg("", "PPO prompts (paper: UltraFeedback's); empty: the task's")
    questions: str = arg("", "held-out questions (paper: MT-Bench, Arena-Hard, UltraFeedback test); empty: the task's")
    judge: str = arg("py:salsa:gold_score", "eval.py --judge: the task's gold judge; at scale `api` (GPT-4)")
    judge_url: str = arg("https://api.openai.com/v1", "--judge api: OpenAI-compatible endpoint (key: $OPENAI_API_KEY)")
    judge_model: str = arg("gpt-4-turbo", "--judge api: the judge model (the paper: GPT-4-Turbo)")
    task_seed: int = arg(0, "seed of the task generator")
    task_sizes: list[int] = arg([320, 320, 256, 64], "rows of the task's SFT, preference, PPO and question files")
    max_len: int = arg(256, "token limit of SFT and preference rows (App. A.1: 2048)")
    sft_steps: int = arg(30, "SFT steps per seed (0: one epoch)")
    sft_lr: float = arg(1e-4, "SFT learning rate (App. A.1: 2.5e-5 for 7B; a 135M model in 30 steps needs more)")
    rm_steps: int = arg(30, "reward-model steps (0: one epoch)")
    rm_lr: float = arg(5e-5, "reward-model learning rate (App. A.2: 2e-5; more for 30 steps)")
    norm_samples: int = arg(32, "SFT samples that set the reward model's normalisation")
    ppo_steps: int = arg(20, "PPO steps of every run (0: one pass over the prompts)")
    ppo_lr: float = arg(1e-5, "PPO learning rate (App. A.3: 2e-6 for 7B; more for 20 steps at 135M)")
    max_new_tokens: int = arg(64, "length limit of PPO's rollouts and of the answers")
    ppo_micro_batch: int = arg(8, "ppo.py --micro-batch, an upper bound per rank (8: the batch in one forward on one "
                                  "CPU process, 0.84x the wall time of 1 on the study's prompts; at 8 GPUs each rank has 1 row)")
    alphas: list[float] = arg([0.0, 0.25, 0.5, 0.75, 1.0], "soup weights of the alpha line (Fig. 2a/b)")
    alpha_limit: int = arg(32, "questions per point of the alpha line")
    ablations: list[str] = arg([], "extra runs: gibberish (PPO at β 0.01), kl-hack (SALSA at β 0.2), "
                                   "mkl (eq. 5), soup3 (SALSA against a 3-SFT soup), alpha0.25 and alpha0.75 "
                                   "(SALSA against the soup at that α, Fig. 4a)")


@dataclass
class Study(Recipe):
    out: str = arg("runs/study", "results folder; a stage whose output is there is skipped, so a rerun resumes")
    task_sizes: list[int] = arg([320, 320, 256, 256], "rows of the task's SFT, preference, PPO and question files; "
                                "even questions are the dev half that picks each method's β, odd ones the test half")
    betas: list[float] = arg([0.01, 0.05, 0.2], "the fixed β of the runs (App. A.3: 0.01 for SALSA, 0.2 for PPO)")
    seeds: list[int] = arg([1, 2], "PPO seeds; one seed gives both methods the same prompts and first rollouts")
    boot: int = arg(2000, "bootstrap resamples (over questions and seeds) of every interval")
    judge: str = arg("py:salsa:gold_score", "the py:module:function judge that scores every answer and rollout "
                                            "(an API judge is refused)")
    ablations: list[str] = arg([], "extra runs at --ablation-beta: mkl (eq. 5), soup3 (SALSA against a 3-SFT soup), "
                                   "alpha0.25 and alpha0.75 (Fig. 4a); the grid already holds gibberish and kl-hack")
    ablation_beta: float = arg(0.2, "the fixed β of the --ablations runs, for every seed (pick it on the grid's "
                                    "dev half: the committed study's picked 0.05 for PPO and 0.2 for SALSA, and ran its "
                                    "ablations at 0.2)")


def differ(was: list[str], now: list[str]) -> str:
    """The flags two command lines give differently, as '--lr 1e-05 (now 0.003)'."""
    def values(cmd):
        out, key = {}, ""
        for c in cmd:
            key = c if c.startswith("--") else key
            out.setdefault(key, []).extend([] if c == key else [c])
        return out
    def show(v: list | None) -> str:
        return "unset" if v is None else " ".join(v) or "set"
    was, now = values(was), values(now)
    return ", ".join(f"{k or 'script'} {show(was.get(k))} (now {show(now.get(k))})"
                     for k in dict.fromkeys([*was, *now]) if was.get(k) != now.get(k))


def recipe(a: Recipe):
    """SFT x2 seeds -> soup (alpha 0.5) -> reward model -> PPO (β 0.2) and SALSA (β 0.01) from the same
    SFT model -> answers to held-out questions -> win rates, scores, Fig. 2's alpha line, Fig. 3's
    histograms -> OUT/results.md. A Study (`python salsa.py study`) is the same stages with a grid of
    runs: {PPO, SALSA} x fixed β x seed, scored by the gold judge -> OUT/report.md (write_study)."""
    R, here, study = Path(a.out), Path(__file__).resolve().parent, isinstance(a, Study)
    if study and not a.judge.startswith("py:"):
        raise InputError(f"--judge {a.judge}: the study scores every answer and rollout with a py:module:function judge")
    extra = {"gibberish": ("ppo-beta0.01", ["--ref", "sft", "--init-kl-coef", 0.01]),
             "kl-hack": ("salsa-beta0.2", ["--ref", "soup", "--soup", R / "soup", "--init-kl-coef", 0.2]),
             "mkl": ("mkl", ["--ref", "mkl", "--soup-models", R / "sft-seed1", R / "sft-seed2", "--init-kl-coef", 0.2]),
             "soup3": ("salsa-soup3", ["--ref", "soup", "--soup", R / "soup3", "--init-kl-coef", 0.01]),
             **{f"alpha{x:g}": (f"salsa-alpha{x:g}", ["--ref", "soup", "--soup-models", R / "sft-seed1", R / "sft-seed2",
                                                      "--alpha", x, "--init-kl-coef", 0.01]) for x in (0.25, 0.75)}}
    if study and a.ablations and a.ablation_beta not in a.betas:  # each ablation is compared with SALSA at its β
        raise InputError(f"--ablation-beta {a.ablation_beta:g}: give one of --betas {' '.join(f'{b:g}' for b in a.betas)}")
    # gibberish and kl-hack are PPO at β 0.01 and SALSA at β 0.2: a study would run them at --ablation-beta, under
    # a name that says otherwise (ppo-beta0.01-beta0.2), while its grid already has every method at every β
    if study and (grid_runs := [x for x in a.ablations if x in ("gibberish", "kl-hack")]):
        raise InputError(f"--ablations {' '.join(grid_runs)}: in a study these are runs of the grid (PPO at β "
                         "0.01, SALSA at β 0.2): give those β in --betas")
    if a.questions:  # read now, not after every stage has run
        load_questions(a.questions, QUESTIONS_SPLIT)
    if set(a.ablations) - set(extra):
        raise InputError(f"--ablations {' '.join(a.ablations)}: expected some of {', '.join(extra)}")
    R.mkdir(parents=True, exist_ok=True)
    times_file = R / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    made_file = R / "stages.json"  # each finished stage's script, flags and order: what a skip may report
    made = {n: m if isinstance(m, dict) else {"flags": m, "done": 0}  # files before the order was kept
            for n, m in (json.loads(made_file.read_text()) if made_file.exists() else {}).items()}
    py, launch = [sys.executable], shlex.split(a.launcher) or [sys.executable]
    script = {s: os.path.relpath(here / f"{s}.py") for s in ("salsa", "sft", "soup", "reward", "ppo", "eval")}
    paths = {}  # stage -> what it leaves: its out, or the answers file of an answer stage

    def stage(name: str, out: Path | None, cmd: list, launcher=py, leaves: Path | None = None):
        """Run one stage as a subprocess, printed first so it can be copied; skipped when `out` exists.
        Once `out` exists, the stage's resumable checkpoints `out.ckpt/step-N` are deleted (its metrics
        and samples there stay): they serve only --resume of an unfinished run, and each holds a model
        and its optimizer (a PPO one, policy and critic: ~3.3 GB at 135M, two kept per run), which a
        study's 20 runs would pile up. A stage whose `out` was made with other flags (stages.json) is
        refused, not skipped: its numbers would be reported under this run's flags. A stage made before
        a stage it reads (a path among its flags) was redone is deleted and redone, as make would: the
        soup of two new SFT models, the answers of a new PPO model."""
        flags = [Path(str(cmd[0])).name, *map(str, cmd[1:])]  # what makes `out`: the script and flags, not the launcher
        cmd = [str(c) for c in [*launcher, *cmd]]
        leaves = out or leaves
        reads = [n for n, p in paths.items() if n != name and any(Path(c) == p or p in Path(c).parents for c in cmd)]
        if leaves:
            paths[name] = leaves
        mine = made.get(name)
        if mine and leaves and leaves.exists() and (newer := [n for n in reads if made[n]["done"] > mine["done"]]):
            print(f"[{name}] redone: {', '.join(newer)} finished after it")
            shutil.rmtree(leaves) if leaves.is_dir() else leaves.unlink()
            shutil.rmtree(f"{leaves}.ckpt", ignore_errors=True)  # its resumable state and logs are of the old run
        if out and out.exists():
            # a stage from before stages.json is taken as it is
            if (was := made.setdefault(name, {"flags": flags, "done": 0})["flags"]) != flags:
                raise InputError(f"[{name}] {out} was made with {differ(was, flags)}: delete it to redo it with "
                                 "these flags, or choose another --out")
            print(f"[{name}] skipped: {out} exists")
        else:
            print(f"\n[{name}] $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
            start = time.time()
            if subprocess.run(cmd).returncode:
                sys.exit(f"[{name}] failed (its error is above); finished stages are kept, rerun to resume")
            times[name] = round(time.time() - start, 1)
            made[name] = {"flags": flags, "done": 1 + max((m["done"] for m in made.values()), default=0)}
            times_file.write_text(json.dumps(times, indent=1))
            made_file.write_text(json.dumps(made, indent=1))
        if out:
            for done in checkpoints(f"{out}.ckpt"):
                shutil.rmtree(done)
    task = R / "data"
    if not (a.sft_data and a.prefs_data and a.prompts and a.questions):
        stage("task", task, [script["salsa"], "task", "--out", task, "--task-seed", a.task_seed,
                             "--task-sizes", *a.task_sizes])
    sft_data, prefs, prompts, questions = (given or str(task / f) for given, f in [
        (a.sft_data, "sft.jsonl"), (a.prefs_data, "prefs.jsonl"), (a.prompts, "ppo.jsonl"), (a.questions, "eval.jsonl")])
    seeds = [1, 2, 3] if "soup3" in a.ablations else [1, 2]
    sft = {s: R / f"sft-seed{s}" for s in seeds}
    for s in seeds:  # the SFT models differ only by their data-order seed (App. A.1)
        stage(f"sft-seed{s}", sft[s], [script["sft"], "--model", a.model, "--data", sft_data, "--seed", s,
                                       "--max-steps", a.sft_steps, "--lr", a.sft_lr, "--max-len", a.max_len,
                                       "--eval-every", 0, "--resume", "--out", sft[s]], launch)
    stage("soup", R / "soup", [script["soup"], "--models", sft[1], sft[2], "--alpha", 0.5, "--out", R / "soup"])
    if "soup3" in a.ablations:
        stage("soup3", R / "soup3", [script["soup"], "--models", *sft.values(), "--out", R / "soup3"])
    stage("reward", R / "rm", [script["reward"], "--model", sft[1], "--data", prefs, "--max-steps", a.rm_steps,
                               "--lr", a.rm_lr, "--max-len", a.max_len, "--norm-samples", a.norm_samples,
                               "--norm-max-new-tokens", a.max_new_tokens, "--resume", "--out", R / "rm"], launch)
    runs = {"ppo": ["--ref", "sft", "--init-kl-coef", 0.2],  # App. A.3's β for PPO and for SALSA
            "salsa": ["--ref", "soup", "--soup", R / "soup", "--init-kl-coef", 0.01],
            **dict(extra[x] for x in a.ablations)}
    if study:  # the two methods differ only by the reference; β fixed (no controller), gold logged on rollouts
        grid = [(m, b) for m in ("ppo", "salsa") for b in a.betas] + [(x, a.ablation_beta) for x in a.ablations]
        named = {m: (m, runs[m]) for m in ("ppo", "salsa")} | extra  # method or ablation -> (run name, flags)
        runs = {f"{named[m][0]}-beta{b:g}-seed{s}": [*named[m][1][:-2], "--init-kl-coef", b, "--no-adaptive-kl",
                                                     "--seed", s, "--gold", a.judge] for m, b in grid for s in a.seeds}
    for name, flags in runs.items():  # every run starts from the same SFT model and sees the same prompts
        stage(name, R / name, [script["ppo"], *flags, "--model", sft[1], "--reward", R / "rm", "--data", prompts,
                               "--steps", a.ppo_steps, "--lr", a.ppo_lr, "--max-new-tokens", a.max_new_tokens,
                               "--micro-batch", a.ppo_micro_batch,
                               "--save-every", 5, "--sample-every", 5, "--resume", "--out", R / name], launch)
    models = {"sft": sft[1], **({"sft-seed2": sft[2], "soup": R / "soup"} if study else {}), **{n: R / n for n in runs}}
    answers = {n: R / "answers" / f"{n}.jsonl" for n in models}
    for n, path in models.items():  # no out: eval.py answer resumes by itself, and is quick once done
        stage(f"answer {n}", None, [script["eval"], "answer", "--model", path, "--model-id", n, "--questions",
                                    questions, "--max-new-tokens", a.max_new_tokens, "--batch-size", 32,
                                    "--out", answers[n]], leaves=answers[n])  # 64 questions: 27 s at 32 rows, 39 s at 8, the same answers
    order = list(models) if study else ["salsa", "ppo", "sft", *list(runs)[2:]]
    res = R / "results"
    api = ["--judge-url", a.judge_url, "--judge-model", a.judge_model, "--cache", res / "judge_cache.jsonl"]
    if not study:  # the study compares gold scores question by question (write_study), not pairwise verdicts
        stage("judge", None, [script["eval"], "judge", "--judge", a.judge, "--questions", questions, "--dataset",
                              Path(questions).stem, "--answers", *[answers[n] for n in order], "--out", res / "wins",
                              *(api if a.judge == "api" else [])])
    stage("alpha-line", res / "alpha_line", [script["eval"], "alpha-line", "--models", sft[1], sft[2], "--reward",
                                             R / "rm", "--questions", questions, "--limit", a.alpha_limit,
                                             "--alphas", *a.alphas, "--max-new-tokens", a.max_new_tokens,
                                             *(["--judge", a.judge] if a.judge.startswith("py:") else []),
                                             "--out", res / "alpha_line"])
    # no out: a rerun with more --ablations must score their answers too (it takes seconds)
    stage("reward-hist", None, [script["eval"], "reward-hist", "--answers", *[answers[n] for n in order],
                                "--reward", R / "rm", "--questions", questions, "--out", res / "reward_hist"])
    if study:
        return write_study(a, R, list(runs), questions, answers)
    write_results(a, R, order, questions, answers, times)


def write_results(a: Recipe, R: Path, order: list[str], questions: str, answers: dict, times: dict):
    """OUT/results.md: win rates laid out as the paper's Tables 2-4, per-model numbers, Figs. 2 and 3, stage times."""
    import csv
    wins = {(r["model"], r["opponent"]): r for r in csv.DictReader(open(R / "results" / "wins.csv"))}
    pairs = [("salsa", "ppo"), ("salsa", "sft"), ("ppo", "sft")] + [p for n in order[3:] for p in ((n, "sft"),
                                                                                                    ("salsa", n))]
    lines = [f"# SALSA recipe: {a.model}, judged by {a.judge}", "",
             f"Questions: `{questions}`. One seed; every number below is from this run. Flags: `{a}`.", "",
             "## Win rates (Table 1 layout)", "",
             "| Comparison | Win | Loss | Tie | Win rate | Adj. win rate | Adj. 95% CI |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} vs {o} | {r['win']} | {r['loss']} | {r['tie']} | {float(r['win_rate']):.1f} | "
              f"{float(r['adj_win_rate']):.1f} | [{float(r['ci_low']):.1f}, {float(r['ci_high']):.1f}] |"
              for m, o in pairs if (r := wins.get((m, o)))]
    qs = load_questions(questions, QUESTIONS_SPLIT)
    gold = py_function(a.judge[3:]) if a.judge.startswith("py:") else None
    rewards = {}
    for r in csv.DictReader(open(R / "results" / "reward_hist" / "reward_hist.csv")):
        rewards.setdefault(r["model"], []).append(float(r["reward"]))
    lines += ["", "## Per model", "", "Gold score, reward and words: greedy answers to the held-out questions. "
              "Training columns: PPO's rollouts, mean of the last 5 steps (KL in nats per response).", "",
              "| Model | Gold score | Reward (RM) | Answer words | Training score | KL to reference | "
              "Response tokens |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n in order:
        ans = {str(r["question_id"]): r["choices"][0]["turns"] for r in read_jsonl(answers[n])}
        texts = [(q["turns"][0], ans[str(q["id"])][0]) for q in qs]
        g = f"{sum(float(gold(q, y)) for q, y in texts) / len(texts):.3f}" if gold else "-"
        last = read_jsonl(R / f"{n}.ckpt" / "metrics.jsonl")[-5:] if n != "sft" else []
        train = [f"{sum(m[k] for m in last) / len(last):.2f}" if last else "-"
                 for k in ("objective/score", "objective/kl", "objective/response_len")]
        lines.append(f"| {n} | {g} | {sum(rewards[n]) / len(rewards[n]):.3f} | "
                     f"{sum(len(y.split()) for _, y in texts) / len(texts):.1f} | {' | '.join(train)} |")
    if gold:  # for scale: what an answer with no content scores
        floor = sum(float(gold(q["turns"][0], NO_CONTENT)) for q in qs) / len(qs)
        lines.append(f"| the answer {NO_CONTENT!r}, for scale | {floor:.3f} | - | 1.0 | - | - | - |")
    lines += ["", "## Reward and gold score along the line between the two SFT models (Fig. 2a/b)", "",
              "| α | Reward (RM) | Gold score |", "|---:|---:|---:|"]
    for r in csv.DictReader(open(R / "results" / "alpha_line" / "alpha_line.csv")):
        g = f"{float(r['mean_gold']):.3f}" if "mean_gold" in r else "-"
        lines.append(f"| {float(r['alpha']):.2f} | {float(r['mean_reward']):.3f} ± {float(r['stderr']):.3f} | {g} |")
    lines += ["", "![alpha line](results/alpha_line/alpha_line.png)", "", "## Reward distributions (Fig. 3)", "",
              "![reward histograms](results/reward_hist/reward_hist.png)", "", "## Stage wall times", "",
              "| Stage | Seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    Path(R, "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(pairs) + 8]) + f"\n...\nwrote {R / 'results.md'}")


def bootstrap(x: torch.Tensor, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of x (S seeds, Q questions) and its 95% interval, resampling seeds and questions alike."""
    g = torch.Generator().manual_seed(seed)
    si, qi = torch.randint(x.shape[0], (n, x.shape[0]), generator=g), torch.randint(x.shape[1], (n, x.shape[1]), generator=g)
    means = x.double()[si[:, :, None], qi[:, None, :]].mean((1, 2))  # (n,)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return x.double().mean().item(), lo, hi


def rank_agreement(gold: torch.Tensor, rm: torch.Tensor) -> tuple[float, int]:
    """Of the pairs of answers to one question (gold, rm: models x questions) that the gold judge ranks apart,
    the share the reward model ranks the same way (a reward tie counts half), and how many such pairs."""
    i, j = torch.triu_indices(len(gold), len(gold), 1)
    d_gold, d_rm = gold[i] - gold[j], rm[i] - rm[j]  # (model pairs, questions)
    agree = (d_gold.sign() == d_rm.sign()).double() + 0.5 * (d_rm == 0).double()
    return agree[d_gold != 0].mean().item(), int((d_gold != 0).sum())


def write_study(a: Study, R: Path, runs: list[str], questions: str, answers: dict):
    """OUT/report.md and its PNGs, from what the stages wrote: answer files, reward_hist.csv, metrics.jsonl."""
    import csv
    gold = py_function(a.judge[3:])
    qs = [(str(q["id"]), q["turns"][0]) for q in load_questions(questions, QUESTIONS_SPLIT)]
    halves = {"dev": [q for i, q in enumerate(qs) if i % 2 == 0], "test": [q for i, q in enumerate(qs) if i % 2]}
    rm = {(r["model"], r["question_id"]): float(r["reward"])  # first turns: the task's questions have one
          for r in csv.DictReader(open(R / "results" / "reward_hist" / "reward_hist.csv")) if r["turn"] == "1"}
    text = {n: {str(r["question_id"]): r["choices"][0]["turns"][0] for r in read_jsonl(p)} for n, p in answers.items()}
    score = {"gold": lambda n, q, p: float(gold(p, text[n][q])), "rm": lambda n, q, p: rm[n, q]}
    per_q = lambda what, names, half: torch.tensor([[score[what](n, q, p) for q, p in halves[half]] for n in names],
                                                   dtype=torch.float64)  # float32 would print 0 as -1e-10
    logs = {n: read_jsonl(R / f"{n}.ckpt" / "metrics.jsonl") for n in runs}
    last = lambda n, k: sum(m.get(k, float("nan")) for m in logs[n][-5:]) / len(logs[n][-5:])
    methods = dict.fromkeys(["ppo", "salsa"] + [n.rsplit("-beta", 1)[0] for n in runs])  # the grid's, then ablations
    grid = {(m, b): [f"{m}-beta{b:g}-seed{s}" for s in a.seeds] for m in methods for b in sorted({*a.betas, a.ablation_beta})
            if f"{m}-beta{b:g}-seed{a.seeds[0]}" in runs}
    best = {m: max(a.betas, key=lambda b: per_q("gold", grid[m, b], "dev").mean().item()) for m in ("ppo", "salsa")}
    fmt = lambda t: f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"
    lines = [f"# SALSA against PPO: {a.model}, {len(a.seeds)} seeds x β {a.betas}, judged by {a.judge}", "",
             f"Questions: `{questions}`, {len(halves['dev'])} dev (even rows: pick each method's β) and "
             f"{len(halves['test'])} test (odd rows: report it). Intervals: 95%, bootstrap over questions and seeds "
             f"({a.boot} resamples). Flags: `{a}`.", "", "## Primary comparison: best-β SALSA against best-β PPO (test half)", ""]
    ppo_g, salsa_g = per_q("gold", grid["ppo", best["ppo"]], "test"), per_q("gold", grid["salsa", best["salsa"]], "test")
    wins = (salsa_g > ppo_g).double() + 0.5 * (salsa_g == ppo_g).double()  # (seeds, questions): the same seed pairs
    lines += [f"β chosen on dev: PPO {best['ppo']:g}, SALSA {best['salsa']:g}.", "",
              f"- Gold score difference, SALSA − PPO: {fmt(bootstrap(salsa_g - ppo_g, a.boot))}",
              f"- Adjusted win rate of SALSA over PPO (gold; a tie counts half), %: "
              f"{fmt(tuple(100 * v for v in bootstrap(wins, a.boot)))}: SALSA scores higher on "
              f"{int((salsa_g > ppo_g).sum())}, PPO on {int((salsa_g < ppo_g).sum())} and both the same on "
              f"{int((salsa_g == ppo_g).sum())} of the {salsa_g.numel()} (question, seed) pairs", "",
              "## Every (method, β), test half", "", "| Method | β | Gold (dev) | Gold, test [95% CI] | Reward (RM) | "
              "KL to init | KL to reference | Answer words | No-EOS rate | Explained var. |", "|---|---:|" + "---:|" * 8]
    for (m, b), names in grid.items():
        words = sum(len(text[n][q].split()) for n in names for q, _ in halves["test"]) / len(names) / len(halves["test"])
        train = [sum(last(n, k) for n in names) / len(names) for k in
                 ("objective/kl_init", "objective/kl", "objective/no_eos_frac", "val/explained_var")]
        lines.append(f"| {m} | {b:g} | {per_q('gold', names, 'dev').mean():.3f} | "
                     f"{fmt(bootstrap(per_q('gold', names, 'test'), a.boot))} | {per_q('rm', names, 'test').mean():.3f} | "
                     f"{train[0]:.2f} | {train[1]:.2f} | {words:.1f} | {train[2]:.2f} | {train[3]:.2f} |")
    ablations = [(m, b) for m, b in grid if m not in ("ppo", "salsa") and ("salsa", b) in grid]
    if ablations:
        lines += ["", "Ablations (runs other than ppo and salsa) against SALSA at their β, the same seeds (test half):", ""]
    for m, b in ablations:
        diff = per_q("gold", grid[m, b], "test") - per_q("gold", grid["salsa", b], "test")  # (seeds, questions)
        lines.append(f"- gold, {m} − salsa at β {b:g}: {fmt(bootstrap(diff, a.boot))}")
    floor = sum(float(gold(p, NO_CONTENT)) for _, p in halves["test"]) / len(halves["test"])
    lines += ["", f"For scale, the gold score of the answer {NO_CONTENT!r} (test half): {floor:.3f}; the SFT model's: "
              f"{per_q('gold', ['sft'], 'test').mean():.3f}. The judge counts the constraints an answer does not break.",
              "", "KL columns: nats per response, the last 5 training steps. No-EOS rate and explained variance: PPO's "
              "rollouts, the last 5 steps.", "", "## The premise: the soup against its two SFT models (all questions)", ""]
    every_q = lambda what, names: torch.cat([per_q(what, names, h) for h in ("dev", "test")], 1)
    for what in ("gold", "rm"):
        lines += [f"- {what}, soup − {n}: {fmt(bootstrap(every_q(what, ['soup']) - every_q(what, [n]), a.boot))}"
                  for n in ("sft", "sft-seed2")]
    lines += ["", "The reward model against the gold judge (all questions; pairs of greedy answers to one question; "
              "a reward-model tie counts half):", ""]
    for label, names in (("SFT answers (sft, sft-seed2)", ["sft", "sft-seed2"]), ("policy answers (every run)", runs)):
        share, pairs = rank_agreement(every_q("gold", names), every_q("rm", names))
        lines.append(f"- {label}: it orders {100 * share:.1f}% of the {pairs} pairs the gold judge tells apart as the judge does")
    lines += ["", "Along the α line (eval.py alpha-line, its own questions):", "", "| α | Reward (RM) | Gold |", "|---:|---:|---:|"]
    lines += [f"| {float(r['alpha']):.2f} | {float(r['mean_reward']):.3f} ± {float(r['stderr']):.3f} | "
              f"{float(r['mean_gold']):.3f} |" for r in csv.DictReader(open(R / "results" / "alpha_line" / "alpha_line.csv"))]
    for n in (grid["ppo", min(a.betas)][0], grid["salsa", max(a.betas)][0]):  # App. A.4's failure modes, if any
        lines += ["", f"Last sampled rollouts of {n} (App. A.4: gibberish at a small β? the KL-hack at a large one?):", ""]
        lines += [f"- {r['score']:+.2f} `{r['response'][:160]!r}`" for r in read_jsonl(R / f"{n}.ckpt" / "samples.jsonl")[-2:]]

    def frontier(plt):
        for i, (what, key) in enumerate((("gold", "objective/gold"), ("rm", "objective/score"))):
            plt.subplot(1, 2, i + 1)
            for m, color in (("ppo", "tab:blue"), ("salsa", "tab:orange")):
                steps = [r for b in a.betas for n in grid[m, b] for r in logs[n]]
                plt.scatter([max(r["objective/kl_init"], 0) ** 0.5 for r in steps], [r[key] for r in steps], s=4,
                            color=color, alpha=0.3)
                # a k1 mean can be below 0 (a policy that barely moved): its square root would be complex
                xs = [max(sum(last(n, "objective/kl_init") for n in grid[m, b]) / len(a.seeds), 0) ** 0.5 for b in a.betas]
                plt.plot(xs, [per_q(what, grid[m, b], "test").mean().item() for b in a.betas], "o-", color=color,
                         label=f"{m}: greedy answers, one point per β")
            plt.xlabel("√KL(π‖π_init), nats (dots: rollouts of every training step)")
            plt.ylabel({"gold": "gold score", "rm": "reward model (dots: PPO's score, after the missing-EOS penalty)"}[what])
            plt.legend(fontsize=7)
        plt.gcf().set_size_inches(11, 4)

    def curves(plt):
        keys = ["objective/score", "objective/gold", "objective/kl_init", "objective/response_len", "objective/entropy"]
        for i, k in enumerate(keys):
            plt.subplot(1, len(keys), i + 1)
            for n in runs:
                plt.plot([r["step"] for r in logs[n]], [r[k] for r in logs[n]], lw=0.8, alpha=0.7,
                         color={"ppo": "tab:blue", "salsa": "tab:orange"}.get(n.rsplit("-beta", 1)[0], "tab:gray"))
            plt.title(k.split("/")[1], fontsize=9)
            plt.xlabel("step")
        plt.gcf().set_size_inches(16, 3.2)
    plot(R / "frontier.png", frontier)
    plot(R / "curves.png", curves)
    lines += ["", "## Frontier (Gao et al. 2022) and training curves (blue PPO, orange SALSA, grey ablations)", "", "![frontier](frontier.png)",
              "", "![training curves](curves.png)"]
    Path(R, "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]) + f"\n...\nwrote {R / 'report.md'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert-gguf"] and len(sys.argv) == 4:
        convert_gguf(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["task"]:
        run(lambda t: make_task(t.out, *t.task_sizes, seed=t.task_seed), Recipe, sys.argv[2:])
    elif sys.argv[1:2] == ["study"]:
        run(recipe, Study, sys.argv[2:])
    else:
        run(recipe, Recipe, sys.argv[1:])
