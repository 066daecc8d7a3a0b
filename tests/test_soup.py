"""soup.py against a naive fp32 average, streamed vs in-memory, sharding, refusals, greedy, and the CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import salsa
import soup


def tensors(path) -> dict:
    """Every tensor of a model directory, read with plain safetensors.load_file."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def naive(paths, weights) -> dict:
    """sum_i w_i * theta_i.float(), in order, cast back: the obviously-correct soup."""
    states = [tensors(p) for p in paths]
    return {k: sum(w * sd[k].float() for w, sd in zip(weights, states)).to(t.dtype) for k, t in states[0].items()}


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps, across signs: sign-magnitude bit patterns mapped to one integer line."""
    def line(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -32768 - bits, bits)
    return (line(a) - line(b)).abs().max().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("ingredients")
    m = {f"f{s}": make_tiny(d / f"f{s}", tok, seed=s) for s in range(3)}
    m |= {f"b{s}": make_tiny(d / f"b{s}", tok, seed=s, dtype=torch.bfloat16) for s in range(2)}
    AutoModelForCausalLM.from_pretrained(m["f1"]).save_pretrained(d / "f1-sharded", max_shard_size="50KB")
    tok.save_pretrained(d / "f1-sharded")
    m["f1-sharded"] = str(d / "f1-sharded")
    return m


def stream(tmp_path, paths, weights, name="soup", **kw):
    soup.stream_soup(paths, weights, str(tmp_path / name), **kw)
    return str(tmp_path / name)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_two_fp32_models_equal_naive_average_bit_for_bit(tmp_path, models, alpha):
    out = stream(tmp_path, [models["f0"], models["f1"]], [1 - alpha, alpha])
    got, ref = tensors(out), naive([models["f0"], models["f1"]], [1 - alpha, alpha])
    a, b = tensors(models["f0"]), tensors(models["f1"])
    assert got.keys() == ref.keys() == a.keys()
    for k in got:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]), k
    if alpha in (0.0, 1.0):  # the ingredients come back exactly
        assert all(torch.equal(got[k], (a if alpha == 0 else b)[k]) for k in got)
    else:
        assert not torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_bf16_within_one_ulp_of_fp32_average(tmp_path, models):
    paths, w = [models["b0"], models["b1"]], [0.7, 0.3]
    got, ref = tensors(stream(tmp_path, paths, w)), naive(paths, w)
    for k in got:
        assert got[k].dtype == torch.bfloat16 and bf16_ulps(got[k], ref[k]) <= 1, k


def test_three_model_uniform_soup(tmp_path, models):
    paths = [models["f0"], models["f1"], models["f2"]]
    got, ref = tensors(stream(tmp_path, paths, [1 / 3] * 3)), naive(paths, [1 / 3] * 3)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("kind", ["f", "b"])
def test_streamed_and_in_memory_soups_agree(tmp_path, models, tok, kind):
    paths, w = [models[kind + "0"], models[kind + "1"]], [0.7, 0.3]
    out = stream(tmp_path, paths, w)
    got = tensors(out)
    in_memory = soup.soup_state_dicts([tensors(p) for p in paths], w)
    assert all(torch.equal(got[k], in_memory[k]) for k in got)
    loaded, streamed = soup.load_soup(paths, w, tok).state_dict(), salsa.load_model(out, tok).state_dict()
    assert loaded.keys() == streamed.keys() and all(torch.equal(loaded[k], streamed[k]) for k in loaded)


def test_soup_loads_with_transformers_and_gives_naive_logits(tmp_path, models):
    paths, w = [models["f0"], models["f1"]], [0.7, 0.3]
    out = stream(tmp_path, paths, w)
    ref = AutoModelForCausalLM.from_pretrained(models["f0"])
    missing, unexpected = ref.load_state_dict(naive(paths, w), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    ids = torch.tensor([[1, 5, 900, 42, 7, 3000]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, ref(ids).logits)


def test_sharded_input_and_output(tmp_path, models):
    sharded = Path(models["f1-sharded"])
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    plain = tensors(stream(tmp_path, [models["f0"], models["f1"]], [0.7, 0.3], "plain"))
    out = Path(stream(tmp_path, [models["f0"], str(sharded)], [0.7, 0.3], "sharded", shard_size=10**6))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    got = tensors(out)
    assert index["weight_map"].keys() == got.keys() == plain.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    model = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(model[k], plain[k]) for k in plain)


def with_tensors(src, dst, change):
    """A copy of model directory `src` whose tensors are `change(tensors)`."""
    shutil.copytree(src, dst)
    save_file(change(tensors(dst)), str(Path(dst, "model.safetensors")), metadata={"format": "pt"})
    return str(dst)


def test_non_float_buffers_are_copied_and_tied_head_not_duplicated(tmp_path, models, tok):
    big = 2**53 + 1  # not representable in fp32: averaging would change it
    buffers = {"model.step": torch.tensor([big, 3]), "model.flag": torch.tensor([True, False])}
    a = with_tensors(models["f0"], tmp_path / "a", lambda sd: sd | buffers)
    b = with_tensors(models["f1"], tmp_path / "b", lambda sd: sd | buffers)
    got = tensors(stream(tmp_path, [a, b], [0.7, 0.3]))
    assert got["model.step"].tolist() == [big, 3] and got["model.flag"].tolist() == [True, False]
    assert got.keys() == tensors(a).keys() and "lm_head.weight" not in got
    c = with_tensors(models["f1"], tmp_path / "c", lambda sd: sd | buffers | {"model.step": torch.tensor([big, 4])})
    with pytest.raises(ValueError, match="buffer model.step differs"):
        stream(tmp_path, [a, c], [0.5, 0.5], "refused")


def other_tokenizer(src, dst):
    """`src` with one extra token in its tokenizer: same shapes, different vocabulary."""
    shutil.copytree(src, dst)
    bigger = salsa.load_tokenizer(src)
    bigger.add_tokens(["<|extra|>"])
    bigger.save_pretrained(dst)
    return str(dst)


def other_config(src, dst, **changes):
    """`src` with its config.json changed, same tensors: another base of the same shape."""
    shutil.copytree(src, dst)
    path = Path(dst, "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(dst)


@pytest.mark.parametrize("case, message", [
    ("hidden", r"tensor model\.embed_tokens\.weight has shape \[49152, 64\], .* has \[49152, 32\]"),
    ("missing", r"tensor model\.norm\.weight is missing"),
    ("dtype", r"tensor model\.embed_tokens\.weight has dtype BF16, .* has F32"),
    ("vocab", r"its vocabulary \(config vocab_size or tokenizer tokens\) differs from"),
    ("config", r"config\.json has rms_norm_eps 0\.001, .* has 1e-06: soup models fine-tuned from one base"),
])
def test_mismatched_ingredients_are_refused_before_any_output(tmp_path, models, tok, case, message):
    other = {"hidden": lambda: make_tiny(tmp_path / "o", tok, seed=1, hidden=64),
             "missing": lambda: with_tensors(models["f1"], tmp_path / "o",
                                             lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"}),
             "dtype": lambda: models["b1"],
             "vocab": lambda: other_tokenizer(models["f1"], tmp_path / "o"),
             "config": lambda: other_config(models["f1"], tmp_path / "o", rms_norm_eps=1e-3)}[case]()
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        stream(tmp_path, [models["f0"], other], [0.5, 0.5])
    assert set(tmp_path.iterdir()) == before  # neither the soup nor its temp dir


def test_weights_are_checked(models):
    two = [models["f0"], models["f1"]]
    assert soup.soup_weights(soup.Args(models=two, out="x")) == [0.5, 0.5]
    assert soup.soup_weights(soup.Args(models=two, out="x", alpha=1.5, extrapolate=True)) == [-0.5, 1.5]
    for bad in [dict(models=two[:1]), dict(models=[two[0], two[0]]), dict(models=two, alpha=1.5),
                dict(models=two, weights=[0.5, 0.6]), dict(models=two, weights=[float("nan"), 0.5]),
                dict(models=two + [models["f2"]], alpha=0.5), dict(models=two, weights=[1.0]),
                dict(models=two, alpha=0.5, weights=[0.5, 0.5]), dict(models=two, greedy=True, alpha=0.5)]:
        with pytest.raises(ValueError):
            soup.soup_weights(soup.Args(out="x", **bad))


def test_non_finite_ingredient_is_refused_and_nothing_written(tmp_path, models, tok):
    """A NaN or inf weight (a diverged run) would give a NaN soup: refused, naming the file and tensor,
    by the streamed soup (nothing left on disk) and by the in-memory one ppo.py and eval.py use."""
    for bad in (float("nan"), float("inf")):
        broken = tmp_path / f"broken-{bad}"
        shutil.copytree(models["f1"], broken)
        w = load_file(broken / "model.safetensors")
        w["model.layers.1.mlp.up_proj.weight"][5, 7] = bad
        save_file(w, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(salsa.InputError, match=rf"broken-{bad}/model\.safetensors: tensor "
                                                   r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
            stream(tmp_path, [models["f0"], str(broken)], [0.5, 0.5])
        assert not (tmp_path / "soup").exists() and not list(tmp_path.glob(".soup*"))
        with pytest.raises(salsa.InputError, match=f"broken-{bad}: tensor model.layers.1.mlp.up_proj.weight"):
            soup.load_soup([models["f0"], str(broken)], [0.5, 0.5], tok)


def test_existing_output_is_refused(tmp_path, models):
    (tmp_path / "soup").mkdir()
    with pytest.raises(salsa.InputError, match="already exists"):
        stream(tmp_path, [models["f0"], models["f1"]], [0.5, 0.5])
    with pytest.raises(salsa.InputError, match="does not exist yet"):
        soup.main(soup.Args(models=[models["f0"], models["f1"]], out=str(tmp_path / "soup")))


def test_in_memory_soup_extrapolates(models):
    paths, w = [models["f0"], models["f1"], models["f2"]], [1.5, -0.75, 0.25]  # outside the triangle
    got = soup.soup_state_dicts([tensors(p) for p in paths], w)
    ref = naive(paths, w)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_greedy_keeps_a_helpful_ingredient_and_drops_a_harmful_one(models):
    a, b, c = models["f0"], models["f1"], models["f2"]
    states = {p: tensors(p) for p in (a, b, c)}
    target = soup.soup_state_dicts([states[a], states[b]], [0.5, 0.5])

    def distance_to_target(paths, weights):  # the (a+b)/2 soup is perfect; c alone or in the soup hurts
        s = soup.soup_state_dicts([states[p] for p in paths], weights)
        return sum(((s[k] - target[k]) ** 2).sum().item() for k in target)

    kept = soup.greedy_soup([c, a, b], distance_to_target)
    assert sorted(kept) == [1, 2]


def test_greedy_keeps_an_ingredient_only_if_the_score_strictly_improves():
    """Wortsman et al.'s released code keeps on strict improvement (their Algorithm 1 writes ≥): a tie drops it."""
    score = {("a",): 1.0, ("b",): 2.0, ("a", "b"): 1.0, ("c",): 3.0, ("a", "c"): 0.5}  # lower is better
    assert soup.greedy_soup(["a", "b"], lambda paths, weights: score[tuple(paths)]) == [0]
    assert soup.greedy_soup(["c", "a"], lambda paths, weights: score[tuple(paths)]) == [1, 0]  # best first, then c


