"""The rows of benchmark.py's tables: this project's train.py runs and its peers' models, each
measured in a process of its own (wall time from start to finish, peak resident memory), all on
the split train.py uses.

    row = measure_row("svd", args, scratch)          # a Surprise SVD row: its test figures, time, memory
    row = train_row("mfmixtaste", args, scratch, [])  # a whole `python train.py` run as a row
    scores, extra = ranking_baseline("ease", dataset, data_dir)  # in the child: fit, choose on val, test

Rows: the global mean, biases only, Surprise's SVD and SVD++ (rating); popularity, EASE, ADMM SLIM,
implicit's ALS and BPR (ranking), each searched on validation; the test set chooses nothing.
"""

import difflib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import loader

ROOT = Path(__file__).resolve().parents[1]  # the project folder: train.py, benchmark.py


def task_config(dataset, task="rating", columns=""):
    """train.py's settings for this data and task at its defaults (a file's defaults included)."""
    import train
    return train.resolve_config([f"--task={task}", f"--dataset={dataset}"] + ([f"--columns={columns}"] if columns else []))


def split_arrays(dataset, data_dir, columns=""):
    """(ratings, train, val, test rows) exactly as `train.py` splits them for the rating task."""
    ratings = loader.load(dataset, data_dir, allow_download=False, columns=columns)
    if not ratings.has_ratings:
        raise loader.DataError(f"{dataset} has no rating column: its rows are ranking's (benchmark.py --task=ranking)")
    cfg = task_config(dataset, "rating", columns)
    return ratings, *loader.rating_split(ratings, cfg["test_fraction"], cfg["val_fraction"], cfg["split_seed"])


