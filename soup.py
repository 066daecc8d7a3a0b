"""Model soup, SALSA eq. 3: theta_soup = sum_i w_i theta_i over SFT models fine-tuned from one base.

    python soup.py --models out/sft-s1 out/sft-s2 --out out/soup                 # alpha = 0.5, the paper's best
    python soup.py --models out/sft-s1 out/sft-s2 --alpha 0.3 --out out/soup-a3  # (1-alpha) theta_ref + alpha theta_other
    python soup.py --models A B C --out out/soup3                                # uniform, SALSA-3 (Fig. 5)
    python soup.py --models A B C --greedy --eval-data heldout.jsonl --out out/soup-greedy

No torchrun form: a soup is one pass over the weights, bound by the disk. Each tensor is read in chunks
of rows from every ingredient's (sharded) safetensors and written straight into the output shard, so
memory stays at a few chunks whatever the model size; config and tokenizer come from the first model.
`soup_state_dicts` and `load_soup` do the same arithmetic in memory (ppo.py, eval.py's alpha line and plane).
The greedy soup (Wortsman et al. 2022) is ours: the paper uses the uniform one.
"""
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import salsa

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Elements per chunk: 4 MB in fp32 stays in cache through the cast, multiply and add; 2**22 made the
# 1.5B benchmark (README) 30% slower, from page faults on the larger buffers.
CHUNK = 2**20
# Copied verbatim from the first model: re-saving a tokenizer through transformers can rewrite it (a
# Qwen2 config turns a generic tokenizer.json into Qwen2's normaliser and pre-tokenizer).
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "chat_template.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class Args:
    models: list[str] = salsa.arg([], "ingredient model directories, fine-tuned from one base; the first is theta_ref (eq. 3)")
    out: str = salsa.arg("", "output model directory; must not exist")
    alpha: float | None = salsa.arg(None, "two models: (1-alpha) theta_ref + alpha theta_other; "
                                          "unset = uniform = 0.5, the paper's best (Fig. 2a/b)")
    weights: list[float] = salsa.arg([], "explicit weights, one per model, summing to 1")
    extrapolate: bool = salsa.arg(False, "allow weights outside [0, 1] (the plane of Fig. 2c extends past the triangle)")
    greedy: bool = salsa.arg(False, "greedy soup (Wortsman et al. 2022) scored by held-out SFT loss on --eval-data")
    eval_data: str = salsa.arg("", "greedy: held-out chat rows with `messages` (.json/.jsonl/.parquet or hub name)")
    eval_split: str = salsa.arg("test_sft", "greedy: dataset split of a hub --eval-data (UltraChat-200k's held-out one)")
    eval_rows: int = salsa.arg(256, "greedy: number of held-out rows scored", low=1)
    max_len: int = salsa.arg(2048, "greedy: max tokens per row (paper App. A.1)", low=1)
    batch_size: int = salsa.arg(8, "greedy: rows per forward (paper App. A.1)", low=1)
    shard_size: int = salsa.arg(2000, "largest output shard in MB; more shards get model.safetensors.index.json", low=1)


# ---------------------------------------------------------------- ingredients
def read_layout(path: str) -> dict[str, tuple[str, str, list[int]]]:
    """{tensor: (file, safetensors dtype, shape)} of an HF model directory, one file or sharded; refused,
    naming the file, with no config.json, truncated weights, or no model.safetensors (a soup reads safetensors
    only, whatever --allow-pickle its caller was given: a pickle must be converted)."""
    from safetensors import safe_open
    salsa.check_model_dir(path, allow_pickle=True)  # a pickle is never loaded here: refused below, with what to do
    index = Path(path, "model.safetensors.index.json")
    if not index.exists() and not Path(path, "model.safetensors").exists():
        raise salsa.InputError(f"{path}: no model.safetensors, and a soup reads safetensors only: load the model "
                               "with transformers and save_pretrained it (safetensors by default)")
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    layout = {}
    for file in [str(Path(path, name)) for name in names]:
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                part = fh.get_slice(key)
                if part.get_dtype() not in DTYPES:
                    raise salsa.InputError(f"{file}: tensor {key} has dtype {part.get_dtype()}, which soup.py cannot read")
                layout[key] = (file, part.get_dtype(), part.get_shape())
    return layout


