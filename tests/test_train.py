"""train.py end to end, as a subprocess on a small synthetic MovieLens folder."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_train(tmp_path, data_dir, *overrides, check=True):
    args = [sys.executable, str(ROOT / "train.py"), "--dataset=ml-100k", f"--data_dir={data_dir}",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
            "--download=False", "--progress=False", "--batch_size=512", "--dim=8",
            "--n_tastes=3", "--log_interval=2", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_writes_events_checkpoints_and_results(tmp_path, synthetic_ml100k):
    result = run_train(tmp_path, synthetic_ml100k, "--epochs=3", "--run_name=first", "--eval_train=True")
    run_dir, results = tmp_path / "runs" / "first", tmp_path / "results" / "first"
    assert len(list(run_dir.glob("last_checkpoint_*.pt"))) == 1
    assert len(list(run_dir.glob("best_model_*.pt"))) == 1
    assert json.loads((run_dir / "config.json").read_text())["n_tastes"] == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train_step/loss", "train_step/mse", "train_step/prior_tastes",
                "train_step/prior_attention", "train_step/prior_items", "train_step/prior_biases"}
    expected |= {f"{split}/{m}" for split in ("train", "val", "test") for m in ("mse", "rmse", "mae")}
    assert expected <= tags, expected - tags
    # Ignite's launcher no longer announces "Run '<function training at 0x...>' in 1 processes".
    assert "<function" not in result.stdout + result.stderr
    assert [e.step for e in events.Scalars("val/mse")] == [1, 2, 3]
    assert list((run_dir / "hparams").rglob("events.out.tfevents.*"))

    summary = json.loads((results / "summary.json").read_text())
    for key in ("test_mse", "test_rmse", "test_mae", "best_epoch", "epochs_run", "wall_seconds",
                "dataset", "world_size", "backend"):
        assert key in summary, key
    assert summary["epochs_run"] == 3 and summary["dataset"] == "ml-100k"
    assert summary["hyperparameters"]["dim"] == 8 and summary["world_size"] == 1
    assert abs(summary["test_rmse"] ** 2 - summary["test_mse"]) < 1e-6
    rows = read_csv(results / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = min(rows, key=lambda r: float(r["val_mse"]))
    assert summary["best_epoch"] == int(best["epoch"])
    # The summary's test figures are those of the best-by-validation model.
    assert abs(summary["test_mse"] - float(best["test_mse"])) < 1e-6
    assert float(rows[-1]["train_mse"]) < float(rows[0]["train_mse"])
    for name in ("train_mse.svg", "test_mse.svg"):
        text = (results / name).read_text()
        assert "<svg" in text and "</svg>" in text


def test_eval_every_evaluates_every_nth_epoch_and_the_last_and_chooses_among_them(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=5", "--eval_every=2", "--patience=0", "--run_name=sparse")
    rows = read_csv(tmp_path / "results" / "sparse" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5] and all(r["train_loss"] for r in rows)
    evaluated = [r for r in rows if r["val_mse"]]
    assert [int(r["epoch"]) for r in evaluated] == [2, 4, 5]
    assert all(r["test_mse"] for r in evaluated)
    summary = json.loads((tmp_path / "results" / "sparse" / "summary.json").read_text())
    best = min(evaluated, key=lambda r: float(r["val_mse"]))
    assert summary["best_epoch"] == int(best["epoch"])
    assert abs(summary["val_mse"] - float(best["val_mse"])) < 1e-6
    [best_file] = (tmp_path / "runs" / "sparse").glob("best_model_*.pt")
    assert best_file.name.startswith(f"best_model_{best['epoch']}_")


def test_resume_continues_to_the_same_model_as_an_uninterrupted_run(tmp_path, synthetic_ml100k, monkeypatch):
    """Interrupted after epoch 2 of 4 and resumed: the same curves as 4 straight epochs, the
    learning-rate schedule, the implicit term's negatives and the shuffling included."""
    from ignite.engine import Events

    import train
    args = ["--dataset=ml-100k", f"--data_dir={synthetic_ml100k}", "--download=False", "--progress=False",
            "--batch_size=512", "--dim=8", "--n_tastes=3", "--epochs=4", "--patience=0",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]
    assert train.main(args + ["--run_name=straight"]) == 0
    save_and_resume = train.save_and_resume

    def interrupted_after_epoch_2(cfg, to_save, *args):
        saved = save_and_resume(cfg, to_save, *args)

        @to_save["trainer"].on(Events.EPOCH_COMPLETED(once=2))
        def stop(_):  # after the epoch's checkpoint was written
            raise KeyboardInterrupt

        return saved

    with monkeypatch.context() as patched:
        patched.setattr(train, "save_and_resume", interrupted_after_epoch_2)
        assert train.main(args + ["--run_name=split"]) == 130
    assert train.main([f"--resume={tmp_path / 'runs' / 'split'}"]) == 0
    straight = read_csv(tmp_path / "results" / "straight" / "metrics.csv")
    split = read_csv(tmp_path / "results" / "split" / "metrics.csv")
    assert [int(r["epoch"]) for r in split] == [1, 2, 3, 4]
    for a, b in zip(straight, split):
        for key in ("train_loss", "val_mse", "test_mse"):
            assert abs(float(a[key]) - float(b[key])) < 1e-6, (a["epoch"], key)
    summary = json.loads((tmp_path / "results" / "split" / "summary.json").read_text())
    assert summary["epochs_run"] == 4 and summary["hyperparameters"]["batch_size"] == 512


