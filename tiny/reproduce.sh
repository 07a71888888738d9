#!/usr/bin/env bash
# The paper's comparison on the tiny world, from the shipped base, in one command:
#
#     bash tiny/reproduce.sh [RUNS_DIR]          # default runs/tiny
#     SEEDS="0" bash tiny/reproduce.sh           # one seed of the key rows instead of three
#     PYTHON=.venv/bin/python bash tiny/reproduce.sh   # without activating the venv
#     JOBS=2 bash tiny/reproduce.sh              # two stages at a time, each on half the cores
#
# teachers (count, text, clean) -> merge and SFT cold starts -> GRPO-Mix, OPD from the merge and
# OPD from a fresh student (no cold start), once per seed -> the MAR sweep (beta_mar 0, 0.2, 1;
# 0.5 is the preset), OPD with the clean teacher as anchor, with --loss pg, from the SFT init ->
# eval.py on all (the seeded rows also as mean [min-max]; each row's paired change against the
# merge, --vs merge) -> tools/curves.py: every task's test score against training step for the
# teachers, GRPO-Mix and OPD, and the MAR trade-off (clean against the mean of count and text, one
# point per beta_mar).
# With JOBS=N, independent stages run N at a time (OMP_NUM_THREADS = cores / N each, logs in OUT.log
# only): on 2 cores, two 1-thread stages do about 15% more work per hour than one 2-thread stage,
# and the weights are the same (CPU results do not depend on the thread count here).
# Interrupt it at any point and run it again: a finished stage (its final/ exists) is skipped and
# an unfinished one resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the stages and runs/ are there
R=${1:-runs/tiny}
PY=${PYTHON:-python}  # the interpreter with this repo's requirements (the active venv's by default)
mkdir -p "$R"
start=$SECONDS
# SMOKE=1 cuts every stage to one step on a few images (tests/test_reproduce.py runs it so)
# OPD with the anchor KL on every image (--mar_every 1): docs/results.md's tables were measured so; the
# default since then labels the anchor on 1 image in 2 (opd_distill.py, mar_every); and 60 steps with an
# eval every 20, where the preset (the README's quickstart, from a fresh student) now runs 20
GRPO=() SFT=() OPD=(--mar_every 1 --max_steps 60 --eval_every 20 --save_every 20) EVAL=()
if [ "${SMOKE:-0}" = 1 ]; then
    GRPO=(--max_steps 1 --eval_every 1 --eval_prompts 1 --prompts_per_step 2 --group_size 2 --batch_size 4)
    SFT=(--samples_per_task 4 --max_steps 1 --batch_size 4 --probe_samples 4)
    OPD+=(--max_steps 1 --eval_every 1 --eval_prompts 1 --prompts_per_step 2 --group_size 2 --batch_size 4)
    EVAL=(--num_prompts 2)
fi
# rows that no curve plots skip their periodic evals (a third of an OPD run); eval.py scores them all
NOEVAL=(--eval_every 0)
JOBS=${JOBS:-1}
if [ "$JOBS" -gt 1 ]; then
    n=$(( $(nproc) / JOBS )); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n > 0 ? n : 1 ))}
fi

stage() {  # stage OUT SCRIPT ARGS...: run SCRIPT --preset tiny ARGS --out OUT unless OUT/final exists
    local out=$1 script=$2
    shift 2
    if [ -e "$out/final" ]; then echo "== $out: done, skipped"; return; fi
    echo "== $out: python $script --preset tiny $* --out $out"
    local t=$SECONDS
    if [ "$JOBS" -gt 1 ]; then
        "$PY" "$script" --preset tiny "$@" --out "$out" --resume >> "$out.log" 2>&1 || true
    else
        "$PY" "$script" --preset tiny "$@" --out "$out" --resume 2>&1 | tee -a "$out.log" || true
    fi
    [ -e "$out/final" ] || { echo "stage $out failed, see $out.log"; exit 1; }
    echo "== $out: $((SECONDS - t)) s" | tee -a "$R/times.txt"
}

PIDS=()
job() {  # job CMD ARGS...: CMD in the background once fewer than JOBS jobs run
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    "$@" &
    PIDS+=($!)
}
barrier() {  # wait for every job; stop if one failed (its log says why)
    for p in "${PIDS[@]}"; do wait "$p" || exit 1; done
    PIDS=()
}

# stage 1: the count and text teachers, then the clean teacher beside the cold starts (they need
# only count and text)
for task in count text; do
    job stage "$R/$task" teacher_grpo.py --reward "$task" "${GRPO[@]}"
