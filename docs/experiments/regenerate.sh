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
# training seeds: each setting's fine-tune trained again with seeds 101 and 102 (`transplant zoo variant`),
# the headline methods run on each (the zoo's own seed is the main run above)
Z=$("$T" zoo list --json | .venv/bin/python -c "import json, sys; print(json.load(sys.stdin)['root'])")
S=(--ks "$KS" --seeds 5 --selectors greedy,lowrank --threads "${THREADS:-1}" --quiet)
for seed in 101 102; do
    for stage in v2 tuned lora; do "$T" zoo variant "$stage" --seed "$seed" --quiet >/dev/null; done
    "$T" experiment --target "$Z/variants/v2-seed$seed" --donor zoo:v1 --task zoo:add --max-new-tokens 2,8 "${S[@]}" \
        --out "docs/experiments/seeds/cross_generation-seed$seed"
    "$T" experiment --target zoo:base --donor "$Z/variants/tuned-seed$seed" --task zoo:rev --max-new-tokens 4,8 \
        "${S[@]}" --out "docs/experiments/seeds/base_vs_tuned-seed$seed"
    "$T" experiment --target zoo:base --donor "$Z/variants/lora-seed$seed" --task zoo:rev --max-new-tokens 4,8 \
        "${S[@]}" --out "docs/experiments/seeds/adapter-seed$seed"
done
# depth: the cross-generation lineage on an 8-layer model (`transplant zoo deep`, about 15 to 25 minutes)
"$T" zoo deep --quiet >/dev/null
"$T" experiment --target "$Z/deep/v2" --donor "$Z/deep/v1" --task zoo:add --ks 1,2,4,7,14,28,42,all \
    --max-new-tokens 2,8 --seeds 5 --selectors taylor,swap,greedy,lowrank --threads "${THREADS:-1}" --quiet \
    --out docs/experiments/deep/cross_generation
# the guards compared (accuracy, answer likelihood, KL): about 10 to 20 minutes
.venv/bin/python -m transplant_core.experiment.guard --out docs/experiments/guard
.venv/bin/python docs/experiments/summarize.py
