"""Search train.py's hyperparameters with Optuna, on validation data only.

    python tune.py --dataset=ml-1m --trials=50                      # rating: minimise validation MSE
    python tune.py --task=ranking --trials=30 --timeout=3600        # ranking: maximise validation NDCG@10
    python tune.py --study=mine --trials=80                         # an interrupted study continues
    optuna-dashboard sqlite:///runs/<study>/study.db                # watch it

Each trial is a real train.py training (train.training, the same code path as `python train.py`)
with its curves in runs/<study>/trial-<n>/; Optuna's pruning handler for Ignite stops unpromising
trials after any epoch. The study lives in runs/<study>/study.db, so a second call with the same
--study resumes it: --trials counts all its trials. At the end the best trial is printed as a
ready `python train.py ...` line, written to results/<study>/best.json, and trained once more to
report its test figures (results/<study>/best-trial-<n>/). The test set never chooses anything.

Any train.py --key=value is passed to every trial and fixes that knob (--task=ranking,
--epochs=20, --dataset=ml-100k, ...); a fixed knob is left out of the search.
"""

import gc
import json
import shutil
import sys
import warnings
from pathlib import Path

from ignite.engine import Events

import loader
import runs
import train

# -----------------------------------------------------------------------------
study = ""                 # study name: runs/<study>/study.db ("" = tune-<dataset>-<task>; a file: its name and a key)
trials = 20                # trials in the study in all, those of earlier calls included
timeout = 0                # stop starting new trials after this many seconds (0 = no limit)
seed = 0                   # seed of Optuna's sampler (TPE); each trial trains with train.py's seed
prune_warmup = 2           # epochs every trial runs before the pruner may stop it
# The search space, centred on the defaults the study's task and fixed knobs give (trial 0 is
# those defaults, so a study can only improve on them): a float knob is searched on a log scale
# within these factors of its default; a prior whose default is 0 (off) within PRIOR_RANGES.
FACTORS = {"lr": 5.0, "prior_tastes": 10.0, "prior_attention": 10.0, "prior_items": 10.0}
PRIOR_RANGES = {"row": (0.3, 100.0), "pair": (1e-3, 0.3)}  # a row's weight is worth that many ratings; a pair's is per rating
# Choices: d (0: from the data, the ranking default), tastes, and batch sizes: ratings, or
# interactions for the sampled ranking losses ("examples"; 0: sized to the data), and users for
# the full-softmax ranking loss ("ranking"; 0: 256 with the lr scaled).
DIMS = [0, 8, 16, 32, 64, 128, 256]
N_TASTES = [1, 2, 4]
BATCH_SIZES = {"examples": [0, 1024, 2048, 4096, 8192, 16384], "ranking": [0, 64, 128, 256, 512]}
# -----------------------------------------------------------------------------
TUNE_KEYS = ("study", "trials", "timeout", "seed", "prune_warmup")


def own_defaults():
    """This script's knobs (TUNE_KEYS) with their defaults from the top of the file."""
    return {k: globals()[k] for k in TUNE_KEYS}


def parse(argv):
    """--key=value (or --key value): this script's knobs above, and any of train.py's (fixed for
    every trial)."""
    own = own_defaults()
    mine, theirs = [], []
    for arg in runs.key_value_args(argv, {**train.DEFAULTS, **own}):
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        (mine if key in own else theirs).append(arg)
    settings = {**own, **runs.parse_overrides(mine, own)}
    fixed = runs.parse_overrides(theirs, train.DEFAULTS)
    for key in ("resume", "run_name", "runs_dir", "results_dir"):
        if key in fixed:
            raise runs.ConfigError(f"--{key} is decided by tune.py (runs/<study>/trial-<n>)")
    if settings["trials"] < 1:
        raise runs.ConfigError("--trials must be positive")
    for key in ("timeout", "prune_warmup"):
        if settings[key] < 0:
            raise runs.ConfigError(f"--{key} must not be negative, got {settings[key]}")
    base = train.resolve_config(arguments(fixed))  # checks the fixed knobs
    if base["val_fraction"] == 0:
        raise runs.ConfigError("--val_fraction=0 leaves tune.py nothing to choose on: it compares trials on "
                               "validation data")
    if not settings["study"]:  # the same command names the same study, so it continues
        settings["study"] = f"tune-{loader.dataset_label(base['dataset'])}-{base['task']}"  # a file: its name and path's key
    return settings, fixed, base


def arguments(knobs):
    return [f"--{k}={v}" for k, v in knobs.items()]


