#!/usr/bin/env bash
# Resumes the cpu-full CIFAR-10 study (issue 22) on any machine, fresh or not.
#
#   bash experiments/cpu_full_chain.sh [WORKDIR]      # default /root/qarjax-study
#
# A session's machine may be new: what the study needs to go on is in this repository
# (results/cifar10_full_cpu_runs: the plain runs' branch-point checkpoints;
# results/cifar10_full_cpu_cells: the finished cells; results/cifar10_full_cpu_search: every
# search's scored trials). This seeds WORKDIR with whatever it lacks of those (it never
# overwrites a file there), then runs ResNet-20's remaining searches and the cells they
# choose, one family at a time, then a second seed and the K = 8 cells of both models, at
# the lowest CPU priority. Every step resumes: a finished
# trial or cell is read back, not retrained; rerun this after a stop and it goes on.
# Run it from a frozen worktree so that edits to the main checkout cannot change its code:
#
#   git worktree add --detach /work/qarjax-chain HEAD
#   (cd /work/qarjax-chain && setsid nohup bash experiments/cpu_full_chain.sh \
#       >> /root/qarjax-study/chain.log 2>&1 &)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
workdir="${1:-/root/qarjax-study}"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=/work/main/.venv/bin/python   # a worktree shares the main checkout's venv
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"

mkdir -p "$workdir/cells" "$workdir/search"
for run in results/cifar10_full_cpu_runs/*/; do
  name="$(basename "$run")"
  [ -e "$workdir/$name" ] || cp -r "$run" "$workdir/$name"
done
for kept in results/cifar10_full_cpu_cells/*.json results/cifar10_full_cpu_search/*.json; do
  into="$workdir/$(basename "$(dirname "$kept")" | sed 's/^cifar10_full_cpu_//')"
  [ -e "$into/$(basename "$kept")" ] || cp "$kept" "$into/"
done

study() {
  echo "== $(date -u +%FT%TZ) $(git -C "$here" rev-parse --short HEAD): $*"
  "$py" -u experiments/cifar10_study.py --background --scale cpu-full --workdir "$workdir" \
    --max-minutes 600 "$@"
}
# ResNet-20's searches (K = 2) and their K = 4, 2 cells, one family at a time
resnet=(--models resnet20 --ks 4,2 --out "$workdir/resnet_search")
for family in softmin cosine sine; do
  study "${resnet[@]}" --methods "none,$family" --search-lambdas 30,10,3 --search-extend 2
done
study "${resnet[@]}" --methods none,gradient_l1 --search-lambdas 1,0.3,0.1 --search-extend 2

# a second seed (before K = 8: the seed spread says which of the K = 2, 4 differences are
# real) for the K = 4, 2 cells of plain k-means, the best penalty family at K = 2 before
# tuning (VGG16/4 nearest; ResNet-20 cosine, 70.0 against nearest 68.2, softmin 68.0, sine
# 64.3 and gradient-L1 56.5, every family searched), DKM and LSQ: each model's plain run at
# seed 1 first (30 epochs), the cells at their searches' choices (seed 0's records)
study --models vgg16 --ks 4,2 --seeds 2 --out "$workdir/seed2" --methods none,nearest,dkm,lsq \
  --search-lambdas 3,1,0.3,0.1 --search-extend 4 --search-start-epochs 28 \
  --search-inits quantile,uniform
study --models resnet20 --ks 4,2 --seeds 2 --out "$workdir/seed2" --methods none,cosine,dkm,lsq \
  --search-lambdas 30,10,3 --search-extend 2

# K = 8: an invocation of its own per model and search grid (a sweep pads K to its largest,
# so --ks 8,4,2 would make every K = 4, 2 cell stale); the plain and gradient-L1 runs and every
# search on file (at K = 2) are reused, each family's K = 8 cell trains at its search's choice
k8=(--ks 8 --search-k 2 --out "$workdir/k8")
study --models resnet20 "${k8[@]}" --methods none,sine,cosine,nearest,softmin,dkm,lsq \
  --search-lambdas 30,10,3 --search-extend 2
study --models resnet20 "${k8[@]}" --methods gradient_l1 --search-lambdas 1,0.3,0.1 \
  --search-extend 2
study --models vgg16 "${k8[@]}" --methods none,sine,cosine,nearest,softmin,gradient_l1,dkm,lsq \
  --search-lambdas 3,1,0.3,0.1 --search-extend 4 --search-start-epochs 28 \
  --search-inits quantile,uniform
echo "== $(date -u +%FT%TZ) chain finished"
