"""The study driver (experiments/cifar10_study.py): order, shared pre-training, one compiled
step per family across K, the time budget, resume, and the plan's projection."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, write_image_folder

from qarjax.metrics import read_jsonl

sys.path.insert(0, str(REPO / "experiments"))
import cifar10_study as study  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def test_the_gpu_plan_fits_in_25_minutes(capsys):
    study.main(["--scale", "gpu", "--plan", "--images-per-second", "vgg16=121000,alexnet=100000"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].endswith("vgg16_none+kmeans_k4_s0")  # the most telling cells first
    assert lines[1].endswith("vgg16_none+uniform_k4_s0")
    first_k8 = next(i for i, line in enumerate(lines) if "_k8_" in line)
    assert all("_k4_" in line or "_k2_" in line for line in lines[:first_k8])
    minutes = float(lines[-1].split("projected: ")[1].split(" min")[0])
    assert minutes <= 25, out
    study.main(["--scale", "gpu", "--plan", "--images-per-second", "vgg16=121000,alexnet=100000",
                "--from-scratch"])  # fmt: skip
    scratch = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(scratch.split("projected: ")[1].split(" min")[0]) > minutes


def test_sweep_shares_pretraining_and_compiled_steps_and_resumes(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs", per_class=(64, 8), size=16)
    common = [
        "--scale", "cpu", "--methods", "none,softmin", "--ks", "2,4", "--epochs", "2",
        "--dataset", f"imagefolder:{folder}", "--workdir", str(tmp_path / "w"),
        "--out", str(tmp_path / "out" / "table"),
    ]  # fmt: skip
    study.main([*common, "--max-minutes", "0"])  # the budget lets exactly one cell run
    assert len(list((tmp_path / "w" / "cells").glob("*.json"))) == 1
    assert "budget of 0.0 min reached" in capsys.readouterr().out

    args = study.parse_args(common)
    sweep = study.Sweep(args)
    rows = [sweep.run(cell) for cell in study.ordered_cells(args)]
    assert [r["method"] for r in rows[:3]] == ["none+kmeans", "none+uniform", "softmin"]
    assert {r["k"] for r in rows} == {2, 4} and len(rows) == 6
    for family in ("softmin",):  # K = 4 and K = 2 ran on one compiled step
        assert sweep.trainers[("cnn_small", family, 0, None, None, None)].trace_count == 1
    assert sweep.tuners["cnn_small"].trainer.trace_count == 1
    for row in rows:
        assert row["live_min"] == row["k"], row  # no collapsed cell, softmin K = 2 included
        assert row["shared_pretraining"] == (row["method"] == "softmin")
    epochs_trained = {  # the branched runs trained only the regularized epoch
        training: len(read_jsonl(sweep.run_dir(training) / "metrics.jsonl"))
        for training in sweep.runs
    }
    assert epochs_trained[("cnn_small", "none", 0, None, None, None, None)] == 2
    assert epochs_trained[("cnn_small", "softmin", 0, 2, None, None, None)] == 1

    study.main(common)  # finishes the sweep, reusing the cell and the trained runs on disk
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| softmin |" in table and ") *collapsed*" not in table
    header = (tmp_path / "out" / "table.csv").read_text().splitlines()[0]
    for column in ("train_seconds", "quantize_seconds", "tune_seconds", "live_min",
                   "others_cpu_share"):  # fmt: skip
        assert column in header
    if Path("/proc/stat").exists():  # the cells' share of the CPU that others took
        assert "of the cores on average during the 6 cells that recorded it" in table
    cells = list((tmp_path / "w" / "cells").glob("*.json"))
    assert len(cells) == 6 and all(json.loads(c.read_text())["k"] in (2, 4) for c in cells)

    # a finished cell made under other settings (another --epochs, data, padding...) reruns
    done = tmp_path / "w" / "cells" / "cnn_small_softmin_k2_s0.json"
    row = json.loads(done.read_text())
    done.write_text(json.dumps({**row, "settings": "another run's"}))
    capsys.readouterr()
    study.main(common)
    assert "cnn_small_softmin_k2_s0: its settings changed" in capsys.readouterr().out
    assert json.loads(done.read_text())["settings"] == row["settings"]


def test_the_plan_takes_a_step_factor_per_model_and_bad_values_are_refused():
    argv = ["--scale", "cpu-full", "--models", "resnet20,vgg16", "--methods", "none,gradient_l1",
            "--ks", "2"]  # fmt: skip
    args = study.parse_args(argv)
    given = study.parse_args([*argv, "--step-factors", "resnet20:gradient_l1=8.2,sine=2"])
    assert study.step_factor(given, "resnet20", "gradient_l1") == 8.2
    assert study.step_factor(given, "vgg16", "sine") == 2  # a family's factor for every model
    own = study.family("gradient_l1").step_factor
    assert study.step_factor(given, "vgg16", "gradient_l1") == own
    cells, rates = study.ordered_cells(args), {"resnet20": 300.0, "vgg16": 500.0}
    more = study.project(cells, given, rates)["train"] - study.project(cells, args, rates)["train"]
    config = study.base_config("resnet20", "gradient_l1", args)
    epochs = config.num_epochs - config.reg.start_epoch  # the branch's regularized epochs
    trained = 50_000 - config.holdout  # the held-out images are not trained on
    assert more == pytest.approx(epochs * trained / 300 * (8.2 - own))
    for bad in ("foo=2", "sine=0", "sine=x"):
        with pytest.raises(SystemExit):
            study.parse_args([*argv, "--step-factors", bad])
    with pytest.raises(SystemExit):
        study.parse_args([*argv, "--search-extend", "-1"])


def searched_sweep(tmp_path, methods: str, epochs: int, *search: str):
    """The argv of a K = 2 sweep of `methods` with a search on 40 held-out images, and its
    Sweep."""
    folder = write_image_folder(tmp_path / "imgs", per_class=(80, 8), size=16)
    argv = [
        "--scale", "cpu", "--methods", methods, "--ks", "2", "--epochs", str(epochs),
        "--dataset", f"imagefolder:{folder}", "--workdir", str(tmp_path / "w"),
        "--out", str(tmp_path / "out" / "table"), "--holdout", "40", *search,
    ]  # fmt: skip
    args = study.parse_args(argv)
    return argv, args, study.Sweep(args)


def test_the_search_tries_the_representatives_inits_of_dynamic_families_only(tmp_path):
    argv, args, sweep = searched_sweep(
        tmp_path, "none,nearest", 4, "--search-lambdas", "1", "--search-inits", "uniform"
    )
    assert study.searched_inits(args, "sine") == []  # no representatives
    assert study.searched_inits(args, "dkm") == []
    assert study.searched_inits(args, "nearest") == ["uniform"]
    cells, rate = study.ordered_cells(args), {"cnn_small": 1000.0}
    without = study.parse_args([a for a in argv if a not in ("--search-inits", "uniform")])
    assert (
        study.project(cells, args, rate)["search"] > study.project(cells, without, rate)["search"]
    )
    rows = [sweep.run(cell) for cell in study.ordered_cells(args)]
    nearest = rows[-1]
    trials = nearest["lambda_search"]["trials"]
    assert [(t["init"], t["init_method"]) for t in trials] == [
        (None, "kmeans"),
        ("uniform", "uniform"),
    ]
    assert trials[0]["lam"] == trials[1]["lam"]  # at the winning lambda
    best = max(trials, key=study.score)
    assert nearest["init"] == best["init_method"]  # the cell trains with the winner's init
    uniform = sweep.run_dir(("cnn_small", "nearest", 0, 2, trials[1]["lam"], None, "uniform"))
    assert json.loads((uniform / "config.json").read_text())["reg"]["init"] == "uniform"
    assert len([t for t in sweep.runs if t[1] == "nearest"]) == 2  # the winner is the cell's
    study.main(argv)  # trains nothing new; the page lists the init trial
    page = (tmp_path / "out" / "table.md").read_text()
    assert f"{trials[1]['lam']:g} init uniform" in page and "| nearest | " in page


def test_a_winner_at_the_grids_edge_is_tried_beyond_it_and_a_cell_the_search_outdated_reruns(
    tmp_path, capsys
):
    argv, args, sweep = searched_sweep(
        tmp_path, "none,sine", 4, "--search-lambdas", "0.1,1", "--search-extend", "1"
    )
    study.main(argv)
    path = tmp_path / "w" / "search" / "cnn_small_sine.json"
    trials = json.loads(path.read_text())["trials"]
    (a, b), extra = trials[:2], trials[2:]
    won, lost = (a, b) if study.score(a) >= study.score(b) else (b, a)
    # two lambdas: the winner is at an edge, so one step beyond it (the grid's ratio)
    assert [t["lam"] for t in extra] == [float(f"{won['lam'] ** 2 / lost['lam']:.1g}")]
    cell = tmp_path / "w" / "cells" / "cnn_small_sine_k2_s0.json"
    assert json.loads(cell.read_text())["lam"] == max(trials, key=study.score)["lam"]
    capsys.readouterr()
    study.main(argv)  # all in place: nothing trains, nothing reruns
    assert "== " not in capsys.readouterr().out

    # a trial added to the search that does not change its choice: the cell stands, and its
    # record (the page's search table) lists the new trial
    added = dict(lost, start=3, start_epoch=3, holdout_pre_tuning_accuracy=0.0)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "trials": [*record["trials"], added]}))
    study.main(argv)
    assert "== " not in capsys.readouterr().out
    assert added in json.loads(cell.read_text())["lambda_search"]["trials"]
    assert f"{lost['lam']:g} from epoch 3 = 0.000" in (tmp_path / "out" / "table.md").read_text()

    # a search killed after its first trial: the trial on file is reused as it is (here with
    # a score no rerun would give), so the choice moves and the finished cell is outdated
    lost["holdout_pre_tuning_accuracy"] = 2.0
    path.write_text(json.dumps({"k": 2, "trials": [lost]}))
    study.main(argv)
    out = capsys.readouterr().out
    assert "cnn_small_sine_k2_s0: its settings changed, or its family's search now" in out
    search = json.loads(path.read_text())
    assert search["lam"] == lost["lam"] and search["trials"][0] == lost
    beyond = float(f"{lost['lam'] ** 2 / won['lam']:.1g}")  # the new winner's edge, extended
    assert {t["lam"] for t in search["trials"]} == {a["lam"], b["lam"], beyond}
    assert json.loads(cell.read_text())["lam"] == lost["lam"]  # rerun at the search's choice


def test_lambda_search_scores_on_held_out_images_and_reuses_the_winner(
    tmp_path, capsys, monkeypatch
):
    argv, args, sweep = searched_sweep(
        tmp_path, "none,sine", 5, "--search-lambdas", "0.1,1", "--search-start-epochs", "4"
    )
    rows = [sweep.run(cell) for cell in study.ordered_cells(args)]
    sine = rows[-1]
    search = sine["lambda_search"]
    config = study.base_config("cnn_small", "sine", args)
    base, start = config.reg.lam, config.reg.start_epoch  # 3 of 5 epochs
    lambdas, later = search["trials"][:2], search["trials"][2]
    assert [t["lam"] for t in lambdas] == pytest.approx([base, 0.1 * base])
    assert [t["start_epoch"] for t in lambdas] == [start, start]
    assert later["start_epoch"] == 4 and later["lam"] == max(lambdas, key=study.score)["lam"]
    best = max(search["trials"], key=study.score)
    assert (sine["lam"], sine["start_epoch"]) == (best["lam"], best["start_epoch"])
    assert len(sweep.holdout.test_labels) == 40  # scored on the held-out training images
    # the winner is the cell's own training: three sine runs in all, not four
    sine_runs = [t for t in sweep.runs if t[1] == "sine"]
    assert len(sine_runs) == 3
    later_run = sweep.run_dir(("cnn_small", "sine", 0, 2, later["lam"], 4, None))
    plain = sweep.run_dir(("cnn_small", "none", 0, None, None, None, None)) / "checkpoints"
    branch = max(int(p.name) for p in plain.iterdir() if p.name.isdigit() and int(p.name) <= 4)
    epochs = [m["epoch"] for m in read_jsonl(later_run / "metrics.jsonl")]
    assert epochs == list(range(branch + 1, 6))  # from the plain run's checkpoint before 4
    assert (tmp_path / "w" / "search" / "cnn_small_sine.json").exists()
    assert rows[0]["lam"] is None  # the plain run has no lambda
    # the reference a lambda must beat: the plain run scored as a trial is, at the same K
    plain = search["plain"]
    assert 0 <= plain["holdout_pre_tuning_accuracy"] <= 1
    run = sweep.runs[study.Cell("cnn_small", "none", 2, 0, "kmeans").training][0]
    holdout = run.trainer.device_data(sweep.holdout)
    fp = run.trainer.evaluate(run.state, data=holdout)["accuracy"]
    assert plain["holdout_fp_accuracy"] == pytest.approx(fp, abs=1e-6)

    def rescored(*_):
        raise AssertionError("the plain reference on file is scored again")

    monkeypatch.setattr(study.Sweep, "plain_score", rescored)
    study.main(argv)  # every cell trains nothing new; the page shows the search
    monkeypatch.undo()  # a new family's search (cosine's, below) scores the plain run
    page = (tmp_path / "out" / "table.md").read_text()
    assert "| sine | " in page and f"**{best['lam']:g}** = " in page
    assert f"(what a lambda must beat): {plain['holdout_pre_tuning_accuracy']:.3f}" in page
    assert "lambda_search" not in (tmp_path / "out" / "table.csv").read_text()
    with pytest.raises(SystemExit, match="no checkpoint at or before epoch 1"):
        study.main([*argv, "--search-start-epochs", "1,4", "--methods", "cosine"])
    assert study.main([*argv, "--histograms"]) == 0  # plain against sine, one layer
    assert "table_weights_cnn_small.png)" in (tmp_path / "out" / "table.md").read_text()
    plan = study.main([*argv, "--plan", "--images-per-second", "cnn_small=1000"])
    assert plan == 0 and "lambda search 0." in capsys.readouterr().out


def test_the_budget_stops_a_search_between_its_trials_and_the_next_command_goes_on(
    tmp_path, capsys
):
    argv, args, sweep = searched_sweep(tmp_path, "sine", 4, "--search-lambdas", "0.1,1")
    # the first trial always runs (progress); the second would pass a budget of 0 minutes
    study.main([*argv, "--max-minutes", "0"])
    out = capsys.readouterr().out
    assert "budget: stopped before the cnn_small sine: search trial lambda" in out
    assert "budget of 0.0 min reached: 1 cells left" in out
    path = tmp_path / "w" / "search" / "cnn_small_sine.json"
    first = json.loads(path.read_text())["trials"]
    assert len(first) == 1 and not list((tmp_path / "w" / "cells").glob("*.json"))
    study.main(argv)  # goes on from the trial on file
    search = json.loads(path.read_text())
    assert search["trials"][0] == first[0] and len(search["trials"]) == 2
    assert (tmp_path / "w" / "cells" / "cnn_small_sine_k2_s0.json").exists()


def test_background_lowers_the_process_and_its_sessions_autogroup():
    """In a child process (a lowered priority cannot be raised again): nice 19, and where
    the kernel schedules by autogroup, the session's autogroup at 19 too."""
    code = (
        "import os, sys; sys.path.insert(0, 'experiments'); import cifar10_study as s; "
        "print(s.lowest_priority()); print(os.nice(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
        start_new_session=True,  # its own autogroup, as a study started with setsid/nohup
    ).stdout.splitlines()  # fmt: skip
    assert out[-1] == "19"
    if Path("/proc/self/autogroup").exists() and "unchanged" not in out[0]:
        assert out[0].endswith("nice 19") and "autogroup" in out[0]


