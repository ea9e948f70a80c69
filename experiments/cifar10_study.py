"""The CIFAR-10 study: models x methods x K x seeds, train -> quantize -> tune, one table.

Methods: `none` (a plain model, quantized by k-means and by a uniform grid), the static
`sine` / `cosine` and dynamic `nearest` / `softmin` regularizers (quantized to their own grid),
the baselines R^2 `linf` and `gradient_l1` (quantized by k-means), and the quantization-aware
training rivals `dkm` (differentiable k-means) and `lsq` (learned step size), which change the
forward pass instead of the loss (quantized to their own centroids / grid).

How the sweep spends its time:
  - shared pre-training: per (model, seed) one plain run; every regularized run branches off
    its checkpoint at reg.start_epoch (`config.branch_from`) and trains only the regularized
    phase (``--from-scratch`` trains each from epoch 0 instead);
  - one compiled train step per (model, family): K is data in the step, so the runs of a
    family at K = 2..16 share one `Trainer`; one tuning trainer per model;
  - a run whose training does not depend on K (none, linf, gradient_l1) is trained once and
    quantized at every K;
  - each finished (model, method, K, seed) cell is saved as JSON under --workdir, so a rerun
    skips it, and each search trial is saved as it finishes; ``--max-minutes`` stops before
    a cell or a trial that would not fit, so a time-limited command always leaves finished
    work, and the next invocation resumes;
  - ``--plan`` lists the cells in order and projects the time (see `project`).

    # CPU scale (the demo model on the embedded cifar10_mini):
    python experiments/cifar10_study.py --scale cpu --out results/cifar10_cpu_shared
    # The GPU study on the shared CIFAR-10 archive, in commands of at most 9 minutes:
    python experiments/cifar10_study.py --scale gpu --out results/cifar10 --max-minutes 8 \
        --dataset imagefolder:../shared/data/cifar10-jpeg.tar.gz
    python experiments/cifar10_study.py --scale gpu --plan
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from benchlib import cpu_sample, others_cpu_share
from study_page import PENALTY, summarize

from qarjax import compile_cache
from qarjax.compress import size_report
from qarjax.config import load_config
from qarjax.errors import QarjaxError
from qarjax.families import FAMILIES, family
from qarjax.files import write_atomic, write_json_atomic
from qarjax.loop import fit
from qarjax.pipeline import quantize_stage, tune_stage, tuning_trainer
from qarjax.report import plot_weights
from qarjax.spec import build, load_data
from qarjax.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SCALES = {
    "cpu": {"models": ["cnn_small"], "config": "demo.py", "ks": [2, 4, 8], "train_size": 5000},
    # all of CIFAR-10 on the CPU: ResNet-20 and VGG16 at a quarter of its width
    "cpu-full": {"models": ["vgg16", "resnet20"], "ks": [2, 4, 8], "train_size": 50000,
                 "config": {"vgg16": "vgg16_narrow_cifar10.py",
                            "resnet20": "resnet20_cifar10.py"},
                 "dataset": f"imagefolder:{SHARED_CIFAR10}", "keep_period": 2},
    "gpu": {"models": ["vgg16", "alexnet"], "config": None, "ks": [2, 4, 8, 16],
            "train_size": 50000},
}  # fmt: skip
SETTINGS_PARTS = ("data", "model", "train", "reg", "quant")  # a cell's `Sweep.settings`
K_GROUPS = ([4, 2], [8, 16])  # the most telling K first (for every model), then the rest
METHODS = ["none", "sine", "cosine", "nearest", "softmin", "linf", "gradient_l1", "dkm", "lsq"]
# What the sweep knows of a family is on its class (qarjax.families.Family): k_free (one
# training serves every K), baseline_lambda (in place of the config's), step_factor (the
# train step's time over the plain one, for --plan: measured on cnn_small on the 2-core CPU;
# on a GPU they are unmeasured, so they are the assumption there; --step-factors overrides
# them per model).


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the table: a model trained with `family`, quantized at K by `method`."""

    model: str
    family: str
    k: int
    seed: int
    method: str = "auto"  # the plain model: kmeans or uniform
    lam: float | None = None  # lambda in place of the config's (a search's trial or choice)
    start: int | None = None  # reg.start_epoch in place of the config's (the same)
    init: str | None = None  # reg.init in place of the config's (the same)

    @property
    def label(self) -> str:
        return self.family if self.family != "none" else f"none+{self.method}"

    @property
    def name(self) -> str:
        return f"{self.model}_{self.label}_k{self.k}_s{self.seed}"

    @property
    def training(self) -> tuple:
        """The training run this cell quantizes (shared by the cells of a K-free family)."""
        k = None if family(self.family).k_free else self.k
        return self.model, self.family, self.seed, k, self.lam, self.start, self.init

    def chosen_by(self, search: dict) -> Cell:
        """This cell trained as `search` chose (its lambda, start epoch and init; an empty
        search: the config's)."""
        return dataclasses.replace(
            self, lam=search.get("lam"), start=search.get("start"), init=search.get("init")
        )