def metrics(predictions, targets):
    """Test figures of a baseline, by scikit-learn (independent of the Ignite metrics)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error
    mse = mean_squared_error(targets, predictions)
    return {"mse": float(mse), "rmse": float(np.sqrt(mse)),
            "mae": float(mean_absolute_error(targets, predictions))}


def fit_biases(users, items, ratings, n_users, n_items, reg, sweeps=10):
    """r ~ mu + b_u + b_i with L2 weight reg, by alternating exact minimisation."""
    mu = ratings.mean()
    user_bias, item_bias = np.zeros(n_users), np.zeros(n_items)
    users_count = np.bincount(users, minlength=n_users) + reg
    items_count = np.bincount(items, minlength=n_items) + reg
    for _ in range(sweeps):
        user_bias = np.bincount(users, ratings - mu - item_bias[items], n_users) / users_count
        item_bias = np.bincount(items, ratings - mu - user_bias[users], n_items) / items_count
    return mu, user_bias, item_bias


def row_global_mean(dataset, data_dir, columns=""):
    r, train, val, test = split_arrays(dataset, data_dir, columns)
    fit_rows = np.concatenate([train, val])
    return metrics(np.full(len(test), r.ratings[fit_rows].mean()), r.ratings[test]), {}


def row_bias_only(dataset, data_dir, columns=""):
    """The regularisation is chosen on the validation rows, then the biases are fitted on
    train + val, as the surprise rows are."""
    r, train, val, test = split_arrays(dataset, data_dir, columns)
    u, i, y = r.users, r.items, r.ratings.astype(np.float64)

    def predict(params, rows):
        mu, bu, bi = params
        return np.clip(mu + bu[u[rows]] + bi[i[rows]], y.min(), y.max())

    scores = {reg: metrics(predict(fit_biases(u[train], i[train], y[train], r.n_users, r.n_items,
                                              reg), val), y[val])["mse"]
              for reg in (1.0, 3.0, 10.0, 25.0)}
    reg = min(scores, key=scores.get)
    rows = np.concatenate([train, val])
    params = fit_biases(u[rows], i[rows], y[rows], r.n_users, r.n_items, reg)
    return metrics(predict(params, test), y[test]), {"reg (chosen on val)": reg}


# Surprise's SVD and SVD++ searched on validation as the ranking peers are (grid_search): SVD over
# its factors, L2, learning rate and epochs (its defaults 100, 0.02, 0.005, 20 inside; the low rates
# and long runs because the ML-100K-sized cut chose lr 0.002 at 160 epochs, both edges, before them;
# ML-1M then chose 10 factors at lr 0.001 for 320 epochs, and beyond those edges validation is no
# better: docs/rating.md). SVD++ over the same four knobs, its epochs to 160 and its rates from
# 0.0015 since on the cut 80 epochs at lr 0.003 beat the old grid's 40-epoch edge on validation
# (0.8519 against 0.8773), by TPE alone (a round of the climb is up to 80 fits of its four knobs):
# within 30 settings on files of up to SVDPP_FULL_CARE_ROWS training rows, 6 above, where a fit of
# ML-1M's 600k rows takes 10 minutes at 40 epochs on Surprise's one thread (20 at 80: a user's
# every rating costs a pass over all their items) and 30 would take most of a day (docs/rating.md).
SURPRISE_GRIDS = {"svd": {"n_factors": (10, 25, 50, 100, 200), "reg_all": (0.01, 0.02, 0.05, 0.1, 0.2),
                          "lr_all": (0.001, 0.002, 0.005, 0.01, 0.02), "n_epochs": (10, 20, 40, 80, 160, 320)},
                  "svdpp": {"n_factors": (10, 20, 50), "reg_all": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2),
                            "lr_all": (0.0015, 0.003, 0.007, 0.015), "n_epochs": (10, 20, 40, 80, 160)}}
SURPRISE_BUDGETS = {"svd": 30, "svdpp": 30}
SVDPP_FULL_CARE_ROWS, SVDPP_LARGE_BUDGET = 200_000, 6


def row_surprise(dataset, data_dir, algorithm, columns="", choices="", fixed=None):
    """Surprise's SVD or SVD++: each setting fits the training rows and is scored by validation
    MSE (grid_search within SURPRISE_BUDGETS); the chosen setting's fit (training rows only, as
    ours) gives the test figures, refitted at each of SEEDS: their mean, the spread beside it.
    The choice is left in choices (record_setting) where given; fixed, a setting: that one fit
    alone, for the speed bar's pairs (seed 0 only)."""
    try:
        import surprise
    except ImportError:
        return None, {"skipped": "scikit-surprise is not installed: pip install scikit-surprise"}
    import pandas as pd
    r, train, val, test = split_arrays(dataset, data_dir, columns)
    frame = pd.DataFrame({"u": r.users[train], "i": r.items[train], "r": r.ratings[train]})
    scale = (float(r.ratings.min()), float(r.ratings.max()))
    trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=scale)).build_full_trainset()
    algorithm_class = {"svd": surprise.SVD, "svdpp": surprise.SVDpp}[algorithm]
    fit_times = []

    def fit(setting, seed=0):
        model = algorithm_class(random_state=seed, **setting)
        started = time.perf_counter()
        model.fit(trainset)
        fit_times.append(time.perf_counter() - started)
        return model

    def predict(model, rows):
        return [model.predict(u, i).est for u, i in zip(r.users[rows], r.items[rows])]

    def score(setting):
        model = fit(setting)
        return -metrics(predict(model, val), r.ratings[val])["mse"], model

    grid = SURPRISE_GRIDS[algorithm] if fixed is None else {name: (value,) for name, value in fixed.items()}
    budget, climb = SURPRISE_BUDGETS[algorithm], algorithm == "svd"
    if algorithm == "svdpp" and len(frame) > SVDPP_FULL_CARE_ROWS:
        budget = SVDPP_LARGE_BUDGET
    val_score, setting, model, fits = grid_search(grid, score, budget, climb=climb)
    if choices:
        record_setting(choices, algorithm, setting)
    seeds = [metrics(predict(model, test), r.ratings[test])]
    for seed in SEEDS[1:] if fixed is None else ():
        seeds.append(metrics(predict(fit(setting, seed), test), r.ratings[test]))
    fit_seconds = fit_times[-1]  # the last seed's fit, at the chosen setting: one fit's time
    scores = {key: float(np.mean([s[key] for s in seeds])) for key in seeds[0]}
    edges = grid_edges(grid, setting)
    extra = {"chosen on val": ", ".join(f"{k}={v:g}" for k, v in setting.items()), "val mse": round(-val_score, 4),
             "settings fitted": fits, "search": f"TPE within {budget}" + (", then the climb" if climb else ""),
             f"seeds {SEEDS[0]}-{SEEDS[-1]}: test mse":
             f"{min(s['mse'] for s in seeds):.4f}-{max(s['mse'] for s in seeds):.4f}",
             "fit_seconds": round(fit_seconds, 2), "surprise": surprise.__version__}
    if edges:
        extra["at the grid's edge"] = ", ".join(edges)
    return scores, extra


