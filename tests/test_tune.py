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

    best_trial = next(t for t in study.trials if t.number == best["trial"])
    assert best["command"] == best_trial.user_attrs["command"]  # the trial's own command
    assert all(f"--{k}={v}" in best["command"] for k, v in best_trial.params.items())

    # The study keeps the knobs its first call fixed: a call may leave them out (they still
    # hold), never change them.
    changed = run_tune(tmp_path, synthetic_ml100k, "--trials=5", "--epochs=3")
    assert changed.returncode == 2 and "was started with --epochs=2" in changed.stderr
    assert "Traceback" not in changed.stderr
    again = subprocess.run([sys.executable, str(ROOT / "tune.py"), "--study=tiny", "--trials=5"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trials so far, 2 to run" in again.stdout
    resumed = optuna.load_study(study_name="tiny", storage=f"sqlite:///{database}")
    assert len(resumed.trials) == 5
    assert [t.params for t in resumed.trials[:3]] == first_params
    for trial in resumed.trials[3:]:  # the stored knobs, not train.py's defaults
        assert "--dataset=ml-100k" in trial.user_attrs["command"] and "--dim=8" in trial.user_attrs["command"]
        assert "--epochs=2" in trial.user_attrs["command"]


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
    ("--prune_warmup=-1", "--prune_warmup must not be negative"),
])
def test_bad_tune_input_is_one_clear_line(tmp_path, synthetic_ml100k, arg, message):
    done = run_tune(tmp_path, synthetic_ml100k, arg)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_the_same_command_names_the_same_study():
    first, _, _ = tune.parse(["--dataset=ml-100k", "--task=ranking"])
    again, _, _ = tune.parse(["--dataset=ml-100k", "--task=ranking"])
    assert first["study"] == again["study"] == "tune-ml-100k-ranking"


def test_the_space_leaves_out_what_a_trial_cannot_use():
    base = train.resolve_config([])
    # One taste: the attention's prior changes nothing, so it is not searched.
    fixed_one = optuna.trial.FixedTrial({"lr": 0.01, "dim": 16, "prior_tastes": 1.0,
                                         "prior_items": 1.0, "batch_size": 0})
    assert "prior_attention" not in tune.suggest(fixed_one, {"n_tastes": 1}, base)
    chosen_one = optuna.trial.FixedTrial({"lr": 0.01, "dim": 16, "n_tastes": 1, "prior_tastes": 1.0,
                                          "prior_items": 1.0, "batch_size": 0})
    assert tune.suggest(chosen_one, {}, base)["n_tastes"] == 1
    # Sampled ranking losses count their batches in interactions, the full softmax in users.
    for loss, sizes in (("bpr", tune.BATCH_SIZES["examples"]), ("softmax", tune.BATCH_SIZES["ranking"])):
        trial = optuna.create_study().ask()
        tune.suggest(trial, {}, train.resolve_config(["--task=ranking", f"--loss={loss}"]))
        assert list(trial.distributions["batch_size"].choices) == sizes


# The test drives trials by ask/tell, where Optuna warns that heartbeats are meant for optimize().
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_second_worker_does_not_fail_the_running_trials_of_the_first(tmp_path, monkeypatch):
    settings = {"study": "shared", "seed": 0, "prune_warmup": 2}
    found, _, _ = tune.open_study(settings, {}, tmp_path)
    alive = found.ask()  # the queued trial of the defaults
    found._storage.record_heartbeat(alive._trial_id)  # as a live worker's heartbeat thread does
    tune.open_study(settings, {}, tmp_path)  # a second worker joins
    [trial] = found.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.RUNNING
    # A worker that died stops beating: after the grace period its trial is failed.
    monkeypatch.setattr(tune, "HEARTBEAT_SECONDS", 1)
    import time
    time.sleep(3 * tune.HEARTBEAT_SECONDS + 1)
    tune.open_study(settings, {}, tmp_path)
    [trial] = found.get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.FAIL


def test_a_pruned_trial_is_not_reported_by_every_engine(tmp_path, synthetic_ml100k, caplog):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    base = train.resolve_config([f"--data_dir={synthetic_ml100k}", "--dataset=ml-100k"])
    fixed = {"dataset": "ml-100k", "data_dir": str(synthetic_ml100k), "download": False, "epochs": 3, "dim": 8}
    study.optimize(lambda trial: tune.run_trial(trial, fixed, base, tmp_path / "runs", tmp_path / "results"),
                   n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert not [r for r in caplog.records if "terminating due to exception" in r.getMessage()]


def test_an_interrupted_search_says_one_line(tmp_path, synthetic_ml100k):
    """Ctrl-C while a trial trains: one line, no traceback (Optuna's included), exit 130."""
    import signal
    command = [sys.executable, str(ROOT / "tune.py"), "--dataset=ml-100k", f"--data_dir={synthetic_ml100k}",
               "--download=False", "--study=cut", "--trials=3", "--epochs=500", "--patience=0", "--dim=8"]
    # SIGINT back at its default in the child: under a shell that started the tests in the
    # background (`pytest &`), it is ignored and the child would never see the Ctrl-C.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as tuning:
        for line in tuning.stdout:  # the first trial has started
            if line.startswith("trial 0: python train.py"):
                break
        tuning.send_signal(signal.SIGINT)
        _, stderr = tuning.communicate(timeout=120)
    assert tuning.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["interrupted: run the same command with --study=cut to continue"]


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_every_default_lies_inside_its_range_and_is_trial_zero(tmp_path, task):
    base = train.resolve_config([f"--task={task}"])
    space = tune.search_space(base)
    for key, (kind, *args) in space.items():
        if kind == "log":
            assert args[0] < base[key] < args[1], key
        else:
            assert base[key] in args[0], key
    found, _, _ = tune.open_study({"study": task, "seed": 0, "prune_warmup": 2}, {"task": task}, tmp_path)
    [queued] = found.trials
    assert queued.state == optuna.trial.TrialState.WAITING and queued.user_attrs["defaults"]
    assert queued.system_attrs["fixed_params"] == {k: base[k] for k in space}  # queued: not yet params


def test_the_defaults_are_trial_zero_and_best_json_says_what_they_scored(tmp_path, synthetic_ml100k):
    done = run_tune(tmp_path, synthetic_ml100k, "--trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((tmp_path / "results" / "tiny" / "best.json").read_text())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'study.db'}")
    first = study.trials[0]
    assert first.user_attrs["defaults"] and best["defaults_trial"] == 0
    assert first.params["lr"] == train.DEFAULTS["lr"] and first.params["n_tastes"] == train.DEFAULTS["n_tastes"]
    assert best["defaults_validation"] == first.value and best["validation"] <= first.value
    assert f"the defaults (trial 0): validation {first.value:.4f}" in done.stdout


def test_a_study_continues_with_its_name_alone(tmp_path, synthetic_ml100k):
    first = run_tune(tmp_path, synthetic_ml100k, "--trials=1", "--task=ranking", "--study=shop", "--eval_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([sys.executable, str(ROOT / "tune.py"), "--study=shop", "--trials=2"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 trials so far, 1 to run" in again.stdout and "--task=ranking" in again.stdout
