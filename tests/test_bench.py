"""bench.py, cut short: it runs every part and its memory figures say what docs/benchmarks.md claims."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runs_all_parts_and_lora_teachers_cost_their_adapter():
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--repeats", "1", "--batch", "2", "--steps", "2",
                          "--train_steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert re.search(r"rollout / diffusers time ratio: median \d", text)
    assert re.search(r"ratio OPD/GRPO \d", text)
    # GRPO, OPD with the anchor KL on every image (--mar_every 1), OPD at the default, its CFG-free student
    assert len(re.findall(r"iteration [\d.]+s  inside the transformer \(forward \+ backward\) \d+%", text)) == 4
    assert re.search(r"CFG-free student .* CFG-free/guided OPD \d", text)
    adapter_kb = float(re.search(r"one LoRA adapter \(r=8\) is ([\d.]+) kB", text).group(1))
    added = [float(x) for x in re.findall(r"\+ \d LoRA teachers?\s+[\d,]+\s+([\d.]+) kB", text)]
    assert len(added) == 3 and all(0 < a < 2 * adapter_kb for a in added), (added, adapter_kb)
    full = float(re.search(r"\+ 1 full teacher\s+[\d,]+\s+([\d.]+) kB", text).group(1))
    assert full > 10 * adapter_kb  # the control: a model copy costs far more than an adapter


@pytest.mark.slow
def test_gpu_check_script_cut_short_on_the_cpu(tmp_path):
    """gpu_check.sh as a lent GPU machine runs it, cut to one test file and the SD3.5-shaped
    miniature (the real-size model needs the GPU): its three reports are written and say what
    they measure."""
    env = {**__import__("os").environ, "TESTS": "tests/test_sd35_shape.py -k structure", "SLOW_TESTS": "",
           "BENCH_MODEL": "sd35-mini", "BENCH_RES": "64", "BENCH_T5": "8", "MEMORY_MODEL": "sd35-mini",
           "PYTHON": sys.executable}
    out = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^torch \S+, (no CUDA device|.+); diffusers \S+, transformers \S+, peft \S+$",
                     (tmp_path / "env.txt").read_text().strip(), re.M)
    assert re.search(r"\b1 passed", (tmp_path / "tests.txt").read_text())
    bench = (tmp_path / "bench_sd35.txt").read_text()
    assert re.search(r"ratio OPD/GRPO \d", bench) and "sd35-mini" in bench
    # OPD at its default batch, with and without checkpointing: each run reached its peak reading
    memory = (tmp_path / "memory_sd35.txt").read_text()
    assert len(re.findall(r"^measured peak (n/a \(no CUDA\)|[\d.]+ GiB)$", memory, re.M)) == 2, memory
