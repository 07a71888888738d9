"""requirements.txt names every third-party module the repo imports, and the core four carry floors
(which .ci/run installs exactly in a second venv)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow"}  # import name -> the name pip knows it by, where they differ


def requirements():
    """{normalised name: specifier ('' when unpinned)} of requirements.txt."""
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
            found[name.lower().replace("_", "-")] = spec
    return found


def third_party_imports():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    # the repo's own: its modules (tests import each other's helpers), its packages (tiny, tools), and a
    # root file not yet added
    local = {Path(f).stem for f in files} | {Path(f).parts[0] for f in files if "/" in f} | {p.stem for p in REPO.glob("*.py")}
    found = {}
    for f in files:
        for node in ast.walk(ast.parse((REPO / f).read_text())):  # also imports inside functions
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, f)
    return found


def test_every_third_party_import_is_a_requirement():
    listed = requirements()
    missing = {m: f for m, f in third_party_imports().items()
               if DISTRIBUTION.get(m, m).lower().replace("_", "-") not in listed}
    assert missing == {}, f"imported (module: first file) but not in requirements.txt: {missing}"


def test_the_core_libraries_have_floors():
    listed = requirements()
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert re.fullmatch(r">=\d+(\.\d+)*", listed.get(name, "")), f"{name}: {listed.get(name)!r}"