def test_the_end_reads_the_chosen_model_from_disk_only_when_it_is_not_the_last_epochs(tmp_path, synthetic_ml100k, monkeypatch):
    """The model in memory after the last epoch is that epoch's: reading its checkpoint again
    only doubled the run's peak memory at the end (issue 46). An earlier chosen epoch is read."""
    import runs
    import train
    reads, read_checkpoint = [], runs.read_checkpoint
    monkeypatch.setattr(runs, "read_checkpoint", lambda path: reads.append(Path(path).name) or read_checkpoint(path))
    args = ["--dataset=ml-100k", f"--data_dir={synthetic_ml100k}", "--download=False", "--progress=False",
            "--batch_size=512", "--dim=8", "--n_tastes=3", "--epochs=3", "--patience=0", "--lr_decay=0",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]
    for name, lr, chosen in (("last", 0.3, 3), ("earlier", 0.1, 1)):  # lr 0.1 overshoots after epoch 1 here
        reads.clear()
        assert train.main(args + [f"--run_name={name}", f"--lr={lr}"]) == 0
        summary = json.loads((tmp_path / "results" / name / "summary.json").read_text())
        assert summary["best_epoch"] == chosen
        assert any(r.startswith("best_model") for r in reads) == (chosen != 3), reads
        rows = read_csv(tmp_path / "results" / name / "metrics.csv")
        assert summary["test_mse"] == pytest.approx(float(rows[chosen - 1]["test_mse"]))


def test_resume_refuses_settings_its_checkpoint_fixes(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=fixed")
    refused = run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'fixed'}",
                        "--epochs=2", "--lr=0.5", check=False)
    assert refused.returncode == 2 and "lr cannot change when resuming" in refused.stderr