def read_tensor(file: str, key: str, rows: slice | None = None) -> torch.Tensor:
    """A tensor, or a range of its rows, copied out of the file. The file is mapped only for the call:
    a mapping kept open would keep every page read so far resident."""
    from safetensors import safe_open
    with safe_open(file, "pt") as fh:
        return fh.get_tensor(key) if rows is None else fh.get_slice(key)[rows]


def check_same(specs: list[dict], names: list[str]):
    """Raise, naming the model and the tensor, unless each spec {tensor: (dtype, shape, value or None if float)}
    has the first one's tensors, dtypes, shapes and non-float values (those are copied, not averaged)."""
    for spec, name in zip(specs[1:], names[1:]):
        for key in sorted(specs[0].keys() ^ spec.keys()):
            has, lacks = (names[0], name) if key in specs[0] else (name, names[0])
            raise salsa.InputError(f"{lacks}: tensor {key} is missing ({has} has it): soup models of one architecture")
        for key, (dtype, shape, value) in specs[0].items():
            for what, mine, theirs in (("shape", spec[key][1], shape), ("dtype", spec[key][0], dtype)):
                if mine != theirs:
                    raise salsa.InputError(f"{name}: tensor {key} has {what} {mine}, {names[0]} has {theirs}: "
                                     "soup models fine-tuned from one base, saved in one dtype")
            if value is not None and not torch.equal(value, spec[key][2]):
                raise salsa.InputError(f"{name}: buffer {key} differs from {names[0]}'s; non-float tensors are copied, "
                                 "not averaged")


def check_ingredients(paths: list[str]) -> list[dict]:
    """The layouts of all ingredients, after refusing any whose tensors, vocabularies or non-float
    buffers differ from the first's. Reads only headers, configs, tokenizers and buffers."""
    layouts = [read_layout(p) for p in paths]
    check_same([{k: (dtype, shape, None if DTYPES[dtype].is_floating_point else read_tensor(file, k))
                 for k, (file, dtype, shape) in layout.items()} for layout in layouts], paths)
    check_configs(paths)
    salsa.check_vocabularies(paths)
    return layouts


# what may differ between fine-tunes of one base: where it came from, who saved it, the KV-cache switch;
# the dtype is checked tensor by tensor
FREE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


def check_configs(paths: list[str]):
    """Refuse ingredients whose config.json differ in what the model computes: the soup is written, or
    loaded, with the first's config, so two bases of one shape (Mistral-7B v0.1 and v0.2: RoPE θ 1e4 and
    1e6) would average into a model that runs neither's maths."""
    configs = [json.loads(Path(p, "config.json").read_text()) for p in paths]
    for path, config in zip(paths[1:], configs[1:]):
        for key in sorted((configs[0].keys() | config.keys()) - FREE_CONFIG_KEYS):
            if configs[0].get(key) != config.get(key):
                raise salsa.InputError(f"{path}: config.json has {key} {config.get(key)!r}, {paths[0]} has "
                                       f"{configs[0].get(key)!r}: soup models fine-tuned from one base")


def soup_weights(args: Args) -> list[float]:
    """alpha (eq. 3), explicit weights, or uniform (SALSA-n); refused unless they sum to 1."""
    n, alpha = len(args.models), args.alpha is not None
    if n < 2 or len({os.path.realpath(p) for p in args.models}) < n:
        raise salsa.InputError(f"--models {' '.join(args.models)}: give at least two different models (a soup of one is a copy)")
    if alpha + bool(args.weights) + args.greedy > 1 or (alpha and n != 2) or len(args.weights) not in (0, n):
        raise salsa.InputError("give at most one of --alpha (two models), --weights (one per model), --greedy")
    weights = [1 - args.alpha, args.alpha] if alpha else list(args.weights) or [1 / n] * n
    if not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise salsa.InputError(f"weights {weights} must be finite and sum to 1 (a soup is a weighted average)")
    if not args.extrapolate and not all(0 <= w <= 1 for w in weights):
        raise salsa.InputError(f"weights {weights} leave [0, 1]: pass --extrapolate to go outside the simplex")
    return weights


