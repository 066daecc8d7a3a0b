"""The commands the README and the scripts' docstrings show are commands the scripts accept: a flag that is
renamed or removed fails here, not in a reader's terminal. The docs are parsed, nothing is run."""
import ast
import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

import salsa

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["salsa", "sft", "soup", "reward", "ppo", "eval"]
# flags the README gives to other programs: the launcher, the test runner, the tool soup.py is timed against
OTHERS = {"--nproc_per_node": "torchrun", "--dist": "pytest", "--out-shard-size": "mergekit", "--help": "argparse",
          "--warmup": "farm-bench"}
COMMAND = re.compile(r"(?:python3?|torchrun(?: --nproc_per_node \d+)?) (salsa|sft|soup|reward|ppo|eval)\.py\b([^`]*)")


def docs() -> list[tuple[str, str]]:
    """(name, text) of the README and of each script's module docstring, continuation lines joined."""
    texts = [("README.md", (ROOT / "README.md").read_text())]
    texts += [(f"{s}.py", ast.get_docstring(ast.parse((ROOT / f"{s}.py").read_text()))) for s in SCRIPTS]
    return [(name, text.replace("\\\n", " ")) for name, text in texts]


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every documented `python X.py ...` or `torchrun ... X.py ...`. A command ends at
    a backtick, a comment, or three spaces before prose ("   ... plus", "   or   "); `...` after a flag stands
    for its value, anywhere else for flags left out."""
    found = []
    for name, text in docs():
        for i, line in enumerate(text.splitlines(), 1):
            for script, rest in COMMAND.findall(line):
                words = shlex.split(re.split(r" #|\s{3,}(?![\s-])", rest)[0])
                argv = [w for k, w in enumerate(words) if w != "..." or (k and words[k - 1].startswith("--"))]
                found.append((f"{name}:{i}", script, ["X" if w == "..." else w for w in argv]))
    return found


def parse(script: str, argv: list[str]):
    """What the script's `__main__` does with argv, up to the parsed flags."""
    if script == "salsa":
        kind = {"task": salsa.Recipe, "study": salsa.Study}.get(argv[0] if argv else "", salsa.Recipe)
        return salsa.parse_args(kind, argv[1:] if kind is salsa.Study or argv[:1] == ["task"] else argv)
    module = importlib.import_module(script)
    if script == "eval":
        assert argv and argv[0] in module.COMMANDS, f"eval.py needs a command first ({', '.join(module.COMMANDS)})"
        argv = argv[1:]
    return salsa.parse_args(module.Args, argv)


@pytest.mark.parametrize("where,script,argv", [pytest.param(*c, id=c[0]) for c in commands()
                                             if c[2][:1] != ["convert-gguf"]])  # its two paths are positional
def test_every_documented_command_parses(where, script, argv):
    try:
        parse(script, argv)
    except SystemExit as e:  # argparse printed why (an unknown flag, a bad value) to stderr; --help exits 0
        if e.code:
                pytest.fail(f"{where}: `{script}.py {shlex.join(argv)}` is refused by {script}.py's flags")


def test_the_docs_show_the_commands_they_are_read_for():
    """The parser above finds the commands: if a change of format hid them, the test before would pass on none."""
    where = {w.split(":")[0] for w, _, _ in commands()}
    assert where == {"README.md", *(f"{s}.py" for s in SCRIPTS)}
    shown = {(s, a[0] if s == "eval" else "") for _, s, a in commands()}
    assert {("sft", ""), ("soup", ""), ("reward", ""), ("ppo", ""), ("eval", "answer"), ("eval", "judge")} <= shown


def test_every_flag_the_readme_names_is_a_flag():
    """Every `--flag` in the README is one of a script's (or the GPU check's), or another program's (OTHERS)."""
    classes = [salsa.Recipe, salsa.Study] + [importlib.import_module(s).Args for s in SCRIPTS[1:]]
    fields = [f for c in classes for f in dataclasses.fields(c)]
    ours = {"--" + ("no-" if no else "") + f.name.replace("_", "-") for f in fields for no in (0, f.type in (bool, "bool"))}
    ours |= set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "tests" / "gpu_check.py").read_text()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", (ROOT / "README.md").read_text()))
    assert named - ours - set(OTHERS) == set()


def test_a_wrong_flag_is_caught():
    """The check above can fail: a documented command with a flag no script has is refused."""
    with pytest.raises(SystemExit):
        parse("ppo", ["--ref", "soup", "--soup-dir", "runs/soup"])
    with pytest.raises(SystemExit):
        parse("eval", ["answer", "--model", "runs/salsa", "--temperature", "x"])
    with pytest.raises(SystemExit):  # a flag renamed to a longer one: argparse's abbreviations would accept it
        parse("ppo", ["--ref", "soup", "--soup-model", "runs/sft-seed1"])
