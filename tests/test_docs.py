"""Every flag that the README, docs/ and the scripts' docstrings give a script is one that script
takes: a renamed or dropped flag fails here, not on a reader's machine. (The commands themselves
run, cut short, in each stage's tests.)"""
import ast
import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("", "tiny/", "tools/") for p in REPO.glob(f"{folder}*.py")
                 if p.name != "__init__.py")
FLAG = r"(?<![\w-])--[a-z][\w-]*"  # a long option as written in prose or a command
# flags of the launchers in front of our scripts, not of the scripts
LAUNCHER_FLAGS = {"--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--standalone"}


# Every plain-argparse script's --help, in one interpreter (one torch import, not one per script).
HELP_ALL = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv, text = [module, "--help"], io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_module(module, run_name="__main__")
        except SystemExit as e:
            assert not e.code, f"{module} --help exited with {e.code}"
    print(f"==== {module}\\n{text.getvalue()}")
"""


@functools.cache
def help_texts():
    """{script: its --help} for the scripts that parse their flags with argparse themselves (tools
    and the tiny world run as python -m tools.bench); a module that only mentions argparse prints none."""
    scripts = [s for s in SCRIPTS if "argparse" in (REPO / s).read_text()
               and "common.parse_config(DEFAULTS" not in (REPO / s).read_text()]
    modules = [s.removesuffix(".py").replace("/", ".") for s in scripts]
    out = subprocess.run([sys.executable, "-c", HELP_ALL, *modules], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"--help: {out.stderr[-800:]}"
    parts = dict(part.split("\n", 1) for part in out.stdout.split("==== ")[1:])
    return {s: parts[m] for s, m in zip(scripts, modules)}


@functools.cache
def script_flags(script):
    """The --flags a repo script accepts: its DEFAULTS (parse_config adds --preset and --resume), or
    what a plain argparse script's --help lists."""
    if "common.parse_config(DEFAULTS" in (REPO / script).read_text():
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        return {f"--{k}" for k in module.DEFAULTS} | {"--preset", "--resume"}
    return set(re.findall(FLAG, help_texts().get(script, "")))


def doc_texts():
    """(name, text): the README, docs/, and every script's docstring (its launch lines), with an
    `inline command` that wraps over lines joined into one line, as markdown shows it."""
    texts = [(doc.name, doc.read_text()) for doc in DOCS]
    texts += [(script, ast.get_docstring(ast.parse((REPO / script).read_text())) or "") for script in SCRIPTS]
    for name, text in texts:
        yield name, re.sub(r"`[^`]+`", lambda m: m.group(0).replace("\n", " "), text)


def command_problems(texts):
    """(problems, flags checked) for every `python X.py ...`, `python -m tools.X ...` or `torchrun ...
    X.py ...` line: each --flag after a repo script must be one that script takes."""
    problems, checked = [], 0
    for doc, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"(?:python|torchrun)\b[^`|#;&]*?(?:\b([\w/]+\.py)\b|-m ([\w.]+))([^`|#;&]*)", line):
                script = m.group(1) or m.group(2).replace(".", "/") + ".py"
                if not (REPO / script).is_file():
                    continue
                for token in shlex.split(m.group(3)):
                    flag = token.split("=")[0]
                    if re.fullmatch(FLAG, flag) and flag not in LAUNCHER_FLAGS:
                        checked += 1
                        if flag not in script_flags(script):
                            problems.append(f"{doc}: `{script} {flag}`: {script} takes no such flag")
    return problems, checked


def inline_problems(texts):
    """(problems, flags checked) for every --flag in `inline code`: some script must take it."""
    every = {"--help", *LAUNCHER_FLAGS}.union(*(script_flags(s) for s in SCRIPTS))
    problems, checked = [], 0
    for doc, text in texts:
        for code in re.findall(r"`([^`\n]+)`", text):
            for flag in re.findall(FLAG, code):
                checked += 1
                if flag not in every:
                    problems.append(f"{doc}: `{code}`: no script takes {flag}")
    return problems, checked


def test_doc_commands_use_flags_their_script_takes():
    problems, checked = command_problems(doc_texts())
    assert not problems, "\n".join(problems)
    assert checked > 100  # the commands were found (a broken pattern would pass vacuously)


def test_inline_flags_are_some_scripts_flags():
    problems, checked = inline_problems(doc_texts())
    assert not problems, "\n".join(problems)
    assert checked > 50


def test_a_stale_flag_is_caught():
    """The control: the same checks on a doc with a misspelt flag, in a command and inline."""
    stale = [("fake.md", "    python opd_distill.py --preset tiny \\\n        --mar_evry 2\n"
                         "and `--beta_mar 0.5` with `--kl_weigting velocity`")]
    assert command_problems(stale) == (["fake.md: `opd_distill.py --mar_evry`: opd_distill.py takes no such flag"], 2)
    assert inline_problems(stale) == (["fake.md: `--kl_weigting velocity`: no script takes --kl_weigting"], 2)
