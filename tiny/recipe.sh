#!/usr/bin/env bash
# Why the old tiny OPD recipe added nothing, one cause at a time: OPD runs from the shipped merge
# and teachers (assets/tiny), each changing one thing, then eval.py at 4 images per prompt on all
# of them beside the merge init and the teachers (with each run's paired change against the merge,
# --vs merge), and the MAR trade-off plot.
#
#     bash tiny/recipe.sh [RUNS_DIR]                # default runs/recipe; run it again to resume
#     SMOKE=1 bash tiny/recipe.sh /tmp/recipe       # every run cut to one step (tests/test_reproduce.py)
#     PYTHON=.venv/bin/python bash tiny/recipe.sh   # without activating the venv
#     ASSETS=old/assets/tiny bash tiny/recipe.sh    # another set of teachers, merge and clean teacher
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the stages and runs/ are there
R=${1:-runs/recipe}
PY=${PYTHON:-python}
A=${ASSETS:-assets/tiny}
mkdir -p "$R"
# the anchor KL on every image and 60 steps, as docs/recipe.md measured (the preset now: 1 in 2, 20 steps)
OPD=(--mar_every 1 --max_steps 60) EVAL=()
if [ "${SMOKE:-0}" = 1 ]; then
    OPD+=(--max_steps 1 --prompts_per_step 2 --group_size 2 --batch_size 4)
    EVAL=(--num_prompts 2)
fi
T2="count=$A/count text=$A/text"
CKPTS=()
run() {  # run NAME ARGS...: the preset from $A's merge with ARGS (each names its --teachers from $A), into $R/NAME unless done
    local name=$1
    shift
    CKPTS+=(--ckpt "$name=$R/$name/final")
    if [ -e "$R/$name/final" ]; then echo "== $name: done, skipped"; return; fi
    echo "== $name: python opd_distill.py --preset tiny $*"
    local t=$SECONDS
    "$PY" opd_distill.py --preset tiny --init "$A/merge" "$@" --eval_every 0 --out "$R/$name" --resume "${OPD[@]}" > "$R/$name.log" 2>&1 \
        || { echo "$name failed, see $R/$name.log"; exit 1; }
    echo "== $name: $((SECONDS - t)) s" | tee -a "$R/times.txt"
}
# the first preset: the authors' flowgrpo weighting, count and text prompts only, the clean teacher as MAR anchor
run old --teachers $T2 --kl_weighting flowgrpo --anchor $A/clean --beta_mar 0.04
# one change at a time
run velocity --teachers $T2 --anchor $A/clean --beta_mar 0.04
run velocity_anchor_base --teachers $T2 --beta_mar 0.04
run velocity_clean_teacher --teachers $T2 clean=$A/clean --anchor $A/clean --beta_mar 0.04
# the second preset: clean prompts held at the base (clean=base), MAR 0.04; then with a lower learning rate
run clean_base --teachers $T2 clean=base --beta_mar 0.04
run clean_base_lr3e-4 --teachers $T2 clean=base --beta_mar 0.04 --lr 3e-4
# clean prompts held at the init (the merge), alone and with the init as MAR anchor
run clean_at_init --teachers $T2 clean=$A/merge --beta_mar 0.04
run anchor_init --teachers $T2 clean=$A/merge --anchor $A/merge --beta_mar 0.2
# the preset: velocity weighting, count and text prompts, the base as MAR anchor at beta_mar 0.5; the sweep
run preset --teachers $T2
for b in 0 0.2 1; do run "preset_mar$b" --teachers $T2 --beta_mar "$b"; done
run fresh --teachers $T2 --init ""
"$PY" eval.py --preset tiny --ckpt merge=$A/merge --ckpt count=$A/count --ckpt text=$A/text "${CKPTS[@]}" \
    --vs merge --out "$R/eval" "${EVAL[@]}"
"$PY" -m tools.curves --results "$R/eval/results.json" --x count,text --y clean preset_mar0 velocity_anchor_base preset_mar0.2 preset preset_mar1 \
    --out "$R/mar_sweep.png"