def measure(command, env=None):
    """Run command through a small wrapper that reports its child's peak RSS and wall time
    (from the child's start to its exit, the wrapper's own start left out); returns (wall
    seconds, peak MiB, stdout, stderr, returncode)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t; "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t, "
               "file=sys.stderr); sys.exit(p.returncode)")
    started = time.perf_counter()
    # A session of its own, so that a benchmark stopped (Ctrl-C, a kill: exit_on_terminate) stops
    # the row's process too and not the wrapper alone, whose child would run on, holding the cores.
    child = subprocess.Popen([sys.executable, "-c", wrapper, *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = child.communicate()
    except BaseException:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    wall = time.perf_counter() - started
    peak = re.search(r"^PEAK_KB (\d+) (\S+)\n?", stderr, re.MULTILINE)
    stderr = stderr.replace(peak.group(0), "") if peak else stderr  # the child's own
    if peak:
        wall = float(peak.group(2))
    return wall, int(peak.group(1)) / 1024 if peak else float("nan"), stdout, stderr, child.returncode


def exit_on_terminate():
    """A kill (SIGTERM) ends benchmark.py as Ctrl-C does: through its finally blocks, so that its
    rows' processes are stopped (measure) and its scratch folders removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def failed_row(name, stderr):
    """A row whose process failed, with the last line it printed."""
    return {"row": name, "error": stderr.strip().splitlines()[-1] if stderr.strip() else "failed"}


RUN_NUMBERS = itertools.count()  # one scratch folder may see a row's name several times


def train_row(name, args, scratch, extra_overrides=()):
    """A whole `python train.py` run as one row: its test figures (keys without "test_"),
    wall time and peak memory, its run folder (for later analysis) and what it printed."""
    run_name = f"bench-{name}-{os.getpid()}-{next(RUN_NUMBERS)}"
    command = [sys.executable, str(ROOT / "train.py"), f"--dataset={args.dataset}",
               f"--data_dir={args.data_dir}", "--download=False", "--progress=False",
               *[f"--{key}={getattr(args, key)}" for key in ("columns", "items") if getattr(args, key, "")],
               f"--run_name={run_name}", f"--runs_dir={scratch / 'runs'}",
               f"--results_dir={scratch / 'results'}", *extra_overrides]
    wall, peak, out, err, code = measure(command)
    if code != 0:
        return failed_row(name, err)
    summary = json.loads((scratch / "results" / run_name / "summary.json").read_text())
    return {"row": name, **{k[len("test_"):]: v for k, v in summary.items() if k.startswith("test_")},
            "val": {k[len("val_"):]: v for k, v in summary.items() if k.startswith("val_")},
            "wall": wall, "peak_mib": peak, "run_dir": scratch / "runs" / run_name, "stdout": out,
            "note": f"best epoch {summary['best_epoch']} of {summary['epochs_run']}",
            "command": "python train.py " + " ".join(extra_overrides)}