def ordered_cells(args) -> list[Cell]:
    """Every cell, the most telling first: per K group (K = 4, 2, then 8, 16), per model."""
    groups = [[k for k in g if k in args.ks] for g in K_GROUPS]
    groups = [g for g in groups if g] + [[k for k in args.ks if all(k not in g for g in groups)]]
    out = []
    for group in filter(None, groups):
        for model in args.models:
            for seed in range(args.seeds):
                for k in group:
                    for name in args.methods:
                        methods = ["kmeans", "uniform"] if name == "none" else ["auto"]
                        out += [Cell(model, name, k, seed, m) for m in methods]
    return out


def base_config(model: str, family_name: str, args):
    scale = SCALES[args.scale]
    name = scale["config"] or f"{model}_cifar10.py"
    name = name[model] if isinstance(name, dict) else name
    config = load_config(str(ROOT / "configs" / name), family_name)
    config.model, config.progress, config.tensorboard = model, False, False
    if args.dataset or scale.get("dataset"):
        config.dataset = args.dataset or scale["dataset"]
    if args.epochs:  # the regularized phase keeps its share of the run
        share = config.reg.start_epoch / config.num_epochs
        config.num_epochs = args.epochs
        config.reg.start_epoch = min(max(1, round(share * args.epochs)), args.epochs - 1)
    if family(family_name).baseline_lambda is not None:
        config.reg.lam = family(family_name).baseline_lambda
    elif config.reg.lam is None:  # a config that leaves it to the family: the search's base
        config.reg.lam = family(family_name).default_lambda
    config.reg.k_max = max(args.ks)
    # the plain run keeps the branch point (cpu-full: every other epoch, so the validation
    # search can try an earlier start)
    config.keep_period = scale.get("keep_period", config.reg.start_epoch)
    config.quant.tune_holdout = scale.get("tune_holdout", config.quant.tune_holdout)
    if args.holdout is not None:
        config.holdout = args.holdout
    return config


class OutOfTime(Exception):
    """The next search trial would not fit in --max-minutes (the trials so far are on file)."""