@pytest.mark.parametrize("override,message", [
    ("--learning_rate=0.1", "unknown hyperparameter 'learning_rate'"),
    ("--epochs=three", "--epochs takes a whole number"),
    ("--lr=fast", "--lr takes a number"),
    ("--download=maybe", "--download takes true or false"),
    ("--dataset=ml-2m", "unknown dataset 'ml-2m': neither a MovieLens name (ml-100k"),
    ("--batch_size=-5", "--batch_size must not be negative"),
    ("epochs=3", "arguments are --key=value"),
    ("--resume=nowhere", "no run there"),
    ("--device=gpu", "--device=gpu is not a device"),
    ("--prior_per=rows", "--prior_per=rows is not one of row, pair"),
    ("--prior_biases=-1.0", "--prior_biases must not be negative"),
    ("--val_fraction=0.00001", "too few to split"),
    ("--test_fraction=1", "must lie in [0, 1)"),
    ("--val_fraction=-0.1", "must lie in [0, 1)"),
    ("--implicit_share=1.5", "--implicit_share is a share of the epochs, from 0 to 1"),
    ("--mixed_precision=bfloat16", "the rating task and the sampled losses run through the fused node"),
    ("--split_seed=-1", "--split_seed must lie between 0 and 2**32 - 1"),
    ("--seed=18446744073709551617", "--seed must lie between 0 and 2**64 - 1"),
    ("--device=mps", "--device=mps: MPS is not available on this machine"),
    ("--device=meta", "--device=meta is not a device to train on"),
    ("--device=cpu:0x", "--device=cpu:0x is not a device"),
    ("--dim=100000000000", "training it needs"),
])
def test_bad_overrides_fail_with_one_clear_message(tmp_path, synthetic_ml100k, override, message):
    result = run_train(tmp_path, synthetic_ml100k, "--epochs=1", override, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before any folder is made: nothing is left for recommend.py to trip on.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_an_existing_run_is_not_overwritten(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=kept")
    before = sorted(p.name for p in (tmp_path / "runs" / "kept").iterdir())
    again = run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=kept", check=False)
    assert again.returncode == 2 and "--resume=" in again.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "kept").iterdir()) == before


def test_missing_data_without_download_is_a_clear_error(tmp_path):
    result = run_train(tmp_path, tmp_path / "empty", "--epochs=1", check=False)
    assert result.returncode == 2
    assert "by hand" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path, synthetic_ml100k):
    # A constant lr: a finished run may then go on (a warm-down's run may not: the next test).
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--patience=0", "--run_name=done", "--lr_decay=0")
    run_dir = tmp_path / "runs" / "done"
    for epochs in (2, 1):  # as many epochs as were run, and fewer
        again = run_train(tmp_path, synthetic_ml100k, f"--resume={run_dir}", f"--epochs={epochs}")
        assert "nothing to do" in again.stdout and "larger --epochs" in again.stdout
        assert "Traceback" not in again.stderr
    rows = read_csv(tmp_path / "results" / "done" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    more = run_train(tmp_path, synthetic_ml100k, f"--resume={run_dir}", "--epochs=3")
    assert "best epoch" in more.stdout
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "results" / "done" / "metrics.csv")] == [1, 2, 3]
    # Finished twice, the run still has one entry in TensorBoard's projector.
    assert (run_dir / "projector_config.pbtxt").read_text().count("embeddings {") == 1
    assert "Embedding dir exists" not in more.stdout + more.stderr


def test_a_longer_resume_is_refused_where_the_run_has_followed_its_own_length(tmp_path, synthetic_ml100k):
    """2 epochs resumed to 4 must be a 4-epoch run: once the warm-down of a 2-epoch run has
    begun (or, with a constant lr, the implicit term has stopped), it cannot be; refused in one
    line that says what to run. Before that point, the longer run continues exactly."""
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--patience=0", "--run_name=warm")
    refused = run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'warm'}", "--epochs=4",
                        check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "warm-down of a 2-epoch run" in refused.stderr and "start a new run with --epochs=4" in refused.stderr
    run_train(tmp_path, synthetic_ml100k, "--epochs=5", "--patience=0", "--run_name=term", "--lr_decay=0")
    refused = run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'term'}", "--epochs=10",
                        check=False)
    assert refused.returncode == 2 and "implicit term stopped after epoch 4" in refused.stderr


def test_extending_a_run_whose_last_epoch_was_evaluated_only_as_last_is_refused(tmp_path, synthetic_ml100k):
    """eval_every=2 over 3 epochs evaluates epoch 3 because it is the last; a 4-epoch run would
    not have evaluated it (and that evaluation may have chosen the model or counted for
    patience), so going on to 4 would not be the run straight through. A run whose epochs are a
    multiple of eval_every goes on."""
    common = ("--patience=0", "--lr_decay=0", "--implicit_weight=0", "--eval_every=2")
    run_train(tmp_path, synthetic_ml100k, "--epochs=3", "--run_name=odd", *common)
    refused = run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'odd'}", "--epochs=4",
                        check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "epoch 3 was evaluated because it was the last" in refused.stderr
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--run_name=even", *common)
    run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'even'}", "--epochs=4")
    rows = read_csv(tmp_path / "results" / "even" / "metrics.csv")
    assert [bool(r.get("val_mse")) for r in rows] == [False, True, False, True]