def baseline_row(name, args):
    command = [sys.executable, str(ROOT / "benchmark.py"), f"--_row={name}", f"--task={args.task}",
               f"--dataset={args.dataset}", f"--data_dir={args.data_dir}", f"--columns={getattr(args, 'columns', '')}",
               f"--split={getattr(args, 'split', 'random')}", f"--choices={getattr(args, 'choices', '')}"]
    wall, peak, out, err, code = measure(command)
    if code != 0:
        return failed_row(name, err)
    result = json.loads(out.strip().splitlines()[-1])
    if result["scores"] is None:
        return {"row": name, "error": result["extra"]["skipped"]}
    note = ", ".join(f"{k} {v}" for k, v in result["extra"].items())
    return {"row": name, **result["scores"], "wall": wall, "peak_mib": peak, "note": note,
            "fit_seconds": result["extra"].get("fit_seconds")}


LABELS = {"mfmixtaste": "this project, train.py defaults",
          "mfmixtaste_1thread": "this project, train.py defaults, 1 thread",
          "mfmixtaste_k1": "this project, n_tastes=1 (biased MF)",
          "global_mean": "global mean", "bias_only": "biases only (user + item)",
          "svd": "Surprise SVD (searched on validation)", "svdpp": "Surprise SVD++ (searched on validation)"}


def chosen_rows(args, valid, labels=None):
    """The rows --only names (all of valid without it); an unknown one ends the run, naming the
    row whose label it spells (popularity: pop) or that it is close to."""
    chosen = args.only.split(",") if args.only else list(valid)
    unknown = [name for name in chosen if name not in valid]
    if unknown:
        hints = []
        for name in unknown:
            key = re.sub(r"[^a-z0-9]", "", name.lower())
            words = {row: re.sub(r"[^a-z0-9 ]", "", (labels or {}).get(row, "").lower()).split() for row in valid}
            meant = [row for row in valid if key and key in words[row]] or difflib.get_close_matches(name, valid, n=1)
            hints += [f"{name} is the row {meant[0]}"] if meant else []
        sys.exit(f"error: unknown row(s) {', '.join(unknown)} for --task={args.task}"
                 + (f" ({'; '.join(hints)})" if hints else "") + f"; valid: {', '.join(valid)}")
    return chosen


# The defaults before prior_per="row" (kept as a row of --sizes: what they did on small sets).
PAIR_DEFAULTS = ["--prior_per=pair", "--batch_size=8192", "--prior_tastes=0.03", "--prior_attention=0.03",
                 "--prior_items=0.03", "--prior_biases=0.0", "--epochs=30", "--lr=0.005", "--lr_decay=0",
                 "--implicit_weight=0"]


# The rows that are a whole train.py run, with the overrides that make each.
TRAIN_ROWS = {"mfmixtaste": [], "mfmixtaste_1thread": ["--threads=1"],  # as Surprise's fit: 1 thread
              "mfmixtaste_k1": ["--n_tastes=1"], "mfmixtaste_pair": PAIR_DEFAULTS}


def measure_row(name, args, scratch, task_overrides=()):
    """One row by name: a train.py run (TRAIN_ROWS) or a baseline in its own process."""
    if name in TRAIN_ROWS:
        return train_row(name, args, scratch, [*task_overrides, *TRAIN_ROWS[name]])
    return baseline_row(name, args)


def machine_lines(command):
    import ignite
    import torch
    try:
        import surprise
        surprise_version = surprise.__version__
    except ImportError:
        surprise_version = "not installed"
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").is_file():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"Machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
            f"{memory:.0f} GiB; Python {platform.python_version()}, torch {torch.__version__}, "
            f"pytorch-ignite {ignite.__version__}, numpy {np.__version__}, scikit-surprise "
            f"{surprise_version}; {time.strftime('%Y-%m-%d')}.  \nCommand: `{command}`")