def settle_fixed(found, fixed, study_name):
    """The knobs this study fixes for all its trials: stored with the study by its first call.
    A later call may repeat them or leave them out, never change them, or its trials would mix
    settings (and data) under one best."""
    stored = found.user_attrs.get("fixed")
    if stored is None:
        found.set_user_attr("fixed", fixed)
        return fixed
    changed = sorted(k for k in fixed if fixed[k] != stored.get(k))
    if changed:
        key = changed[0]
        was = f"--{key}={stored[key]}" if key in stored else f"--{key} left at its default"
        raise runs.ConfigError(f"study {study_name} was started with {was}; this call gives "
                                f"--{key}={fixed[key]}: leave the study's fixed knobs as they were, "
                                "or pick another --study")
    return stored


def search_space(base):
    """knob -> ("log", low, high) | ("choice", [values]) around base, the defaults as the study's
    task and fixed knobs give them: every default lies inside its range."""
    def around(key):
        default = base[key]
        return ("log", default / FACTORS[key], default * FACTORS[key]) if default > 0 else \
            ("log", *PRIOR_RANGES[base["prior_per"]])

    dims = [d for d in DIMS if d or base["task"] == "ranking"]  # 0 means "from the data" for ranking only
    # n_tastes before prior_attention: a trial of one taste searches no attention prior.
    space = {"lr": around("lr"), "dim": ("choice", sorted(set(dims) | {base["dim"]})),
             "n_tastes": ("choice", sorted(set(N_TASTES) | {base["n_tastes"]})),
             **{key: around(key) for key in ("prior_tastes", "prior_attention", "prior_items")}}
    batch_sizes = BATCH_SIZES["ranking" if base["task"] == "ranking" and base["loss"] == "softmax" else "examples"]
    space["batch_size"] = ("choice", sorted(set(batch_sizes) | {base["batch_size"]}))
    return space


def searched(fixed, base, n_tastes):
    """The knobs a trial searches: the space minus what the command line fixed, and minus the
    attention's prior when the trial has one taste (its weight is then always 1)."""
    return {key: value for key, value in search_space(base).items() if key not in fixed
            and not (key == "prior_attention" and n_tastes == 1)}


def defaults_trial(fixed, base):
    """The knobs of trial 0: the defaults (base) of every searched knob; a data-derived default
    (dim=0, batch_size=0) stays 0, so the trial derives it from the data as train.py does."""
    return {key: base[key] for key in searched(fixed, base, fixed.get("n_tastes", base["n_tastes"]))}


def suggest(trial, fixed, base):
    """The trial's knobs: the space above, minus what the command line fixed."""
    chosen = {}
    for key, (kind, *args) in searched(fixed, base, None).items():
        if key == "prior_attention" and chosen.get("n_tastes", fixed.get("n_tastes")) == 1:
            continue
        if kind == "log":
            chosen[key] = trial.suggest_float(key, *args, log=True)
        else:
            chosen[key] = trial.suggest_categorical(key, args[0])
    return chosen


def command_line(params):
    return "python train.py " + " ".join(arguments(params))


def run_trial(trial, fixed, base, runs_dir, results_dir):
    """One trial: train.py's training with the suggested knobs, pruned through Ignite; returns
    the best epoch's validation score (MSE, or NDCG@k for ranking)."""
    from optuna_integration import PyTorchIgnitePruningHandler

    params = {**fixed, **suggest(trial, fixed, base)}
    trial.set_user_attr("command", command_line(params))
    print(f"trial {trial.number}: {command_line(params)}", flush=True)
    cfg = train.resolve_config(arguments(params) + [f"--runs_dir={runs_dir}", f"--results_dir={results_dir}",
                                                    f"--run_name=trial-{trial.number}", "--progress=False"])

    def attach(trainer, validation, task):
        handler = PyTorchIgnitePruningHandler(trial, f"val_{task.choose_by}", trainer)
        validation.add_event_handler(Events.COMPLETED, handler)

    try:
        train.training(0, cfg, attach)
    except runs.TrainingError as error:  # Optuna marks the trial failed; say why here
        print(f"trial {trial.number}: {error}", flush=True)
        raise
    finally:
        gc.collect()  # a pruned trial's engines and model, before the next trial builds its own
    summary = json.loads((results_dir / f"trial-{trial.number}" / "summary.json").read_text())
    return summary[f"val_ndcg@{cfg['top_k']}" if cfg["task"] == "ranking" else "val_mse"]


HEARTBEAT_SECONDS = 10  # a running trial's heartbeat; one silent for 3 beats was left by a dead process