done
barrier
T="count=$R/count/final text=$R/text/final"
coldstarts() {
    stage "$R/merge" merge_coldstart.py --teachers $T --method exact
    stage "$R/sft" sft_coldstart.py --teachers $T "${SFT[@]}"
}
job stage "$R/clean" teacher_grpo.py --reward clean "${GRPO[@]}"
CLEAN=${PIDS[-1]}
job coldstarts
wait "${PIDS[-1]}" || exit 1

# stage 2, N at a time, the key rows first: once per seed GRPO-Mix, OPD from the merge and OPD from
# a fresh student (no cold start); OPD as its preset (docs/recipe.md): count and text
# prompts, the base as MAR anchor at 0.5. Then the MAR sweep and the other variants.
S0=${SEEDS:-0}; S0=${S0%% *}
O="$T"
MIX=() MAIN=() FRESH=()
for seed in ${SEEDS:-0 1 2}; do
    CURVE=(); [ "$seed" = "$S0" ] || CURVE=("${NOEVAL[@]}")  # the curves plot the first seed
    job stage "$R/mix_s$seed" teacher_grpo.py --tasks count,text --shared_reward clean:0.2 --seed "$seed" \
        "${GRPO[@]}" "${CURVE[@]}"
    job stage "$R/opd_s$seed" opd_distill.py --teachers $O --init "$R/merge/final" --seed "$seed" "${OPD[@]}" "${CURVE[@]}"
    job stage "$R/opd_fresh_s$seed" opd_distill.py --teachers $O --init "" --seed "$seed" "${OPD[@]}" "${NOEVAL[@]}"
    MIX+=(--ckpt "grpo_mix@s$seed=$R/mix_s$seed/final")
    MAIN+=(--ckpt "opd@s$seed=$R/opd_s$seed/final") FRESH+=(--ckpt "opd_fresh@s$seed=$R/opd_fresh_s$seed/final")
done
SWEEP=()
for b in 0 0.2 1; do
    job stage "$R/opd_mar$b" opd_distill.py --teachers $O --init "$R/merge/final" --beta_mar "$b" "${OPD[@]}" "${NOEVAL[@]}"
    SWEEP+=(--ckpt "opd_mar$b=$R/opd_mar$b/final")
done
wait "$CLEAN" || exit 1  # its anchor is the clean teacher, which may still be training
job stage "$R/opd_anchor_clean" opd_distill.py --teachers $O --init "$R/merge/final" --anchor "$R/clean/final" \
    "${OPD[@]}" "${NOEVAL[@]}"
job stage "$R/opd_pg" opd_distill.py --teachers $O --init "$R/merge/final" --loss pg "${OPD[@]}" "${NOEVAL[@]}"
job stage "$R/opd_sft" opd_distill.py --teachers $O --init "$R/sft/final" "${OPD[@]}" "${NOEVAL[@]}"
barrier

# with JOBS > 1 the eval runs on JOBS ranks (the same numbers as one process; tests/test_eval.py)
RANKS=(); [ "$JOBS" -gt 1 ] && RANKS=(-m torch.distributed.run --standalone --nproc_per_node="$JOBS")
"$PY" "${RANKS[@]}" eval.py --preset tiny --ckpt base --ckpt "count=$R/count/final" --ckpt "text=$R/text/final" \
    --ckpt "clean=$R/clean/final" "${MIX[@]}" --ckpt "merge=$R/merge/final" --ckpt "sft=$R/sft/final" \
    "${MAIN[@]}" "${FRESH[@]}" "${SWEEP[@]}" --ckpt "opd_anchor_clean=$R/opd_anchor_clean/final" \
    --ckpt "opd_pg=$R/opd_pg/final" --ckpt "opd_from_sft=$R/opd_sft/final" --vs merge --out "$R/eval" \
    "${EVAL[@]}"
# a run copied in rather than trained here (the shipped teachers) has no metrics.jsonl: no line
CURVES=()
for run in count=count text=text clean=clean grpo_mix="mix_s$S0" opd="opd_s$S0"; do
    if [ -e "$R/${run#*=}/metrics.jsonl" ]; then CURVES+=("${run%%=*}=$R/${run#*=}")
    else echo "== curves.png: $R/${run#*=} has no metrics.jsonl (not trained here), left out"; fi
done
"$PY" -m tools.curves "${CURVES[@]}" --out "$R/curves.png"
"$PY" -m tools.curves --results "$R/eval/results.json" --x count,text --y clean opd_mar0 opd_mar0.2 "opd@s$S0" opd_mar1 \
    --out "$R/mar_sweep.png"
echo "total: $((SECONDS - start)) s this invocation; the stages in $R/times.txt add to" \
    "$(awk '{s += $(NF - 1)} END {print s + 0}' "$R/times.txt") s over every invocation"