RANKING_BASELINES = ("pop", "ease", "ease_single", "admmslim", "als", "bpr")


def ranking_task(dataset, data_dir, columns="", **overrides):
    """The ranking data exactly as `train.py --task=ranking` builds it (same filter and split)."""
    import tasks
    cfg = {**task_config(dataset, "ranking", columns), **overrides}
    return tasks.RankingTask(cfg, loader.load(dataset, data_dir, allow_download=False, columns=columns), "cpu", 0, 1)


class Scorer:
    """score_all(users) -> (B, n_items) float tensor from a function of numpy user indices."""

    def __init__(self, function):
        self.function = function

    def score_all(self, users):
        return torch_tensor(self.function(users.numpy()))


def torch_tensor(array):
    import torch
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))


# Each baseline's grid, an axis per hyperparameter, wide enough that the choice on ML-1M, ML-100K
# and sparse product data lies inside (a value at an edge is said beside the figure); BUDGETS says
# how many settings grid_search may score where a grid is larger (else the whole grid). EASE's L2;
# ADMM SLIM's L1 and L2 (RecBole's alpha 0.5, rho 4000, non-negative, 50 iterations); iALS as
# Rendle et al. (2022) tune it, over the dimension, the L2, the confidence weight alpha and the
# iterations; BPR over its learning rate, L2 and iterations (implicit's SGD wants small rates on
# ML-1M and large ones on sparse product data, where an item has a few dozen interactions to move
# it: Amazon Beauty, validation NDCG@10 at lr 0.001 0.0024, 0.01 0.0264, 0.1 0.0312, 1.0 NaN).
# ease_single fits once at the L2 the ease row's search chose on the same data (chosen_setting).
GRIDS = {"pop": {},
         "ease": {"l2": (10.0, 30.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0)},
         "admmslim": {"l1": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
                      "l2": (30.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0)},
         "als": {"factors": (16, 32, 64, 128, 256, 512, 1024), "regularization": (0.001, 0.01, 0.1, 1.0, 10.0, 100.0),
                 "alpha": (0.1, 0.3, 1.0, 5.0, 20.0, 50.0), "iterations": (2, 5, 15, 30, 60, 120, 240)},
         "bpr": {"factors": (64,), "learning_rate": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
                 "regularization": (0.0, 0.00001, 0.0001, 0.001, 0.01, 0.1), "iterations": (10, 20, 50, 100, 300, 1000)}}
# Settings scored: TPE, then the best's neighbourhood (rounds begun while under 3x the budget); BPR by TPE
# alone within 12 (NO_CLIMB: up to 117 s a fit on ML-1M at 1,000 iterations).
BUDGETS = {"admmslim": 16, "als": 60, "bpr": 12}
NO_CLIMB = ("bpr",)
# ALS's and BPR's iterations are chosen along each fit, as our model's epoch is (fit_along): the
# fit scored on validation after each count of their iterations axis, the best count kept, the fit
# ended after PATIENCE counts without a better score (train.py's patience). implicit's factors after
# N iterations of a longer fit are those of an N-iteration fit, to the bit (ALS; BPR on one thread:
# tests/test_benchmark.py), so the axis costs one fit a setting, not one per count: over the whole
# grid ALS's search on ML-1M climbed to 1,024 factors and 120 iterations, fits of 4 minutes, where
# one fit scored along gives 0.2171 / 0.2165 / 0.2167 after 5 / 15 / 60 of them (issue 48). A count
# costs one validation scoring: BPR's begin at 10 since the 10%-users cut chose 50, then its lowest;
# ALS's reach 240 since ML-1M chose 120, then its last (that setting's fit scored to 480 is no better
# past 120: 0.2147 at every count from 180).
ALONG = ("als", "bpr")
PATIENCE = 2
SEEDS = (0, 1, 2)  # a stochastic peer's (ALS, BPR) chosen setting refitted at each: mean and spread


