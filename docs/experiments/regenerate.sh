#!/usr/bin/env bash
# Regenerate every report under docs/experiments/ from the embedded model family.
# Needs the zoo built (`transplant zoo build`); about 5 to 10 minutes per setting on 2 CPU cores.
# The numbers are deterministic for a given zoo recipe, torch build and thread count (THREADS, default 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${TRANSPLANT:-.venv/bin/transplant}
KS=1,2,4,7,10,14,21,all         # all = the 28 compatible modules; 7 = a quarter of them
# the selectors and the lowrank unit, and the +x variants (also copy norms, embeddings, output head)
METHODS=lae,lae_tf,lae_kind,dw,dwx,taylor,swap,loo,greedy,greedy_keep,lowrank,lae+x,greedy+x,lowrank+x
# the literature's baselines (whole-layer swapping; TIES, DARE, grafting, Localize-and-Stitch units), run
# separately under baselines/ (lae, dw and random run in both: the same numbers, a consistency check)
BASELINES=layer,layer_ends,ties,dare,graft,stitch
COMMON=(--ks "$KS" --seeds 5 --selectors "$METHODS" --threads "${THREADS:-1}" --quiet)

"$T" experiment --target zoo:v2 --donor zoo:v1 --task zoo:add --max-new-tokens 2,8 "${COMMON[@]}" \
    --out docs/experiments/cross_generation
"$T" experiment --target zoo:base --donor zoo:tuned --task zoo:rev --max-new-tokens 4,8 "${COMMON[@]}" \
    --out docs/experiments/base_vs_tuned
"$T" experiment --target zoo:base --donor zoo:lora --task zoo:rev --max-new-tokens 4,8 "${COMMON[@]}" \
    --out docs/experiments/adapter
B=(--ks "$KS" --seeds 5 --selectors "$BASELINES" --threads "${THREADS:-1}" --quiet)
"$T" experiment --target zoo:v2 --donor zoo:v1 --task zoo:add --max-new-tokens 2,8 "${B[@]}" \
    --out docs/experiments/baselines/cross_generation
"$T" experiment --target zoo:base --donor zoo:tuned --task zoo:rev --max-new-tokens 4,8 "${B[@]}" \
    --out docs/experiments/baselines/base_vs_tuned
"$T" experiment --target zoo:base --donor zoo:lora --task zoo:rev --max-new-tokens 4,8 "${B[@]}" \
    --out docs/experiments/baselines/adapter
.venv/bin/python docs/experiments/summarize.py
