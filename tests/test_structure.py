"""The layout rule: a stage script reads on its own; shared maths lives in the shared modules."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain_tiny", "teacher_grpo", "merge_coldstart", "sft_coldstart", "opd_distill", "eval"]


def imported_modules(name):
    tree = ast.parse((REPO / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # also imports inside functions
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_no_stage_script_imports_another_stage():
    assert {s: imported_modules(s) & set(STAGES) for s in STAGES} == {s: set() for s in STAGES}
    # the control: a tool built on a stage (the GRPO signal probe) is seen importing it
    assert "teacher_grpo" in imported_modules("grpo_snr")