def grid_search(grid, score, budget=None, climb=True):
    """The best setting of a grid ({name: sorted values}) by score(setting) -> (value, result),
    higher is better. The whole grid where it has at most budget settings (or budget is None);
    a larger one by Optuna's TPE sampler (seed 0, as tune.py searches ours) over the same values
    until budget distinct settings are scored, then from the best of them to the best of its
    whole neighbourhood (every axis one step either way or not at all, the diagonals too) while
    that is better (climb), round after round while fewer than 3 x budget settings are scored (a
    round, once begun, scores its whole neighbourhood: up to 3^axes - 1 settings). Never one knob
    at a time: ALS's factors and L2 interact, and a climb along one axis at a time from the
    grid's centre stopped at factors 16 on ML-100K where the grid's best was 32 (issue 48). Only
    the best result is kept (an EASE fit on 18k items holds 1.3 GB).
    -> (best value, best setting, its result, the number of settings scored)."""
    import itertools

    names = list(grid)
    size = int(np.prod([len(grid[name]) for name in names]))
    scored, kept = {}, [None, -np.inf, None]  # scores by setting; the best: setting, value, result

    def at(values):
        if values not in scored:
            value, result = score(dict(zip(names, values)))
            scored[values] = value
            if kept[0] is None or value > kept[1]:
                kept[:] = [values, value, result]
        return scored[values]

    if budget is None or size <= budget:
        for values in itertools.product(*(grid[name] for name in names)):
            at(values)
    else:
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
        for _ in range(budget * 5):  # TPE proposes a scored setting again at times: its score is reused
            if len(scored) >= budget:
                break
            trial = study.ask()
            values = tuple(trial.suggest_categorical(name, grid[name]) for name in names)
            value = at(values)
            study.tell(trial, value if np.isfinite(value) else -1e30)
        while climb and len(scored) < 3 * budget:  # the best's neighbourhood, diagonals too, while it holds a better one
            here = [grid[name].index(v) for name, v in zip(names, kept[0])]
            best = kept[0]
            for steps in itertools.product((-1, 0, 1), repeat=len(names)):
                index = [i + d for i, d in zip(here, steps)]
                if all(0 <= i < len(grid[name]) for i, name in zip(index, names)):
                    at(tuple(grid[name][i] for name, i in zip(names, index)))
            if kept[0] == best:
                break
    values, value, result = kept
    return value, dict(zip(names, values)), result, len(scored)


def grid_edges(grid, setting):
    """The knobs of a search's chosen setting that lie at an end of their axis, where the best may
    lie beyond it: said beside the figure. An axis of one value (a fixed setting) has no edge,
    nor has a value of 0 at the low end (no L2 at all is as low as an L2 goes)."""
    return [k for k, v in setting.items() if len(grid[k]) > 1 and v in (grid[k][0], grid[k][-1])
            and not v == grid[k][0] == 0]


