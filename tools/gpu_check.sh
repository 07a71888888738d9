#!/usr/bin/env bash
# What a GPU machine should confirm, in one offline call of about 10 minutes:
#
#     bash tools/gpu_check.sh [OUT]            # default runs/gpu_check
#
# 1. env.txt: torch, the device, the library versions.
# 2. tests.txt: the test suite with the GPU visible. Every stage a test runs through its main()
#    picks the GPU and bf16 wherever the test does not pin the CPU, so this is the CUDA + bf16 path
#    of every stage on tiny models (and on the SD3.5-M-shaped miniature, tests/test_sd35_shape.py).
# 3. bench_sd35.txt: tools/bench.py on a random pipeline of SD3.5-M's real size (sd35_miniature's
#    full=True: its transformer and VAE, one-layer text encoders of its widths): the GPU memory
#    held with 1, 2 and 3 LoRA teachers and with one full-weight teacher; then OPD against GRPO at
#    512 px, 256 T5 tokens, micro-batch 8: each iteration's time, the share inside the
#    transformer, the peak GPU memory, and the ratio OPD/GRPO.
# 4. memory_sd35.txt: one OPD step at the default --batch_size on a real-size random SD3.5-M,
#    with and without --gradient_checkpointing: each run's start-up estimate (estimate.py, printed
#    on CUDA) beside the allocator's peak (max_memory_allocated). OPD only, to stay near 10 minutes:
#    GRPO's update and SFT's step are the same student forward and backward; MEMORY_STAGES="opd grpo"
#    adds GRPO's rollout and decode.
#
# A machine without the internet needs the packages its image lacks as wheels in .whl/ (git-ignored;
# this script installs them). On a machine with pip, for Python 3.12 on x86-64:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#         diffusers==0.42.1 importlib_metadata rapidfuzz rapidocr==3.10.0 colorlog omegaconf pyclipper shapely
# (wandb is not among them: the one test that logs to W&B is left out here.)
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the stages and runs/ are there
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$SECONDS

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import diffusers, peft, torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, {name}; diffusers {diffusers.__version__}, transformers "
      f"{transformers.__version__}, peft {peft.__version__}")
EOF

# TESTS, SLOW_TESTS and BENCH_MODEL/BENCH_RES/BENCH_T5 cut the check short (tests/test_bench.py does, on a CPU)
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-270}" "$PY" -m pytest -q -rf -p no:cacheprovider ${TESTS:-tests/} \
    --deselect tests/test_teacher_grpo.py::test_resume_continues_with_identical_state 2>&1 \
    | tail -60 | tee "$OUT/tests.txt"
# and the slow end-to-end runs of every stage on the SD3.5-M miniature (SLOW_TESTS="" skips them)
SLOW_TESTS=${SLOW_TESTS-tests/test_sd35_shape.py}
if [ -n "$SLOW_TESTS" ]; then
    timeout "${SLOW_TIMEOUT:-100}" "$PY" -m pytest -q -rf -p no:cacheprovider -m slow $SLOW_TESTS 2>&1 \
        | tail -30 | tee -a "$OUT/tests.txt"
fi
echo "== tests: $((SECONDS - start)) s" | tee -a "$OUT/tests.txt"

t=$SECONDS
timeout "${BENCH_TIMEOUT:-200}" "$PY" -m tools.bench --only memory --only opd --model "${BENCH_MODEL:-sd35-full}" \
    --resolution "${BENCH_RES:-512}" --t5_tokens "${BENCH_T5:-256}" --micro_batch 8 --train_steps 3 2>&1 | grep -v "it/s" | tail -24 | tee "$OUT/bench_sd35.txt"
echo "== bench: $((SECONDS - t)) s; total $((SECONDS - start)) s" | tee -a "$OUT/bench_sd35.txt"

# 4. the memory estimate against the allocator, at the default batch (MEMORY_MODEL=sd35-mini cuts it short)
t=$SECONDS
timeout "${MEMORY_TIMEOUT:-300}" "$PY" - "$OUT" "${MEMORY_MODEL:-sd35-full}" ${MEMORY_STAGES:-opd} <<'EOF' 2>&1 \
    | grep -E "^(==|estimated peak|measured|error)" | tee "$OUT/memory_sd35.txt"
import subprocess, sys
from pathlib import Path
out, which, stages = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
model = out / which
if not (model / "model_index.json").exists():
    from tools.sd35_miniature import build_sd35_miniature
    build_sd35_miniature(model, full=which == "sd35-full")
small = [] if which == "sd35-full" else ["--resolution", "64", "--t5_tokens", "8", "--num_steps", "2"]
(out / "prompts.txt").write_text("a red dog\na blue cat\n")
runs = {"opd": ["opd_distill.py", "--teachers", "ocr=base", "geneval=base", "--prompts_per_step", "1",
                "--group_size", "8"],
        "grpo": ["teacher_grpo.py", "--reward", "brightness", "--prompts", str(out / "prompts.txt"),
                 "--prompts_per_step", "1", "--group_size", "8", "--updates_per_step", "1"]}
# each run in its own process, its peak read by the allocator once its main() has returned
measure = ("import runpy, sys, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
           "print('measured peak', f'{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' "
           "if torch.cuda.is_available() else 'n/a (no CUDA)')")
for stage in stages:
    args = runs[stage]
    for ckpt in ("false", "true"):
        print(f"== {stage}, default --batch_size, gradient checkpointing {ckpt}", flush=True)
        cmd = [sys.executable, "-c", measure, *args, "--model", str(model), "--max_steps", "1", "--eval_every", "0",
               "--gradient_checkpointing", ckpt, "--out", str(out / f"memory_{stage}_{ckpt}"), *small]
        subprocess.run(cmd)
EOF
echo "== memory: $((SECONDS - t)) s; total $((SECONDS - start)) s" | tee -a "$OUT/memory_sd35.txt"
