#!/usr/bin/env bash
# The paper's comparison on the tiny world, from the shipped base, in one command:
#
#     bash reproduce_tiny.sh [RUNS_DIR]          # default runs/tiny
#
# teachers (count, text, clean) -> GRPO-Mix -> merge and SFT cold starts -> OPD -> eval.py on all,
# then curves.py: every task's test score against training step for the teachers, GRPO-Mix and OPD.
# Interrupt it at any point and run it again: a finished stage (its final/ exists) is skipped and
# an unfinished one resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
R=${1:-runs/tiny}
mkdir -p "$R"
start=$SECONDS
# SMOKE=1 cuts every stage to one step on a few images (tests/test_reproduce.py runs it so)
GRPO=() SFT=() OPD=() EVAL=()
if [ "${SMOKE:-0}" = 1 ]; then
    GRPO=(--max_steps 1 --eval_every 1 --eval_prompts 1 --prompts_per_step 2 --group_size 2 --batch_size 4)
    SFT=(--samples_per_task 4 --max_steps 1 --batch_size 4 --probe_samples 4)
    OPD=(--max_steps 1 --eval_every 1 --eval_prompts 1 --prompts_per_step 2 --group_size 2 --batch_size 4)
    EVAL=(--num_prompts 2)
fi

stage() {  # stage OUT SCRIPT ARGS...: run SCRIPT --preset tiny ARGS --out OUT unless OUT/final exists
    local out=$1 script=$2
    shift 2
    if [ -e "$out/final" ]; then echo "== $out: done, skipped"; return; fi
    echo "== $out: python $script --preset tiny $* --out $out"
    local t=$SECONDS
    python "$script" --preset tiny "$@" --out "$out" --resume 2>&1 | tee -a "$out.log" || true
    [ -e "$out/final" ] || { echo "stage $out failed, see $out.log"; exit 1; }
    echo "== $out: $((SECONDS - t)) s" | tee -a "$R/times.txt"
}

for task in count text clean; do
    stage "$R/$task" teacher_grpo.py --reward "$task" "${GRPO[@]}"
done
stage "$R/mix" teacher_grpo.py --tasks count,text --shared_reward clean:0.2 "${GRPO[@]}"
T="count=$R/count/final text=$R/text/final"
stage "$R/merge" merge_coldstart.py --teachers $T --method exact
stage "$R/sft" merge_coldstart.py --teachers $T --method sft "${SFT[@]}"
stage "$R/opd" opd_distill.py --teachers $T --anchor "$R/clean/final" --init "$R/merge/final" "${OPD[@]}"
stage "$R/opd_nomar" opd_distill.py --teachers $T --anchor "$R/clean/final" --init "$R/merge/final" --beta_mar 0 "${OPD[@]}"
stage "$R/opd_sft" opd_distill.py --teachers $T --anchor "$R/clean/final" --init "$R/sft/final" "${OPD[@]}"

python eval.py --preset tiny --ckpt base --ckpt "count=$R/count/final" --ckpt "text=$R/text/final" \
    --ckpt "clean=$R/clean/final" --ckpt "grpo_mix=$R/mix/final" --ckpt "merge=$R/merge/final" \
    --ckpt "sft=$R/sft/final" --ckpt "opd=$R/opd/final" --ckpt "opd_no_mar=$R/opd_nomar/final" \
    --ckpt "opd_from_sft=$R/opd_sft/final" --out "$R/eval" "${EVAL[@]}"
python curves.py count="$R/count" text="$R/text" clean="$R/clean" grpo_mix="$R/mix" opd="$R/opd" \
    --out "$R/curves.png"
echo "total: $((SECONDS - start)) s (this invocation; per-stage times in $R/times.txt)"