def ranking_baseline(name, dataset, data_dir, columns="", split="random", choices=""):
    """Fit a baseline over its grid (GRIDS, searched by grid_search within BUDGETS) on the
    training part, keep the setting with the best validation NDCG@k (ALS's and BPR's iterations
    chosen along each fit: fit_along), and report its test figures (training and validation items
    masked); a stochastic one (ALS, BPR) refitted at each of SEEDS,
    its figures their mean. split: train.py's --split, as the rows of ours take it. choices: a
    JSON file where each search leaves its choice (ease_single's L2 is the ease row's)."""
    task = ranking_task(dataset, data_dir, columns, split=split)
    X = task.training_matrix()
    if name in ("als", "bpr"):
        try:
            import implicit
        except ImportError:
            return None, {"skipped": "the implicit package is not installed: pip install implicit"}
    grid = GRIDS[name] if name != "ease_single" else {"l2": (chosen_setting(choices, "ease")["l2"],)}
    along = grid.get("iterations") if name in ALONG else None  # chosen along each fit, not searched

    def validation(scorer):
        return task.evaluate(scorer, "val")[f"ndcg@{task.k}"]

    def score(setting):  # a fit that diverges (NaN factors) is fit_along's to handle
        if along:
            value, iterations, scorer = fit_along(name, X, setting, along, validation)
            return value, (scorer, iterations)
        scorer = fit_ranking_baseline(name, X, setting)
        return validation(scorer), scorer

    searched = {k: v for k, v in grid.items() if not (along and k == "iterations")}
    val, setting, scorer, fits = grid_search(searched, score, BUDGETS.get(name), climb=name not in NO_CLIMB)
    if along:
        scorer, setting["iterations"] = scorer
    if choices and name != "ease_single":
        record_setting(choices, name, setting)
    extra = {"chosen on val": ", ".join(f"{k}={v:g}" for k, v in setting.items()) or "-",
             f"val ndcg@{task.k}": round(val, 4), "settings fitted": fits}
    edges = grid_edges(grid, setting)
    if edges:  # the best may lie beyond the grid: said beside the figure
        extra["at the grid's edge"] = ", ".join(edges)
    test = task.evaluate(scorer, "test")
    if name in ("als", "bpr"):
        seeds = [test] + [task.evaluate(fit_ranking_baseline(name, X, setting, seed), "test") for seed in SEEDS[1:]]
        test = {key: float(np.mean([s[key] for s in seeds])) for key in test}
        ndcg = [s[f"ndcg@{task.k}"] for s in seeds]
        extra[f"seeds {SEEDS[0]}-{SEEDS[-1]}: test ndcg@{task.k}"] = f"{min(ndcg):.4f}-{max(ndcg):.4f}"
        extra["implicit"] = implicit.__version__
    return test, extra


def record_setting(path, name, setting):
    """Leave a search's choice in the JSON file at path (benchmark.py's scratch folder)."""
    found = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    Path(path).write_text(json.dumps({**found, name: setting}))


def chosen_setting(path, name):
    """The setting the named row's search left in path; a RuntimeError where it has not run."""
    found = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
    if name not in found:
        raise RuntimeError(f"the {name} row's search has not run: its choice is what this row fits "
                           f"(benchmark.py runs it first)")
    return found[name]


def gram_matrix(X):
    """X'X (n_items, n_items) in float64, the co-occurrence counts both item-item models start from."""
    return (X.T @ X).toarray().astype(np.float64)


def ease(X, l2):
    """EASE's item-item weights (Steck 2019): B = I - P diagMat(1 / diag(P)), P = (X'X + l2 I)^-1,
    the zero diagonal in closed form. -> (n_items, n_items) float32."""
    gram = gram_matrix(X)
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def admm_slim(X, l1, l2, alpha=0.5, rho=4000.0, iterations=50):
    """SLIM's item-item weights by ADMM (Steck, Dimakopoulou, Riabov, Jebara 2020, "ADMM SLIM:
    Sparse Recommendations for Many Users"): minimise |X - X B|^2 + l1 |B|_1 + l2 |D B|^2 with
    diag(B) = 0 and B >= 0, D the items' popularity to the power alpha. Alternates a ridge step
    with the zero diagonal (closed form through one inverse, P) and the L1 step (a threshold);
    Gamma holds the scaled multipliers of B = C. D is the items' mean over users (X.mean(0)), as in
    RecBole's ADMMSLIM (recbole/model/general_recommender/admmslim.py: item_means = X.mean(axis=0),
    lambda2 * diag(item_means ** alpha)); the paper's item counts X.sum(0) differ by n_users ** alpha,
    the same model at l2 scaled by that factor. RecBole runs 100 iterations; on ML-1M validation
    NDCG@10 is 0.2307 / 0.2304 / 0.2303 after 25 / 50 / 100. -> C (n_items, n_items) float32."""
    gram = gram_matrix(X)                                                         # (n, n)
    popularity = np.asarray(X.mean(0)).ravel()
    inverse = np.linalg.inv(gram + np.diag(l2 * popularity ** alpha + rho))
    P = inverse.astype(np.float32)
    B_aux = (inverse @ gram).astype(np.float32)
    C = np.zeros_like(P)
    Gamma = np.zeros_like(P)
    for _ in range(iterations):
        B_tilde = B_aux + P @ (rho * C - Gamma)
        B = B_tilde - P * (np.diag(B_tilde) / np.diag(P))   # the multiplier that zeroes diag(B)
        C = np.maximum(B + Gamma / rho - l1 / rho, 0.0)     # soft threshold, kept non-negative
        Gamma += rho * (B - C)
    return C