def test_resume_may_turn_early_stopping_on(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--patience=0", "--run_name=p", "--lr_decay=0")
    run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'p'}", "--epochs=2",
              "--patience=2")
    summary = json.loads((tmp_path / "results" / "p" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["hyperparameters"]["patience"] == 2


def test_a_nested_run_name_survives_resume(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=exp/a", "--lr_decay=0")
    run_train(tmp_path, synthetic_ml100k, "--resume=runs/exp/a", "--epochs=2")
    assert json.loads((tmp_path / "runs" / "exp" / "a" / "config.json").read_text())["run_name"] == "exp/a"
    rows = read_csv(tmp_path / "results" / "exp" / "a" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert not (tmp_path / "results" / "a").exists()


def test_a_diverged_run_fails_keeps_no_nan_results_and_its_folder_is_reusable(tmp_path, synthetic_ml100k):
    # Adam at lr 1e30 overflows the scores in the first steps: TerminateOnNan stops epoch 1.
    failed = run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--lr=1e30", "--run_name=nan",
                       check=False)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "training diverged" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "results" / "nan" / "summary.json").exists()
    assert not list((tmp_path / "runs" / "nan").glob("*.pt"))
    again = run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=nan")
    assert "test MSE" in again.stdout
    assert len(list((tmp_path / "runs" / "nan").glob("events.out.tfevents.*"))) == 1


def test_resume_takes_the_highest_epoch_and_keeps_one_checkpoint(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--patience=0", "--run_name=pick", "--lr_decay=0")
    run_dir = tmp_path / "runs" / "pick"
    # A copied folder: an older epoch's file that looks newest by time, and is not even valid.
    (run_dir / "last_checkpoint_1.pt").write_bytes(b"an older, damaged copy")
    run_train(tmp_path, synthetic_ml100k, f"--resume={run_dir}", "--epochs=3")
    assert sorted(p.name for p in run_dir.glob("last_checkpoint_*.pt")) == ["last_checkpoint_3.pt"]
    assert len(list(run_dir.glob("best_*.pt"))) == 1


def test_a_damaged_checkpoint_is_named(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=broken")
    [checkpoint] = (tmp_path / "runs" / "broken").glob("last_checkpoint_*.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated
    result = run_train(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'broken'}",
                       "--epochs=2", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{checkpoint} is damaged" in result.stderr


def test_a_folder_of_other_files_is_not_taken_for_a_run(tmp_path, synthetic_ml100k):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("keep me")
    result = run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=mine", check=False)
    assert result.returncode == 2 and "not a run's (notes.txt)" in result.stderr
    assert (tmp_path / "runs" / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("key", ["runs_dir", "results_dir"])
def test_an_output_folder_that_cannot_be_made_is_one_clear_line(tmp_path, synthetic_ml100k, key):
    blocker = tmp_path / "a-file"  # a folder below a file cannot be made, even by root
    blocker.write_text("not a folder")
    result = run_train(tmp_path, synthetic_ml100k, "--epochs=1", f"--{key}={blocker / 'out'}",
                       check=False)
    assert result.returncode == 2 and f"cannot create {blocker / 'out'}" in result.stderr
    assert "Not a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("prior_per", ["row", "pair"])
def test_a_row_prior_counts_each_user_and_item_once_per_epoch(prior_per):
    """prior_per="row": over an epoch the prior is sum over rows of |row|^2 / n_train, the same
    for a user with 2 ratings as for one with 40; "pair": each rating adds its rows' norms."""
    import torch

    import loader
    import tasks
    import train
    from conftest import mixture_ratings
    from MFMixTaste import MFMixTaste

    users, items, ratings = mixture_ratings(n_users=40, n_items=30, n_ratings=600)
    data = loader.encode(users, items, ratings)
    cfg = {**train.DEFAULTS, "prior_per": prior_per, "batch_size": 10_000}
    task = tasks.RatingTask(cfg, data, "cpu", 0, 1)
    model = MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2, init_std=1.0)
    [batch] = list(task.batches)  # the whole training set
    train_users, train_items = batch[0], batch[1]
    _, norms, _, _ = task.loss(model, batch)
    user_norms = model.tastes.detach().pow(2).sum((1, 2))
    item_norms = model.item_factors.detach().pow(2).sum(1)
    if prior_per == "row":
        expected = (user_norms[train_users.unique()].sum(), item_norms[train_items.unique()].sum())
        expected = [value / len(train_users) for value in expected]
    else:
        expected = user_norms[train_users].mean(), item_norms[train_items].mean()
    torch.testing.assert_close(norms[0], expected[0])
    torch.testing.assert_close(norms[2], expected[1])


@pytest.mark.parametrize("task_name", ["rating", "ranking"])
def test_an_evaluation_runs_without_the_last_steps_gradients(task_name, tmp_path):
    """The tables' gradients (0.45 GB at ML-25M's shape) are not held through an evaluation:
    the evaluators run with none, after a step that moved the model."""
    import torch
    from ignite.engine import Events

    import loader
    import tasks
    import train
    from conftest import mixture_ratings

    users, items, ratings = mixture_ratings(n_users=40, n_items=30, n_ratings=600)
    data = loader.encode(users, items, ratings)
    cfg = {**train.DEFAULTS, **(train.RANKING_DEFAULTS if task_name == "ranking" else {}), "task": task_name,
           "ranking_core": 1, "dim": 8, "eval_every": 1}
    task = tasks.TASKS[task_name](cfg, data, "cpu", 0, 1)
    model, _, trainer = train.build_trainer(cfg, task, torch.device("cpu"))
    evaluators = train.evaluate_each_epoch(cfg, task, model, trainer, tmp_path)[0]
    held = []
    for _, evaluator in evaluators:
        evaluator.add_event_handler(Events.STARTED, lambda _: held.append(
            [parameter.grad is not None for parameter in model.parameters()]))
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer.run(task.batches, max_epochs=1, epoch_length=1)
    assert held and not any(any(flags) for flags in held)
    assert any(not torch.equal(old, parameter) for old, parameter in zip(before, model.parameters()))


def test_a_run_never_overwrites_the_results_of_a_run_in_another_runs_dir(tmp_path, synthetic_ml100k):
    run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=x")
    summary = (tmp_path / "results" / "x" / "summary.json").read_text()
    other = run_train(tmp_path, synthetic_ml100k, "--epochs=1", "--run_name=x",
                      f"--runs_dir={tmp_path / 'runsB'}", "--lr=0.05", check=False)
    assert other.returncode == 2 and "already holds the results of a run" in other.stderr
    assert (tmp_path / "results" / "x" / "summary.json").read_text() == summary
    assert not (tmp_path / "runsB" / "x").exists()


def test_an_interruption_during_the_final_writes_leaves_a_run_that_resume_finishes(
        tmp_path, synthetic_ml100k, monkeypatch, capsys):
    """Ctrl-C after the last epoch, while the run writes its pictures: --resume finishes it."""
    import pictures
    import train
    from recommend import Recommender
    args = ["--dataset=ml-100k", f"--data_dir={synthetic_ml100k}", "--download=False",
            "--progress=False", "--dim=8", "--epochs=2", "--patience=0", "--run_name=cut",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(pictures, "run_pictures", interrupted)
        assert train.main(args) == 130
    run_dir, results = tmp_path / "runs" / "cut", tmp_path / "results" / "cut"
    assert not (results / "summary.json").exists()  # not finished, so resumable
    assert train.main([f"--resume={run_dir}"]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert (results / "summary.json").is_file() and (results / "taste_weights.svg").is_file()
    assert Recommender.load(run_dir).recommend(3, n=2)["item_id"].size == 2
    assert train.main([f"--resume={run_dir}"]) == 0 and "nothing to do" in capsys.readouterr().out


def test_an_early_stopped_run_names_the_metric_that_stopped_it():
    from types import SimpleNamespace

    import runs
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=7))
    stopper = SimpleNamespace(counter=3, patience=3)
    said = runs.epochs_left(trainer, stopper, {"epochs": 60}, "NDCG@10")
    assert "no better validation NDCG@10 in 3 evaluations" in said


def test_the_implicit_term_is_logged_and_can_be_turned_off(tmp_path, synthetic_ml100k):
    """On (the default), the term has its own curve beside the prior terms; off, no negatives
    are drawn and nothing is logged for it; on, the synthetic set's validation MSE differs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import tasks
    import train
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--run_name=on")
    run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--run_name=off", "--implicit_weight=0")
    tags = {name: set(EventAccumulator(str(tmp_path / "runs" / name)).Reload().Tags()["scalars"])
            for name in ("on", "off")}
    assert "train_step/implicit" in tags["on"] and "train_step/implicit" not in tags["off"]
    assert {"train_step/mse", "train_step/prior_attention"} <= tags["on"] & tags["off"]
    on, off = (read_csv(tmp_path / "results" / name / "metrics.csv") for name in ("on", "off"))
    assert on[-1]["val_mse"] != off[-1]["val_mse"]
    import loader
    cfg = train.resolve_config(["--implicit_weight=0"])
    task = tasks.RatingTask(cfg, loader.load("ml-100k", synthetic_ml100k, allow_download=False), "cpu", 0, 1)
    assert type(task.batches) is loader.BatchIterator and list(task.term_weights) == ["mse"]


def test_the_rating_task_can_share_the_taste_prior(synthetic_ml100k):
    """--share_taste_prior reaches the rating task's loss: a batch's taste prior is sum over its
    pairs of the user's row weight times sum_k w_k |U_k|^2 (shared) or sum_k |U_k|^2 (not)."""
    import torch

    import loader
    import tasks
    import train
    from MFMixTaste import MFMixTaste
    data = loader.load("ml-100k", synthetic_ml100k, allow_download=False)
    for shared in (True, False):
        cfg = train.resolve_config([f"--share_taste_prior={shared}", "--n_tastes=3", "--dim=8"])
        task = tasks.RatingTask(cfg, data, "cpu", 0, 1)
        torch.manual_seed(0)
        model = MFMixTaste(task.n_users, task.n_items, dim=8, n_tastes=3, init_std=0.5)
        batch = next(iter(task.batches))
        users, items = batch[:2]
        taste_norms = model.tastes[users].pow(2).sum(-1)                          # (B, K)
        if shared:
            taste_norms = taste_norms * model.mixture_weights(users, items)
        expected = task.prior_scale[0][users] @ taste_norms.sum(1) / len(users)
        torch.testing.assert_close(task.loss(model, batch)[1][0], expected)


def test_the_implicit_term_stops_after_its_share_of_the_epochs(tmp_path, synthetic_ml100k):
    """implicit_share=0.5 of 4 epochs: the term is logged in epochs 1 and 2 only, the squared
    error in all four; with 0.75 of 4, through epoch 3."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for share, carried in ((0.5, 2), (0.75, 3)):
        name = f"share{carried}"
        run_train(tmp_path, synthetic_ml100k, "--epochs=4", "--patience=0", "--log_interval=1",
                  f"--implicit_share={share}", f"--run_name={name}")
        events = EventAccumulator(str(tmp_path / "runs" / name)).Reload()
        steps = {tag: [e.step for e in events.Scalars(tag)] for tag in ("train_step/implicit", "train_step/mse")}
        per_epoch = len(steps["train_step/mse"]) // 4
        assert max(steps["train_step/mse"]) == 4 * per_epoch
        assert max(steps["train_step/implicit"]) == carried * per_epoch


def test_help_lists_every_knob_with_its_defaults_and_comments(capsys):
    import train
    assert train.main(["--help"]) == 0 and train.main(["-h"]) == 0
    text = capsys.readouterr().out.split("usage:")[-1]
    for key, value in train.DEFAULTS.items():
        assert f"  --{key}={value}" in text, key
    assert "--dim=32" in text and "[ranking: 0]" in text and "[files: -inf]" in text
    assert "latent dimension d of tastes" in text and "python train.py --task=ranking" in text
    assert "\nmodel\n" in text and "\noptimisation\n" in text  # grouped as the top of train.py


def test_keys_take_a_space_a_bare_boolean_and_unknown_ones_name_the_closest(tmp_path):
    import runs
    import train
    cfg = train.resolve_config(["--epochs", "3", "--task", "ranking", "--eval_train", "--dim=7"])
    assert (cfg["epochs"], cfg["task"], cfg["eval_train"], cfg["dim"]) == (3, "ranking", True, 7)
    assert cfg["n_tastes"] == 2 and cfg["lr"] == train.RANKING_DEFAULTS["lr"]
    for argv, message in ((["--ntastes=3"], "did you mean --n_tastes"), (["--epochs"], "--epochs needs a value"),
                          (["--progress=maybe"], "takes true or false"), (["--epochs=3.5"], "takes a whole number"),
                          (["--frobnicate=1"], "--help lists them all")):
        with pytest.raises(runs.ConfigError, match=message):
            train.resolve_config(argv)


def test_a_redirected_log_has_one_line_an_epoch_and_no_progress_bar(tmp_path, synthetic_ml100k):
    args = [sys.executable, str(ROOT / "train.py"), "--dataset=ml-100k", f"--data_dir={synthetic_ml100k}",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}", "--download=False",
            "--batch_size=512", "--dim=4", "--epochs=3", "--eval_every=2", "--patience=0"]  # progress left on
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout + done.stderr and "Iteration" not in done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "val MSE" not in lines[0] and "val MSE" in lines[1] and "(best " in lines[2]
    assert done.stdout.splitlines()[0].startswith(str(synthetic_ml100k))  # what was read, first


def test_user_results_are_ignored_by_git_and_the_reference_runs_are_not():
    import shutil
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "results/my-run/summary.json", "results/ml-1m-default/summary.json",
                              "results/benchmark.md"], capture_output=True, text=True, cwd=ROOT)
    assert ignored.stdout.split() == ["results/my-run/summary.json"]


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_fit_on_all_the_data_has_no_test_set_and_its_last_epoch_is_the_model(tmp_path, synthetic_ml100k, task):
    """--test_fraction=0 --val_fraction=0: every row trains, nothing stops early, the last epoch is
    the model, the summary says there are no test figures, and the run folder answers."""
    extra = ["--task=ranking", "--eval_every=1"] if task == "ranking" else []
    result = run_train(tmp_path, synthetic_ml100k, "--epochs=3", "--test_fraction=0", "--val_fraction=0",
                       "--run_name=all", *extra)
    assert "no test set" in result.stdout and "the last epoch, 3, is the model" in result.stdout
    summary = json.loads((tmp_path / "results" / "all" / "summary.json").read_text())
    assert not [k for k in summary if k.startswith(("test_", "val_")) and k != "test_set"]
    assert "no test figures" in summary["test_set"]
    assert summary["best_epoch"] == 3 and summary["n_test"] == summary["n_val"] == 0
    assert [p.name for p in (tmp_path / "runs" / "all").glob("best_*.pt")] == ["best_model_3.pt"]
    from recommend import Recommender
    run = Recommender.load(tmp_path / "runs" / "all")
    assert len(run.recommend(int(run.user_ids[0]), n=3)) == 3
    # Without a test set but with validation, the model is still chosen on validation.
    chosen = run_train(tmp_path, synthetic_ml100k, "--epochs=2", "--test_fraction=0", "--run_name=val", *extra)
    assert "no test set" in chosen.stdout and "best epoch" in chosen.stdout