class Sweep:
    """Runs cells, reusing trained runs, trainers (compiled steps) and the loaded data."""

    def __init__(self, args):
        self.args = args
        self.began = time.perf_counter()
        self.longest = {"cell": 0.0, "trial": 0.0}  # seconds, this invocation's longest
        self.trial_seconds = 0.0  # spent in search trials (a cell's own time excludes them)
        self.workdir = Path(args.workdir)
        self.dataset = None
        self.trainers: dict = {}  # (model, family, seed, lam, start, init) -> Trainer
        self.tuners: dict = {}  # model -> tuning Trainer
        self.runs: dict = {}  # Cell.training -> (FitResult, own train seconds)
        self.holdout = None  # the validation images of the lambda search
        self.references: dict = {}  # (model, K) -> the plain run's held-out scores

    def fits(self, unit: str) -> bool:
        """Whether one more `unit` ("cell" or "trial") fits in --max-minutes, judged by the
        longest of its kind so far in this invocation (a trial without one: the longest cell,
        which trains as long and quantizes and tunes besides). The first unit always runs, so
        each invocation makes progress."""
        estimate = self.longest[unit] or (self.longest["cell"] if unit == "trial" else 0.0)
        if self.args.max_minutes is None or not estimate:
            return True
        return time.perf_counter() - self.began + estimate <= 60 * self.args.max_minutes

    def took(self, unit: str, seconds: float) -> None:
        self.longest[unit] = max(self.longest[unit], seconds)

    def data(self, spec):
        if self.dataset is None:
            self.dataset = load_data(spec.data)  # the CLI's loader
        return self.dataset

    def spec_for(self, cell: Cell, branch_from: str = "", branch_epoch: int = -1):
        """The run spec of `cell`: its config built and checked once."""
        config = base_config(cell.model, cell.family, self.args)
        config.seed = cell.seed
        if cell.lam is not None:
            config.reg.lam = cell.lam
        if cell.start is not None:
            config.reg.start_epoch = cell.start
        if cell.init is not None:
            config.reg.init = cell.init
        config.branch_epoch = branch_epoch
        config.reg.k = cell.k
        config.quant.method, config.quant.k = cell.method, cell.k
        config.branch_from = branch_from
        return build(config)

    def train(self, cell: Cell):
        """The trained run of `cell` (trained now, restored from its workdir, or cached)."""
        if cell.training in self.runs:
            return self.runs[cell.training]
        shared = cell.family != "none" and not self.args.from_scratch
        branch_from, branch_epoch = "", -1
        if shared:  # the plain run it branches off comes first
            plain = Cell(cell.model, "none", cell.k, cell.seed, "kmeans")
            self.train(plain)
            branch_from = str(self.run_dir(plain.training))
            if cell.start is not None:  # its latest checkpoint at or before the start
                kept = [int(p.name) for p in Path(branch_from, "checkpoints").iterdir()
                        if p.name.isdigit() and int(p.name) <= cell.start]  # fmt: skip
                if not kept:
                    raise SystemExit(f"{branch_from} keeps no checkpoint at or before epoch "
                                     f"{cell.start} to start regularizing from")  # fmt: skip
                branch_epoch = max(kept)
        spec = self.spec_for(cell, branch_from, branch_epoch)
        key = (cell.model, cell.family, cell.seed, cell.lam, cell.start, cell.init)  # compiled in
        if key not in self.trainers:
            self.trainers[key] = Trainer(spec, self.data(spec))
        # resume: a finished run is restored, a killed one continues from its checkpoint.
        result = fit(spec, self.run_dir(cell.training), resume=True, trainer=self.trainers[key])
        self.runs[cell.training] = (result, result.summary["train_seconds"])
        return self.runs[cell.training]

    def run_dir(self, training) -> Path:
        model, name, seed, k, lam, start, init = training
        at = ("" if lam is None else f"_lam{lam:g}") + ("" if start is None else f"_e{start}")
        at += "" if init is None else f"_init{init}"
        return self.workdir / f"{model}_{name}_k{k or 'any'}_s{seed}{at}" / "train"

    # ------------------------------------------------------------- the lambda search

    def searched(self, cell: Cell) -> bool:
        return bool(self.args.search_lambdas) and family(cell.family).has_penalty

    def search(self, cell: Cell) -> dict:
        """The search of `cell`'s (model, family): one trial per multiplier of the family's
        lambda; while the winner is the largest or smallest lambda tried, one step further
        (the grid's outer ratio, at most --search-extend steps); then, at the winning lambda,
        one per extra start epoch, then, at the winning lambda and start, one per other
        initialization of the representatives (the paper's suggestion for bell-shaped
        weights: dynamic families only). Each trains the regularized phase at --search-k
        (default the smallest K of the sweep; seed 0) and is scored by its pre-tuning
        accuracy on the held-out training images (never the test set). Each trial is saved
        under --workdir/search as it finishes: a rerun reuses every trial found there (a
        changed grid trains only the trials it lacks) and the winner is the best of all of
        them; it is the cell's own training at that K."""
        path = self.workdir / "search" / f"{cell.model}_{cell.family}.json"
        grid = sorted(self.args.search_lambdas, reverse=True)
        starts = sorted(self.args.search_start_epochs or [])
        inits = searched_inits(self.args, cell.family)
        config = base_config(cell.model, cell.family, self.args)
        k = search_k(self.args)
        found = json.loads(path.read_text()) if path.exists() else {}
        if found and found.get("k") != k:  # its trials would be replaced, not added to
            raise SystemExit(
                f"{path} holds a search at K = {found.get('k')}, this invocation searches at "
                f"K = {k}: pass --search-k {found.get('k')}, or move the file aside"
            )
        done = {}
        for trial in found.get("trials", []):
            trial.setdefault("start", None)  # searches saved before start epochs were searched
            trial.setdefault("start_epoch", config.reg.start_epoch)
            done[(float(f"{trial['lam']:.6g}"), trial["start"], trial.get("init"))] = trial
        path.parent.mkdir(parents=True, exist_ok=True)

        def tried(lam: float, start: int | None = None, init: str | None = None) -> dict:
            lam = float(f"{lam:.6g}")
            if (lam, start, init) not in done:
                if not self.fits("trial"):
                    raise OutOfTime(f"{cell.model} {cell.family}: search trial lambda {lam:g}")
                began = time.perf_counter()
                done[lam, start, init] = self.trial(cell, k, lam, start, init)
                seconds = time.perf_counter() - began
                self.took("trial", seconds)
                self.trial_seconds += seconds
                # each score kept at once: a killed search retrains and rescores nothing
                write_json_atomic(path, {"k": k, "plain": reference, "trials": list(done.values())})
            return done[lam, start, init]

        # the plain run, quantized at the same K and scored on the same images: what a
        # lambda must beat (lambda 0); not a candidate, the family is what is searched
        reference = found.get("plain") or self.plain_score(cell, k)
        for m in grid:
            tried(config.reg.lam * m)
        for _ in range(self.args.search_extend):
            plain = [t for t in done.values() if t["start"] is None and t.get("init") is None]
            lams = sorted({t["lam"] for t in plain}, reverse=True)
            best = max(plain, key=score)["lam"]
            if len(lams) < 2 or best not in (lams[0], lams[-1]):
                break
            outer, inner = (lams[0], lams[1]) if best == lams[0] else (lams[-1], lams[-2])
            tried(float(f"{outer * outer / inner:.1g}"))  # e.g. 0.9 after 0.1 and 0.3
        for e in starts:
            tried(max(done.values(), key=score)["lam"], e)
        best = max(done.values(), key=score)
        for i in inits:
            tried(best["lam"], best["start"], i)
        best = max(done.values(), key=score)  # every trial on record counts
        found = {
            "model": cell.model, "family": cell.family, "k": k, "multipliers": grid,
            "extend": self.args.search_extend, "start_epochs": starts, "inits": inits,
            "base_lambda": config.reg.lam, "trials": list(done.values()),
            "lam": best["lam"], "start": best["start"], "start_epoch": best["start_epoch"],
            "init": best.get("init"), "plain": reference,
        }  # fmt: skip
        write_json_atomic(path, found)
        return found

    def plain_score(self, cell: Cell, k: int) -> dict:
        """The search's reference: `cell`'s model's plain run (seed 0), quantized by k-means
        at `k` and scored on the held-out images, as a trial is (once per model and K: every
        family's search shares it)."""
        if (cell.model, k) not in self.references:
            plain = Cell(cell.model, "none", k, 0, "kmeans")
            self.references[cell.model, k] = self.holdout_scores(plain, self.train(plain)[0])[0]
        return self.references[cell.model, k]

    def holdout_scores(self, cell: Cell, result) -> tuple[dict, object]:
        """`cell`'s trained `result` quantized as its spec says and scored on the held-out
        images: ({holdout_fp_accuracy, holdout_pre_tuning_accuracy, score_seconds}, the
        QuantizedModel)."""
        began = time.perf_counter()
        spec = self.spec_for(cell)
        holdout = result.trainer.device_data(self.validation(spec))
        q = quantize_stage(result.trainer, result.state, spec, data=holdout)
        return {
            "holdout_fp_accuracy": q.metadata["fp_accuracy"],
            "holdout_pre_tuning_accuracy": q.metadata["pre_tuning_accuracy"],
            "score_seconds": time.perf_counter() - began,
        }, q

    def stale(self, cell: Cell, row: dict) -> bool:
        """Whether finished `row` of `cell` trained at another lambda, start or init than its
        family's search now chooses (the grid was extended, or trials were added), or under
        other settings than this invocation's (`settings`: --epochs, --holdout, the data, K's
        padding...; rows written before it was recorded are taken as they are). A row whose
        training is still the choice gets the search's current record (the trials added since
        it ran, which the results page lists)."""
        if self.searched(cell):
            chosen, now = row.get("lambda_search", {}), self.search(cell)
            if any(chosen.get(key) != now.get(key) for key in ("lam", "start", "init")):
                return True
            row["lambda_search"] = now
            cell = cell.chosen_by(now)
        return "settings" in row and row["settings"] != self.settings(cell)

    def settings(self, cell: Cell) -> str:
        """A digest of what trains, quantizes and tunes `cell`: its spec but the loop's keys
        (paths to branch from, checkpointing, progress bars)."""
        spec = self.spec_for(cell)
        parts = {p: dataclasses.asdict(getattr(spec, p)) for p in SETTINGS_PARTS}
        text = json.dumps({**parts, "seed": spec.seed}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def trial(
        self, cell: Cell, k: int, lam: float, start: int | None, init: str | None = None
    ) -> dict:
        """One trial of the search: trained (or restored) and scored on the held-out images."""
        trial = dataclasses.replace(cell, k=k, seed=0, method="auto", lam=lam, start=start,
                                    init=init)  # fmt: skip
        result, seconds = self.train(trial)
        spec = self.spec_for(trial)
        scores, q = self.holdout_scores(trial, result)
        out = {
            "lam": lam, "start": start, "start_epoch": spec.reg.start_epoch, "init": init,
            "init_method": spec.reg.init, "train_seconds": seconds, **scores,
            "live_min": live_levels(q.layers),
        }  # fmt: skip
        inits = f", init {spec.reg.init}" if family(cell.family).has_reps else ""
        print(f"   search {cell.model} {cell.family}: lambda {lam:g}, start epoch "
              f"{out['start_epoch']}{inits}: held-out pre-tuning "
              f"{out['holdout_pre_tuning_accuracy']:.3f} [fp {out['holdout_fp_accuracy']:.3f}]",
              flush=True)  # fmt: skip
        return out

    def validation(self, spec):
        """The held-out training images as a dataset's test split (the search's scores)."""
        if self.holdout is None:
            if not spec.data.holdout:
                raise SystemExit("the lambda search needs held-out images: pass --holdout N")
            self.holdout = load_data(dataclasses.replace(spec.data, eval_split="holdout"))
        return self.holdout

    def run(self, cell: Cell) -> dict:
        search = self.search(cell) if self.searched(cell) else None
        if search:
            cell = cell.chosen_by(search)
        spec = self.spec_for(cell)
        result, train_seconds = self.train(cell)
        t0 = time.perf_counter()
        q = quantize_stage(result.trainer, result.state, spec)
        t1 = time.perf_counter()
        if cell.model not in self.tuners:  # once per model: not a cell's tuning time
            self.tuners[cell.model] = tuning_trainer(
                spec, self.data(spec), q, k_max=max(self.args.ks)
            )
        built = time.perf_counter()
        t = tune_stage(spec, self.data(spec), q, tuner=self.tuners[cell.model])
        t2 = time.perf_counter()
        sizes = size_report(jax.device_get(t.params), t.layers)
        return {
            "model": cell.model, "method": cell.label, "k": cell.k, "seed": cell.seed,
            "fp_accuracy": q.metadata["fp_accuracy"],
            "pre_tuning_accuracy": q.metadata["pre_tuning_accuracy"],
            "pre_tuning_accuracy_no_bn": q.metadata["pre_tuning_accuracy_no_bn"],
            "post_tuning_accuracy": t.metadata["post_tuning_accuracy"],
            # the tuning rule: keep the best epoch on this fraction of held-out training images
            # (0: the last epoch is kept; the cells before keep-best have no such field)
            "tune_holdout": spec.quant.tune_holdout,
            "tune_best_epoch": t.metadata.get("tune_best_epoch"),
            "compression_ratio": sizes["compression_ratio"],
            "live_min": live_levels(q.layers),
            "shared_pretraining": cell.family != "none" and not self.args.from_scratch,
            "train_seconds": train_seconds, "quantize_seconds": t1 - t0,
            "tune_seconds": t2 - built,
            "lam": spec.reg.lam if family(cell.family).has_penalty else None,
            "start_epoch": spec.reg.start_epoch,
            "init": spec.reg.init if family(cell.family).has_reps else None,
            "settings": self.settings(cell),
        } | ({"lambda_search": search} if search else {})  # fmt: skip


def search_k(args) -> int:
    """The K every search trial trains and is scored at: --search-k, else the smallest of
    --ks (a later invocation for K = 8 alone passes the K its searches ran at)."""
    return args.search_k or min(args.ks)


def searched_inits(args, name: str) -> list[str]:
    """The representatives' initializations the search tries for family `name` (those with
    trainable representatives; the others have no reg.init to choose)."""
    return list(args.search_inits or []) if family(name).has_reps else []


def score(trial: dict) -> float:
    """What the search maximizes: pre-tuning accuracy on the held-out training images."""
    return trial["holdout_pre_tuning_accuracy"]


def live_levels(quantized: dict) -> int:
    """The fewest distinct levels in use in any layer (values closer than 1% of the layer's
    mean spacing count once): below K means the grid collapsed."""
    fewest = None
    for layer in quantized.values():
        codebook = np.sort(np.asarray(jax.device_get(layer.codebook), np.float64))
        counts = np.bincount(np.ravel(jax.device_get(layer.indices)), minlength=codebook.size)
        used = codebook[counts > 0]
        spacing = (codebook[-1] - codebook[0]) / max(codebook.size - 1, 1)
        n = 1 + int(np.sum(np.diff(used) > 0.01 * spacing)) if used.size else 0
        fewest = n if fewest is None else min(fewest, n)
    return int(fewest or 0)


# ----------------------------------------------------------------------------- the plan


def project(cells: list[Cell], args, images_per_second: dict[str, float]) -> dict:
    """Projected device seconds of `cells`: training epochs x images / (images/s x the
    family's step factor), one compile per new train step (one per (model, family, seed)),
    one tuning compile per model, and per cell the quantize stage (k-means, 3 evaluations,
    the batch-norm re-estimate) and the tuning epochs."""
    n_train = args.train_size or SCALES[args.scale]["train_size"]
    n_test = n_train // 5  # CIFAR-10's ratio; an evaluation runs at about 3x the train rate
    seen_train, seen_steps, seen_tuners = set(), set(), set()
    total = {"train": 0.0, "compile": 0.0, "quantize": 0.0, "tune": 0.0, "search": 0.0}
    for cell in cells:
        config = base_config(cell.model, cell.family, args)
        ips = images_per_second[cell.model]
        epoch = (n_train - config.holdout) / ips  # held-out images are not trained on
        if cell.training not in seen_train:
            seen_train.add(cell.training)
            shared = cell.family != "none" and not args.from_scratch
            epochs = config.num_epochs - (config.reg.start_epoch if shared else 0)
            total["train"] += epochs * epoch * step_factor(args, cell.model, cell.family)
            total["train"] += config.num_epochs * (n_test / ips / 3)  # an evaluation per epoch
            if (cell.model, cell.family, cell.seed) not in seen_steps:
                seen_steps.add((cell.model, cell.family, cell.seed))
                total["compile"] += args.compile_seconds
        if cell.model not in seen_tuners:
            seen_tuners.add(cell.model)
            total["compile"] += args.compile_seconds
        batches = config.quant.batch_stats_batches * config.batch_size
        total["quantize"] += args.quantize_seconds + 3 * n_test / ips / 3 + batches / ips / 2
        total["tune"] += config.quant.tune_epochs * epoch + 2 * n_test / ips / 3
    # the lambda search: per (model, penalty family) its other trials (the winner at the
    # search's K is that cell's own training, where the sweep has that K), each scored like a
    # quantize stage (a search on file is counted as if it were not)
    searched = {(c.model, c.family) for c in cells if family(c.family).has_penalty}
    for model, name in searched if args.search_lambdas else ():
        extra = len(args.search_lambdas) - (search_k(args) in args.ks)
        extra += len(args.search_start_epochs or [])
        extra += len(searched_inits(args, name)) + args.search_extend  # at most
        config = base_config(model, name, args)
        epoch = n_train / images_per_second[model]
        phase = (config.num_epochs - config.reg.start_epoch) * epoch
        phase *= step_factor(args, model, name)
        total["search"] += extra * phase + (extra + 1) * args.quantize_seconds
    total["all"] = sum(total.values())
    return total


def step_factor(args, model: str, name: str) -> float:
    """A regularized step's time over the plain step's for `name` on `model`: --step-factors'
    (model:family, then family), else the family's own (measured on cnn_small)."""
    given = args.step_factors
    return given.get((model, name), given.get((None, name), family(name).step_factor))


def step_factors(text: str) -> dict[tuple[str | None, str], float]:
    """An argparse type: "[model:]family=factor,..." (e.g. resnet20:gradient_l1=8.2)."""
    factors = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        model, _, name = key.rpartition(":")
        if name not in FAMILIES or not float(value) > 0:
            raise argparse.ArgumentTypeError(
                f"{item!r}: want [model:]family=factor, a family of {tuple(FAMILIES)} and a "
                "positive factor"
            )
        factors[model or None, name] = float(value)
    return factors


def measured_rates(models, args) -> dict[str, float]:
    """Images/s of the plain train step per model, measured here (compile excluded)."""
    rates = {}
    for model in models:
        spec = build(base_config(model, "none", args))
        trainer = Trainer(spec, load_data(spec.data))
        state = trainer.init_state()
        state, _ = trainer.train_epoch(state, 0)  # compiles
        jax.block_until_ready(state.params)
        began = time.perf_counter()
        state, _ = trainer.train_epoch(state, 1)
        jax.block_until_ready(state.params)
        rates[model] = (
            trainer.steps_per_epoch * spec.train.batch_size / (time.perf_counter() - began)
        )
    return rates


def print_plan(cells: list[Cell], args) -> None:
    if args.images_per_second:
        rates = {m: float(v) for m, v in (p.split("=") for p in args.images_per_second.split(","))}
        source = "given"
    else:
        rates, source = measured_rates(args.models, args), f"measured on {jax.devices()[0]}"
    for i, cell in enumerate(cells, 1):
        print(f"{i:3d}. {cell.name}")
    total = project(cells, args, rates)
    print(
        f"{len(cells)} cells, {len({c.training for c in cells})} trainings; images/s {source}: "
        + ", ".join(f"{m} {v:,.0f}" for m, v in rates.items())
    )
    print(
        f"projected: {total['all'] / 60:.1f} min (train {total['train'] / 60:.1f}, compile "
        f"{total['compile'] / 60:.1f} at {args.compile_seconds:g} s each, quantize "
        f"{total['quantize'] / 60:.1f}, tune {total['tune'] / 60:.1f}, lambda search "
        f"{total['search'] / 60:.1f}); step factors "
        f"{ {f'{c.model}:{c.family}': step_factor(args, c.model, c.family) for c in cells} }; "
        f"{'from scratch' if args.from_scratch else 'shared pre-training'}"
    )


def page(rows: list[dict], args, wall: float) -> None:
    """The results page of `rows` at --out (`study_page.summarize`)."""
    holdouts = {m: base_config(m, "none", args).holdout for m in {r["model"] for r in rows}}
    summarize(rows, Path(args.out), scale=args.scale, note=args.note, methods=METHODS,
              holdouts=holdouts, wall=wall)  # fmt: skip


def weight_histograms(sweep: Sweep, model: str, rows: list[dict], out: Path) -> Path:
    """One layer's trained weights with their codebooks (red), the plain model (its k-means
    centroids) against the penalty family with the best pre-tuning accuracy at the smallest
    K, both quantized again from their runs in the workdir (seed 0); the layer: the largest
    kernel. Writes `<out>_weights_<model>.png`."""
    k = min(sweep.args.ks)
    mine = [r for r in rows if r["model"] == model and r["k"] == k and r["seed"] == 0]
    penalized = [r for r in mine if r["method"] in (*PENALTY["static"], *PENALTY["dynamic"])]
    if not penalized or not any(r["method"] == "none+kmeans" for r in mine):
        raise SystemExit(f"{model}: no finished plain and penalty cells at K = {k}")
    best = max(penalized, key=lambda r: r["pre_tuning_accuracy"])
    # the searched lambda, start and init: its run's name
    chosen = Cell(model, best["method"], k, 0).chosen_by(best.get("lambda_search", {}))
    drawn = {}
    for cell in (Cell(model, "none", k, 0, "kmeans"), chosen):
        result, _ = sweep.train(cell)
        q = quantize_stage(result.trainer, result.state, sweep.spec_for(cell))
        drawn[cell.label] = (result.state.params, q.layers)
    name = max(drawn["none+kmeans"][1], key=lambda n: drawn["none+kmeans"][1][n].indices.size)
    params = {label: jax.device_get(p) for label, (p, _) in drawn.items()}
    layers = {
        f"{label}: {name}": dataclasses.replace(layers[name], path=(label, *layers[name].path))
        for label, (_, layers) in drawn.items()
    }
    path = out.parent / f"{out.name}_weights_{model}.png"
    plot_weights(path, params, layers, f"{model}, K = {k}: trained weights and codebooks")
    return path


def numbers(kind):
    """An argparse type: a comma-separated list of `kind`."""
    return lambda text: [kind(x) for x in text.split(",")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--models", type=lambda s: s.split(","), default=None)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    parser.add_argument("--ks", type=numbers(int), default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--workdir", default="runs/study")
    parser.add_argument("--out", default="results/cifar10_cpu_shared")
    parser.add_argument("--note", default="", help="the results page's opening paragraph")
    parser.add_argument("--note-file", default=None, help="--note, read from this file")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="write the table from the finished cells in --workdir; train nothing",
    )
    parser.add_argument(
        "--histograms",
        action="store_true",
        help="with the trained runs in --workdir: one layer's weights and codebooks, plain "
        "against the best penalty family, then the table (as --summarize)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="train every regularized run from epoch 0 (no shared pre-training)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no cell or search trial that would end past this many minutes (judged "
        "by the longest of its kind so far)",
    )
    parser.add_argument("--plan", action="store_true", help="list the cells, project the time")
    parser.add_argument(
        "--images-per-second", default="", help="for --plan: model=rate,... (default: measure here)"
    )
    parser.add_argument(
        "--step-factors",
        type=step_factors,
        default={},
        help="for --plan: [model:]family=factor,... a regularized step's time over the plain "
        "step's, in place of the family's own (measured on cnn_small; e.g. "
        "resnet20:gradient_l1=8.2, as measured on a 2-core Xeon)",
    )
    parser.add_argument("--compile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--quantize-seconds",
        type=float,
        default=1.0,
        help="for --plan: k-means of one model's layers",
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument(
        "--search-lambdas",
        type=numbers(float),
        default=None,
        help="multipliers of each penalty family's lambda: one trial each at the smallest K, "
        "scored on the held-out training images; every K then uses the winner",
    )
    parser.add_argument(
        "--search-extend",
        type=int,
        default=0,
        help="with --search-lambdas: while the winning lambda is the largest or smallest "
        "tried, try one step further (the grid's outer ratio), at most this many times",
    )
    parser.add_argument(
        "--search-k",
        type=int,
        default=None,
        help="with --search-lambdas: the K the trials train and are scored at (default the "
        "smallest of --ks); every K uses the winner",
    )
    parser.add_argument(
        "--search-start-epochs",
        type=numbers(int),
        default=None,
        help="with --search-lambdas: reg.start_epoch values tried at the winning lambda, "
        "besides the config's (a trial branches off the plain run's latest checkpoint before)",
    )
    parser.add_argument(
        "--search-inits",
        type=numbers(str),
        default=None,
        help="with --search-lambdas: reg.init values (quantile, uniform, kmeans) tried at the "
        "winning lambda and start, for the families with trainable representatives",
    )
    parser.add_argument(
        "--holdout", type=int, default=None, help="training images held out (the config's)"
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="run at the lowest CPU priority, so that work beside it keeps the cores (nice 19, "
        "and on Linux its session's autogroup too: see `lowest_priority`)",
    )
    args = parser.parse_args(argv)
    if args.search_extend < 0:
        parser.error(f"--search-extend must be 0 or more, not {args.search_extend}")
    if args.note_file:
        try:
            args.note = Path(args.note_file).read_text().strip()
        except OSError as e:
            parser.error(f"--note-file {args.note_file}: {e.strerror}")
    if args.search_k is not None and args.search_k < 2:
        parser.error(f"--search-k must be 2 or more, not {args.search_k}")
    args.ks = args.ks or SCALES[args.scale]["ks"]
    args.models = args.models or SCALES[args.scale]["models"]
    return args


def lowest_priority() -> str:
    """Lowers this process to the lowest CPU priority; returns what it set.

    Linux with autogroup scheduling (the default of most desktop distributions) shares the CPU
    equally between sessions and applies a process's nice value only inside its own session:
    a study started with ``nice -n 19`` under ``setsid``/``nohup`` from another terminal took
    half of a 2-core machine from the work beside it (ResNet-20's step 866 ms against 454 ms,
    measured here). So the session's autogroup is lowered too, where the kernel has one.
    """
    os.nice(19 - os.nice(0))
    done = "nice 19"
    autogroup = Path("/proc/self/autogroup")
    try:
        if autogroup.exists():
            autogroup.write_text("19")
            done += ", " + autogroup.read_text().strip()
    except OSError as e:  # not permitted here: the nice value still holds inside the session
        done += f" (autogroup unchanged: {e.strerror})"
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        compile_cache.enable()  # the next invocation reads the models' programs back
    except QarjaxError as e:
        raise SystemExit(str(e)) from None
    if args.background:
        print(f"background: {lowest_priority()}", flush=True)
    cells = ordered_cells(args)
    if args.plan:
        print_plan(cells, args)
        return 0
    workdir = Path(args.workdir)
    if args.summarize or args.histograms:
        found = [workdir / "cells" / f"{c.name}.json" for c in cells]
        rows = [json.loads(f.read_text()) for f in found if f.exists()]
        if not rows:
            print(f"no finished cells in {workdir / 'cells'}", file=sys.stderr)
            return 2
        if args.histograms:  # from the trained runs in the workdir
            sweep = Sweep(args)  # one loaded dataset for every model
            for model in args.models:
                print(f"wrote {weight_histograms(sweep, model, rows, Path(args.out))}")
        page(rows, args, 0.0)
        # the flags may name cells no plan runs (every method at every seed): not a progress bar
        print(f"wrote {args.out}.md ({len(rows)} finished cells, of {len(cells)} these flags name)")
        return 0
    (workdir / "cells").mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args)
    rows, stopped = [], 0
    for cell in cells:
        done = workdir / "cells" / f"{cell.name}.json"
        try:
            if done.exists():
                row = json.loads(done.read_text())
                before = json.dumps(row, indent=1)
                if not sweep.stale(cell, row):
                    if json.dumps(row, indent=1) != before:  # its search's current record
                        write_atomic(done, json.dumps(row, indent=1))
                    rows.append(row)
                    continue
                print(f"== {cell.name}: its settings changed, or its family's search now "
                      "chooses another training; rerun", flush=True)  # fmt: skip
            if not sweep.fits("cell"):
                stopped += 1
                continue
            print(f"== {cell.name}", flush=True)
            t0, searching, busy = time.perf_counter(), sweep.trial_seconds, cpu_sample()
            row = sweep.run(cell)
            # the cell's times grow with the CPU that other processes took meanwhile
            row["others_cpu_share"] = others_cpu_share(busy, cpu_sample())
        except OutOfTime as stop:  # the trials so far are on file; the next invocation goes on
            print(f"   budget: stopped before the {stop}", flush=True)
            if done.exists():  # a finished cell stays on the page until its rerun
                rows.append(json.loads(done.read_text()))
            stopped += 1
            continue
        sweep.took("cell", time.perf_counter() - t0 - (sweep.trial_seconds - searching))
        write_atomic(done, json.dumps(row, indent=1))  # a killed run leaves no torn cell
        rows.append(row)
        print(f"   fp {row['fp_accuracy']:.3f} pre {row['pre_tuning_accuracy']:.3f} post "
              f"{row['post_tuning_accuracy']:.3f} live {row['live_min']}", flush=True)  # fmt: skip
    if rows:
        page(rows, args, time.perf_counter() - sweep.began)
        print(f"wrote {args.out}.md ({len(rows)} of {len(cells)} cells)")
    if stopped:
        print(f"budget of {args.max_minutes} min reached: {stopped} cells left; run the same "
              "command again to go on")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