def test_a_later_k_reuses_the_plain_run_and_the_search_of_an_earlier_sweep(tmp_path, capsys):
    """A larger K added after a finished sweep, as the cpu-full study adds K = 8 to its
    K = 4, 2 cells: an invocation of its own (a sweep pads K to its largest, reg.k_max)
    reuses the plain and gradient-L1 runs, which pad nothing, and the searches on file at
    their K (--search-k), and leaves the earlier cells as they are."""
    argv, _, _ = searched_sweep(tmp_path, "none,gradient_l1,nearest", 4, "--search-lambdas", "1")
    study.main(argv)  # K = 2: k_max 2
    work = tmp_path / "w"
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    later = [*argv[: argv.index("--ks")], "--ks", "4", *argv[argv.index("--ks") + 2 :]]
    with pytest.raises(SystemExit, match="searches at K = 4: pass --search-k 2"):
        study.main(later)
    capsys.readouterr()
    study.main([*later, "--search-k", "2"])
    out = capsys.readouterr().out
    assert "   search " not in out  # every trial on file
    # the plain and gradient-L1 runs restored, not retrained (their config.json and
    # summary.json still say what they trained with), the K = 2 cells untouched
    assert [p for p in before if p.read_bytes() != before[p]] == []
    assert any("cnn_small_gradient_l1_kany" in str(p) for p in before)
    rows = {p.name: json.loads(p.read_text()) for p in (work / "cells").glob("*_k4_s0.json")}
    methods = ("none+kmeans", "none+uniform", "gradient_l1", "nearest")
    assert set(rows) == {f"cnn_small_{m}_k4_s0.json" for m in methods}
    k2 = json.loads((work / "cells" / "cnn_small_gradient_l1_k2_s0.json").read_text())
    assert rows["cnn_small_gradient_l1_k4_s0.json"]["train_seconds"] == k2["train_seconds"]
    nearest = rows["cnn_small_nearest_k4_s0.json"]
    assert nearest["lam"] == nearest["lambda_search"]["lam"]  # the K = 2 search's choice
    run = work / f"cnn_small_nearest_k4_s0_lam{nearest['lam']:g}" / "train"
    assert json.loads((run / "config.json").read_text())["reg"]["k_max"] == 4


def test_the_pages_note_is_read_from_a_file_and_a_missing_one_is_one_error(tmp_path, capsys):
    note = tmp_path / "note.md"
    note.write_text("Opening paragraph.\n")
    assert study.parse_args(["--note-file", str(note)]).note == "Opening paragraph."
    with pytest.raises(SystemExit):
        study.parse_args(["--note-file", str(tmp_path / "absent.md")])
    assert "absent.md: No such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse_args(["--search-k", "1"])
