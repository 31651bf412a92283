"""tune.py: a tiny study on synthetic data, its resume, pruning through Ignite, bad input."""

import json
import subprocess
import sys

import optuna
import pytest

import train
import tune
from conftest import ROOT


def run_tune(tmp_path, data_dir, *args):
    command = [sys.executable, str(ROOT / "tune.py"), "--dataset=ml-100k", f"--data_dir={data_dir}",
               "--download=False", "--epochs=2", "--dim=8", "--study=tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_a_tiny_study_chooses_on_validation_writes_best_and_resumes(tmp_path, synthetic_ml100k):
    first = run_tune(tmp_path, synthetic_ml100k, "--trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    database = tmp_path / "runs" / "tiny" / "study.db"
    assert database.is_file()
    best = json.loads((tmp_path / "results" / "tiny" / "best.json").read_text())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{database}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert best["validation"] == min(t.value for t in done) and best["direction"] == "minimize"
    assert best["command"].startswith("python train.py ") and "--dim=8" in best["command"]
    assert "--n_tastes=" in best["command"] and best["command"] in first.stdout
    # Each trial is a train.py run with its own curves under runs/<study>/.
    for trial in study.trials:
        assert list((tmp_path / "runs" / "tiny" / f"trial-{trial.number}").glob("events.out.tfevents.*"))
    retrained = json.loads((tmp_path / "results" / "tiny" / f"best-trial-{best['trial']}" / "summary.json").read_text())
    assert retrained["val_mse"] == pytest.approx(best["validation"], abs=1e-6)  # the same seeded run
    assert best["test_of_retrained"]["test_mse"] == retrained["test_mse"]
    first_params = [t.params for t in study.trials]  # the study object reads the live database

    again = run_tune(tmp_path, synthetic_ml100k, "--trials=5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trials so far, 2 to run" in again.stdout
    resumed = optuna.load_study(study_name="tiny", storage=f"sqlite:///{database}")
    assert len(resumed.trials) == 5
    assert [t.params for t in resumed.trials[:3]] == first_params


def test_an_unpromising_trial_is_pruned_through_ignite(tmp_path, synthetic_ml100k):
    """A pruner that prunes every reported MSE above 0: the handler on the validation evaluator
    must stop the training after the first epoch and mark the trial pruned."""
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    base = train.resolve_config([f"--data_dir={synthetic_ml100k}", "--dataset=ml-100k"])
    fixed = {"dataset": "ml-100k", "data_dir": str(synthetic_ml100k), "download": False,
             "epochs": 5, "dim": 8}
    study.optimize(lambda trial: tune.run_trial(trial, fixed, base, tmp_path / "runs", tmp_path / "results"),
                   n_trials=1)
    [trial] = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # pruned at epoch 1 of 5
    assert not (tmp_path / "results" / "trial-0" / "summary.json").exists()


@pytest.mark.parametrize("arg,message", [
    ("--learning_rate=0.1", "unknown hyperparameter 'learning_rate'"),
    ("--run_name=x", "--run_name is decided by tune.py"),
    ("--trials=0", "--trials must be positive"),
])
def test_bad_tune_input_is_one_clear_line(tmp_path, synthetic_ml100k, arg, message):
    done = run_tune(tmp_path, synthetic_ml100k, arg)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