# ---------------------------------------------------------------- arithmetic
def average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i t_i accumulated in fp32 in ingredient order, returned in the inputs' dtype.

    Multiply, round, then add, like the obvious `(1-a)*x.float() + a*y.float()`, which this equals bit
    for bit. mergekit's linear merge (merge_methods/linear.py) computes `(w * stack(t)).sum(0) / sum(w)` in
    the dtype of the tensors it is given: for an fp32 pair the same bits as ours, for a bf16 pair every
    product and the sum rounded to bf16, where ours rounds once, at the end."""
    acc = weights[0] * tensors[0].float()
    for w, t in zip(weights[1:], tensors[1:]):
        acc += w * t.float()
    return acc.to(tensors[0].dtype)


def soup_state_dicts(state_dicts: list[dict], weights: list[float]) -> dict:
    """In-memory soup, same arithmetic as the streamed one. Any finite weights are accepted (eval.py's
    reward plane goes outside the triangle); non-float tensors must be equal and are copied."""
    if len(state_dicts) != len(weights) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"need one finite weight per state dict, got {weights} for {len(state_dicts)}")
    check_same([{k: (t.dtype, list(t.shape), None if t.is_floating_point() else t) for k, t in sd.items()}
                for sd in state_dicts], [f"state dict {i}" for i in range(len(state_dicts))])
    return {key: average([sd[key] for sd in state_dicts], weights) if t.is_floating_point() else t.clone()
            for key, t in state_dicts[0].items()}


def read_states(paths: list[str]) -> list[dict]:
    """The state dicts of checked ingredients (check_ingredients; no NaN or inf), read whole."""
    states = [{k: read_tensor(f, k) for k, (f, _, _) in layout.items()} for layout in check_ingredients(paths)]
    for path, state in zip(paths, states):
        salsa.check_finite(state, path)
    return states


def load_soup(paths: list[str], weights: list[float], tok=None, dtype: str = "float32", device="cpu"):
    """The soup of `paths` as a model, without writing it: loads the first with salsa.load_model and
    replaces its weights by the soup (computed in the files' dtype, as soup.py would write it)."""
    soup = soup_state_dicts(read_states(paths), weights)
    model = salsa.load_model(paths[0], tok, dtype=dtype, device=device)
    missing, unexpected = model.load_state_dict(soup, strict=False)
    params = model.state_dict()
    if unexpected or {params[k].data_ptr() for k in missing} - {params[k].data_ptr() for k in soup}:  # tied: fine
        raise salsa.InputError(f"{paths[0]}: soup tensors do not match the model: missing {missing}, unexpected {unexpected}")
    return model


# ---------------------------------------------------------------- streaming
def nbytes(spec: tuple) -> int:
    return math.prod(spec[2]) * DTYPES[spec[1]].itemsize  # spec: (file, dtype, shape)


def write_shard(file: str, keys: list[str], layouts: list[dict], weights: list[float], bar):
    """One safetensors file (an 8-byte little-endian header length, the JSON header, the tensors' bytes) written as the soup is computed: save_file would need the
    whole shard in memory. The header, its JSON padded to 8 bytes, is known from the inputs' headers."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        _, dtype, shape = layouts[0][key]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes(layouts[0][key])]}
        offset += nbytes(layouts[0][key])
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            _, dtype, shape = layouts[0][key]
            step = max(1, CHUNK // max(1, math.prod(shape[1:])))  # whole rows per chunk
            for rows in [slice(a, a + step) for a in range(0, shape[0], step)] if shape else [None]:
                parts = [read_tensor(layout[key][0], key, rows) for layout in layouts]
                chunk = average(parts, weights) if DTYPES[dtype].is_floating_point else parts[0]  # buffers: checked equal
                if not torch.isfinite(chunk).all():  # a NaN soup must not reach the disk: name the ingredient
                    for layout, part in zip(layouts, parts):
                        salsa.check_finite({key: part}, layout[key][0])
                fh.write(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
            bar.update()


def stream_soup(paths: list[str], weights: list[float], out: str, shard_size: int = 2 * 10**9):
    """Write the soup of `paths` to `out` (atomically): shards, index, config and tokenizer of paths[0]."""
    if Path(out).exists():
        raise salsa.InputError(f"{out} already exists: choose another --out or delete it")
    layouts = check_ingredients(paths)
    keys, shards = sorted(layouts[0]), [[]]
    for key in keys:
        if shards[-1] and sum(nbytes(layouts[0][k]) for k in shards[-1] + [key]) > shard_size:
            shards.append([])
        shards[-1].append(key)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def write(tmp):
        with tqdm(total=len(keys), desc="soup", unit="tensor") as bar:
            for name, shard in zip(names, shards):
                write_shard(os.path.join(tmp, name), shard, layouts, weights, bar)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes(spec) for spec in layouts[0].values())},
                     "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
            Path(tmp, "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in COPIED:
            if Path(paths[0], name).exists():
                shutil.copy(Path(paths[0], name), tmp)
        Path(tmp, "soup.json").write_text(json.dumps({"models": paths, "weights": weights}, indent=1))
    salsa.save_atomic(out, write)


# ---------------------------------------------------------------- greedy soup
def heldout(tok, source: str, split: str, rows: int, max_len: int) -> list:
    """(ids, labels) of the first `rows` held-out chat rows, read, filtered and tokenized exactly as sft.py
    does: rows writing a special token as text and rows whose answer starts beyond max_len are dropped."""
    from sft import read_chats, tokenize
    chats = read_chats(source, split)[:rows]
    special = salsa.rows_with_special_text(tok, chats, "held-out rows", salsa.Dist())
    examples, too_long = tokenize(tok, [c for c in chats if c[0] not in special], max_len, show=False)
    if not examples:
        raise salsa.InputError(f"{source}: no row with an assistant token within --max-len {max_len}")
    print(f"greedy: scored on {len(examples)} rows of {source}"
          + (f" ({len(too_long)} with no answer within --max-len {max_len}: {salsa.rows_note(too_long)})" if too_long else ""))
    return examples


def greedy_soup(paths: list[str], score) -> list[int]:
    """Indices of the ingredients kept, best first: sort by score(paths, weights) (lower is better),
    then add each to the uniform soup only if the soup's score improves."""
    alone = [score([p], [1.0]) for p in tqdm(paths, desc="greedy: ingredients")]
    order = sorted(range(len(paths)), key=alone.__getitem__)
    kept, best = order[:1], alone[order[0]]
    for i in tqdm(order[1:], desc="greedy: soups"):
        trial = kept + [i]
        s = score([paths[j] for j in trial], [1 / len(trial)] * len(trial))
        print(f"greedy: {paths[i]} alone {alone[i]:.4f}, soup with it {s:.4f} vs {best:.4f}: {'keep' if s < best else 'drop'}")
        if s < best:
            kept, best = trial, s
    return kept


def main(args: Args):
    if not args.out or Path(args.out).exists():  # checked before the greedy search too
        raise salsa.InputError(f"--out {args.out!r}: give a directory that does not exist yet")
    for stale in Path(args.out).parent.glob(f".{Path(args.out).name}.tmp*"):  # a killed run's half-written soup
        shutil.rmtree(stale, ignore_errors=True)
    weights, paths = soup_weights(args), args.models
    if args.greedy:
        if not args.eval_data:
            raise salsa.InputError("--greedy scores the ingredients on --eval-data: give a held-out chat file")
        tok = salsa.load_tokenizer(paths[0])
        from sft import eval_loss  # held-out SFT loss per assistant token, as sft.py logs it
        examples = heldout(tok, args.eval_data, args.eval_split, args.eval_rows, args.max_len)
        kept = greedy_soup(paths, lambda ps, ws: eval_loss(load_soup(ps, ws, tok), examples, args.batch_size,
                                                           tok.pad_token_id, salsa.Dist()))
        paths, weights = [paths[i] for i in kept], [1 / len(kept)] * len(kept)
    print("soup = " + " + ".join(f"{w:g} * {p}" for w, p in zip(weights, paths)))
    # Averaging cache-sized chunks is bound by memory, not arithmetic: a second thread gains nothing, and
    # on a busy machine its OpenMP spin-waits made the 1.5B soup 2-3x slower.
    torch.set_num_threads(1)
    stream_soup(paths, weights, args.out, args.shard_size * 10**6)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    salsa.run(main, Args)