def open_study(settings, fixed, runs_dir):
    """The study in runs/<study>/study.db (runs_dir), created or continued, with the knobs it
    fixes for every trial (a continued study's stored ones: settle_fixed) and the defaults they
    give. A new study's trial 0 is those defaults, so its best is never worse than them. Each
    running trial beats a heartbeat into the database (Optuna's RDBStorage): trials that a dead
    or interrupted process left running are marked failed (their folders stay for a look), while
    those of another worker still running on the same study go on."""
    import optuna

    runs_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9 (2021)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{runs_dir / 'study.db'}", heartbeat_interval=HEARTBEAT_SECONDS,
                                             grace_period=3 * HEARTBEAT_SECONDS)
        stored = next((s.user_attrs.get("fixed") for s in storage.get_all_studies() if s.study_name == settings["study"]),
                      None)
        if stored is not None:  # a continued study: its own knobs (--task, --dataset...) hold
            fixed = {**stored, **fixed}
        base = train.resolve_config(arguments(fixed))
        direction = "maximize" if base["task"] == "ranking" else "minimize"
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=settings["prune_warmup"])
        found = optuna.create_study(study_name=settings["study"], storage=storage,
                                    direction=direction, load_if_exists=True, pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=settings["seed"]))
        fixed = settle_fixed(found, fixed, settings["study"])
        if found.direction != optuna.study.StudyDirection[direction.upper()]:
            raise runs.ConfigError(f"study {settings['study']} was made for the other task: pick another --study")
        optuna.storages.fail_stale_trials(found)
        if not found.trials:
            found.enqueue_trial(defaults_trial(fixed, base), user_attrs={"defaults": True})
    return found, fixed, base


def main(argv):
    try:
        import optuna
    except ImportError:
        print("error: tune.py needs Optuna: pip install optuna optuna-integration", file=sys.stderr)
        return 2
    try:
        settings, fixed, base = parse(argv)
    except runs.HelpRequested:
        lines = runs.help_text(__file__, __doc__, own_defaults()).splitlines()
        print("\n".join(line for line in lines if line.startswith(("usage", "    ", "  --")) or not line)
              .replace("\n\n\n", "\n\n").rstrip() + "\n\nEach knob is --key=value or --key value. Any train.py knob "
              "(python train.py --help) is passed to every trial and fixes it.")
        return 0
    except (runs.ConfigError, loader.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    study_runs = Path(base["runs_dir"]) / settings["study"]
    results = Path(base["results_dir"]) / settings["study"]
    # Each trial's outcome is printed by report() and run_trial(); Optuna's own warnings would say
    # it again, and print an interrupted trial's traceback before our one line.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        found, fixed, base = open_study(settings, fixed, study_runs)
        so_far = len([t for t in found.trials if t.state != optuna.trial.TrialState.WAITING])  # not the defaults queued
        left = settings["trials"] - so_far
        print(f"study {settings['study']}: {so_far} trials so far, {max(left, 0)} to run "
              f"(runs/{settings['study']}/study.db)", flush=True)
        if left > 0:
            found.optimize(lambda trial: run_trial(trial, fixed, base, study_runs, study_runs / "results"),
                           n_trials=left, timeout=settings["timeout"] or None,
                           catch=(runs.TrainingError,), callbacks=[report])
        done = [t for t in found.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise runs.ConfigError("no trial completed: nothing to choose from")
        best = found.best_trial
        params = {**fixed, **best.params}  # the study's fixed knobs: those of every trial
        line = best.user_attrs.get("command", command_line(params))
        defaults = next((t for t in found.trials if t.user_attrs.get("defaults")), None)
        defaults_value = defaults.value if defaults is not None else None
        print(f"the defaults (trial {defaults.number}): validation "
              + (f"{defaults_value:.4f}" if defaults_value is not None else str(defaults.state.name.lower()))
              if defaults is not None else "the defaults: not a trial of this study (made before they were trial 0)",
              flush=True)
        print(f"best trial {best.number}: validation {found.direction.name.lower()}d to "
              f"{best.value:.4f}\n  {line}", flush=True)
        # The chosen setting, trained once more from scratch: its test figures, reported only.
        name = f"best-trial-{best.number}"
        if not (results / name / "summary.json").is_file():  # else a resumed study's, already made
            for folder in (study_runs / name, results / name):      # an interrupted retraining
                shutil.rmtree(folder, ignore_errors=True)
            train.training(0, train.resolve_config(
                arguments(params)
                + [f"--runs_dir={study_runs}", f"--results_dir={results}", f"--run_name={name}", "--progress=False"]))
        summary = json.loads((results / name / "summary.json").read_text())
        test = {k: v for k, v in summary.items() if k.startswith("test_")}
        results.mkdir(parents=True, exist_ok=True)
        (results / "best.json").write_text(json.dumps(
            {"study": settings["study"], "trial": best.number, "validation": best.value,
             "direction": found.direction.name.lower(), "params": params, "command": line,
             "defaults_trial": defaults.number if defaults is not None else None, "defaults_validation": defaults_value,
             "trials": len(found.trials), "test_of_retrained": test}, indent=2) + "\n")
        print(f"written {results / 'best.json'}; test of the retrained setting: "
              + ", ".join(f"{k[5:]} {v:.4f}" for k, v in test.items()))
    except (runs.ConfigError, loader.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: run the same command with --study={settings['study']} to continue",
              file=sys.stderr)
        return 130
    return 0


def report(study, trial):
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    print(f"trial {trial.number}: {trial.state.name.lower()}, validation {value}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
