#!/usr/bin/env bash
# Writes the cpu-full study's results page (results/cifar10_full_cpu.md, .csv, plot) from the
# finished cells, nothing trained:
#
#   bash experiments/cpu_full_page.sh [WORKDIR]     # default /root/qarjax-study
#
# First the workdir's finished cells and search records are copied into the repository
# (results/cifar10_full_cpu_cells, results/cifar10_full_cpu_search: what a fresh machine
# resumes from, see cpu_full_chain.sh); then the page is written from the repository's cells,
# with results/cifar10_full_cpu_note.md as its opening paragraph. The weight histograms need
# the trained runs (the plain one and the best penalty family's at the smallest K; a run the
# workdir lacks is retrained): HISTOGRAMS=resnet20 (or resnet20,vgg16) redraws those models'.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
workdir="${1:-/root/qarjax-study}"
py="${PYTHON:-$here/.venv/bin/python}"
cd "$here"

for kind in cells search; do
  if compgen -G "$workdir/$kind/*.json" > /dev/null; then
    cp "$workdir/$kind"/*.json "results/cifar10_full_cpu_$kind/"
  fi
done
ks="$(ls results/cifar10_full_cpu_cells | sed -n 's/.*_k\([0-9]*\)_s[0-9]*\.json$/\1/p' | sort -nu | paste -sd,)"
page=(--scale cpu-full --models resnet20,vgg16 --ks "$ks" --seeds 2
      --methods none,sine,cosine,nearest,softmin,gradient_l1,dkm,lsq
      --out results/cifar10_full_cpu --note-file results/cifar10_full_cpu_note.md)
if [ -n "${HISTOGRAMS:-}" ]; then  # e.g. HISTOGRAMS=resnet20: redraw that model's figure
  "$py" experiments/cifar10_study.py "${page[@]}" --models "$HISTOGRAMS" --workdir "$workdir" \
    --histograms
fi
# the page from the repository's cells alone (a workdir whose cells are those)
mkdir -p runs/cpu_full_page
ln -sfn "$here/results/cifar10_full_cpu_cells" runs/cpu_full_page/cells
"$py" experiments/cifar10_study.py "${page[@]}" --workdir runs/cpu_full_page --summarize
