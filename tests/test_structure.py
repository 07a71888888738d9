"""The layout rules: the root holds the pipeline (the stages and the modules they share) and nothing
else but the docs, tests and assets; a stage reads on its own (it imports no other stage and no
tool); no module imports itself back through others (an import cycle)."""
import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["teacher_grpo", "merge_coldstart", "sft_coldstart", "opd_distill", "eval", "tiny.pretrain"]
SHARED = ["common", "scoring", "sde_sampler", "rewards", "lora", "prompts", "estimate"]
ROOT = {f"{m}.py" for m in STAGES + SHARED if "." not in m} | {
    "README.md", "requirements.txt", "pytest.ini", "tests", "docs", "assets", "tiny", "tools", ".ci", ".gitignore"}


def module_path(name):
    return REPO / (name.replace(".", "/") + ".py")


def repo_modules():
    """Every Python module of the repo outside tests/, by its import name (tools.bench, tiny.world)."""
    files = [*REPO.glob("*.py"), *REPO.glob("tiny/*.py"), *REPO.glob("tools/*.py")]
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imported_modules(source, known):
    """The repo modules that `source` imports, at the top or inside functions, as import names."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph(modules):
    return {name: imported_modules(path.read_text(), modules) - {name} for name, path in modules.items()}


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_root_holds_the_pipeline_and_nothing_else():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    top = {line.split("/")[0] for line in tracked.splitlines()}
    assert top == ROOT, f"unexpected at the root: {sorted(top - ROOT)}; missing: {sorted(ROOT - top)}"
    assert all(module_path(m).is_file() for m in STAGES + SHARED)


def test_no_stage_imports_another_stage_or_a_tool():
    graph = import_graph(repo_modules())
    tools = {m for m in graph if m.startswith("tools")}
    for module in STAGES + SHARED:
        assert not graph[module] & tools, f"{module} imports a tool: {sorted(graph[module] & tools)}"
    for stage in STAGES:
        assert not graph[stage] & set(STAGES), f"{stage} imports a stage: {sorted(graph[stage] & set(STAGES))}"
    # the controls: a tool built on a stage (the GRPO signal probe) is seen importing it, a lazy import too
    assert "teacher_grpo" in graph["tools.grpo_snr"] and "tiny.world" in graph["rewards"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph(repo_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the control: the old common <-> scoring pair (common.after_step imported scoring lazily) is caught
    old = {"common": {"scoring"}, "scoring": {"common", "rewards"}, "rewards": set()}
    assert find_cycle(old) == ["common", "scoring", "common"]