def write_chat(path, n=3):
    rows = [{"messages": [{"role": "user", "content": f"Name a colour, number {i}."},
                          {"role": "assistant", "content": "Blue, like the sea." * (i + 1)}]} for i in range(n)]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_greedy_scores_with_the_sft_heldout_loss(tmp_path, models, tok, monkeypatch):
    import sft
    read, splits = salsa.read_rows, []  # the split a hub --eval-data is read from (it was always "train")
    monkeypatch.setattr(salsa, "read_rows", lambda source, split: splits.append(split) or read(source, split))
    args = salsa.parse_args(soup.Args, ["--models", "a", "b", "--greedy", "--eval-data", "x"])
    path = write_chat(tmp_path / "eval.jsonl")
    with open(path, "a") as fh:  # sft.py drops a row that writes a special token as text: so does the greedy score
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "a<|im_end|>b"}]}) + "\n")
    examples = soup.heldout(tok, path, args.eval_split, rows=4, max_len=256)
    assert splits == ["test_sft"] and len(examples) == 3
    model = salsa.load_model(models["f0"], tok)
    ids, mask, labels = sft.collate(examples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=salsa.position_ids(mask), labels=labels).loss
    assert sft.eval_loss(model, examples, 2, tok.pad_token_id, salsa.Dist()) == pytest.approx(ref.item(), rel=1e-5)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "soup.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_end_to_end(tmp_path, models):
    out = tmp_path / "soup"
    (tmp_path / ".soup.tmp999").mkdir()  # what save_atomic leaves when a run is killed mid-write
    r = run_cli("--models", models["f0"], models["f1"], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]
    assert json.loads((out / "soup.json").read_text())["weights"] == [0.5, 0.5]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # copied verbatim
        assert (out / name).read_bytes() == Path(models["f0"], name).read_bytes()
    ref = naive([models["f0"], models["f1"]], [0.5, 0.5])
    assert all(torch.equal(v, ref[k]) for k, v in tensors(out).items())
    r = run_cli("--models", models["f0"], models["f1"], "--alpha", "1.5", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "--extrapolate" in r.stderr and not (tmp_path / "x").exists()


def test_cli_greedy(tmp_path, models):
    out = tmp_path / "greedy"
    r = run_cli("--models", models["f0"], models["f1"], models["f2"], "--greedy",
                "--eval-data", write_chat(tmp_path / "eval.jsonl"), "--max-len", "128", "--out", str(out))
    assert r.returncode == 0, r.stderr
    made = json.loads((out / "soup.json").read_text())
    assert r.stdout.count(", soup with it ") == 2 and "greedy: scored on 3 rows of" in r.stdout and set(made["models"]) <= {models["f0"], models["f1"], models["f2"]}
    assert made["weights"] == [1 / len(made["models"])] * len(made["models"])