class _Enough(Exception):
    """Raised in implicit's per-iteration callback: the fit has stopped improving on validation."""


def fit_along(name, X, setting, counts, validation, seed=0):
    """One implicit fit (ALS, BPR) of setting (without its iterations) up to the last of counts,
    scored by validation(scorer) -> value after each count of iterations (higher is better) and
    ended after PATIENCE counts without a better one. -> (best value, its count of iterations,
    its scorer); a value that is not finite counts as no better, and a fit that ends in NaN
    factors (implicit's ModelFitError, BPR at too large a step) keeps its best count before them."""
    from implicit.recommender_base import ModelFitError
    from threadpoolctl import threadpool_info, threadpool_limits

    best, misses, threads = (-np.inf, None, None), 0, threadpool_info()

    def after_iteration(iteration, *_):  # ALS passes (iteration, seconds, loss); BPR two more
        nonlocal best, misses
        if iteration + 1 not in counts:
            return
        user_factors, item_factors = np.array(model.user_factors), np.array(model.item_factors)
        scorer = Scorer(lambda users: user_factors[users] @ item_factors.T)
        with threadpool_limits(threads):  # implicit's threads wait meanwhile: BLAS may use the cores
            value = validation(scorer)
        if np.isfinite(value) and value > best[0]:
            best, misses = (value, iteration + 1, scorer), 0
        else:
            misses += 1
            if misses >= PATIENCE:
                raise _Enough

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, BLAS single-threaded
        model = implicit_model(name, {**setting, "iterations": max(counts)}, seed)
        try:
            model.fit(X, show_progress=False, callback=after_iteration)
        except (_Enough, ModelFitError):
            pass
    return best


def implicit_model(name, setting, seed=0):
    """implicit's CPU ALS or BPR at setting (its iterations included), unfitted. BPR on one thread:
    on more its SGD steps race (Hogwild), and a seeded search chose differently run to run."""
    import implicit
    if name == "als":
        return implicit.cpu.als.AlternatingLeastSquares(
            factors=setting["factors"], regularization=setting["regularization"],
            alpha=setting["alpha"], iterations=setting["iterations"], random_state=seed)
    return implicit.cpu.bpr.BayesianPersonalizedRanking(
        factors=setting["factors"], learning_rate=setting["learning_rate"],
        regularization=setting["regularization"], iterations=setting["iterations"], random_state=seed,
        num_threads=1)


def fit_ranking_baseline(name, X, setting, seed=0):
    if name == "pop":
        counts = np.asarray(X.sum(0)).ravel()
        return Scorer(lambda users: np.broadcast_to(counts, (len(users), len(counts))))
    if name in ("ease", "ease_single", "admmslim"):  # item-item models: a user's scores are X_u B
        weights = admm_slim(X, setting["l1"], setting["l2"]) if name == "admmslim" else ease(X, setting["l2"])
        return Scorer(lambda users: X[users] @ weights)  # sparse rows times the dense weights: a few items each
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, BLAS single-threaded
        model = implicit_model(name, setting, seed)
        model.fit(X, show_progress=False)
    user_factors, item_factors = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return Scorer(lambda users: user_factors[users] @ item_factors.T)
