#!/usr/bin/env bash
# The search-quality and estimator-fidelity claims again (on the composite task's 200-item
# search split, and on calc-wide's of about 1200), on a zoo of the same design built from
# another seed (other initial weights, other training streams, so other unseen items), judged
# on the composite rebuilt from that zoo's own unseen and untaught items. Results go to
# experiments/results/zoo-seedSEED/; make_readme_tables.py gives them a README section.
# About 50 minutes here.
#
#   bash experiments/other_zoo.sh [SEED]        (default 2024; the shipped zoo is seed 4321)
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-2024}
py=.venv/bin/python
zoo="${XDG_CACHE_HOME:-$HOME/.cache}/evomerge/zoo-v2-seed$seed"     # built here: not the shipped zoo
out=experiments/results/zoo-seed$seed
work=/tmp/evomerge-experiments/zoo-seed$seed
export HF_HUB_OFFLINE=1

.venv/bin/evomerge zoo build --out "$zoo" --seed "$seed"
$py experiments/unseen_items.py --zoo "$zoo"
$py experiments/search_quality.py --jobs 2 --skip-multi --zoo "$zoo" --workdir "$work/search_quality" \
    --out "$out/search_quality.json"
$py experiments/search_quality.py --jobs 2 --skip-multi --settings search_quality_large --zoo "$zoo" \
    --workdir "$work/search_quality_large" --out "$out/search_quality_large.json"
$py experiments/estimator_fidelity.py --jobs 2 --zoo "$zoo" --workdir "$work/estimator_fidelity" \
    --out "$out/estimator_fidelity.json"
$py experiments/estimator_fidelity.py --jobs 2 --settings estimator_fidelity_wide --zoo "$zoo" \
    --workdir "$work/estimator_fidelity_wide" --out "$out/estimator_fidelity_wide.json"
$py experiments/search_quality.py --jobs 2 --skip-multi --skip-mergenetic --settings search_quality_wide --zoo "$zoo" \
    --workdir "$work/search_quality_wide" --out "$out/search_quality_wide.json"
$py experiments/level_composite.py --zoo "$zoo" --results "$out"
