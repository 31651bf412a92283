"""Measure this project against its peers on the same split, in one run.

    python benchmark.py --data_dir=../shared/data                      # every row, ML-1M
    python benchmark.py --data_dir=../shared/data --only=mfmixtaste,svd # a quick look
    python benchmark.py --scaling                                       # time/memory vs size
    python benchmark.py --sizes --data_dir=../shared/data               # defaults on small sets
    python benchmark.py --shared-accounts --data_dir=../shared/data     # real users pooled into accounts
    python benchmark.py --shared-accounts --accounts_seed=1 ...         # another draw of the accounts

Each row runs in its own process, timed from start to finish by this script, with that process's
peak resident memory. Rows: this project with train.py's defaults (`python train.py`, start to
finish), the same with n_tastes=1 (biased MF), the global mean, a bias-only baseline, and
scikit-surprise's SVD and SVD++ (optional: a clear message when it is missing). Everything uses
loader.split, so the test rows are those of train.py. The report goes to results/benchmark.md.
"""

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import loader

ROOT = Path(__file__).resolve().parent
ROWS = ("mfmixtaste", "mfmixtaste_1thread", "mfmixtaste_k1", "global_mean", "bias_only", "svd",
        "svdpp")
# The replaced script (a 2020 PyTorch/Ignite trio), on this same protocol.
REPLACED = [("replaced script, published (author's machine)", 0.7878, "13m44s"),
            ("replaced script, run on a 2-core machine here", 0.7838, "194 s")]


# ----------------------------------------------------------------------------- rows (children)

def split_arrays(dataset, data_dir):
    ratings = loader.load(dataset, data_dir, allow_download=False)
    train, val, test = loader.split(len(ratings))
    return ratings, train, val, test


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


def row_global_mean(dataset, data_dir):
    r, train, val, test = split_arrays(dataset, data_dir)
    fit_rows = np.concatenate([train, val])
    return metrics(np.full(len(test), r.ratings[fit_rows].mean()), r.ratings[test]), {}


def row_bias_only(dataset, data_dir):
    """The regularisation is chosen on the validation rows, then the biases are fitted on
    train + val, as the surprise rows are."""
    r, train, val, test = split_arrays(dataset, data_dir)
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


def row_surprise(dataset, data_dir, algorithm):
    try:
        import surprise
    except ImportError:
        return None, {"skipped": "scikit-surprise is not installed: pip install scikit-surprise"}
    import pandas as pd
    r, train, val, test = split_arrays(dataset, data_dir)
    rows = np.concatenate([train, val])  # surprise has no early stopping: all training rows
    frame = pd.DataFrame({"u": r.users[rows], "i": r.items[rows], "r": r.ratings[rows]})
    scale = (float(r.ratings.min()), float(r.ratings.max()))
    trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=scale)) \
        .build_full_trainset()
    model = {"svd": surprise.SVD, "svdpp": surprise.SVDpp}[algorithm](random_state=0)
    started = time.perf_counter()
    model.fit(trainset)
    fit_seconds = time.perf_counter() - started
    predictions = [model.predict(u, i).est for u, i in zip(r.users[test], r.items[test])]
    return metrics(predictions, r.ratings[test]), {"fit_seconds": round(fit_seconds, 2),
                                                    "surprise": surprise.__version__}


def run_row(name, task, dataset, data_dir):
    """Child process: compute one baseline row and print it as JSON."""
    functions = {"global_mean": row_global_mean, "bias_only": row_bias_only,
                 "svd": lambda d, dd: row_surprise(d, dd, "svd"),
                 "svdpp": lambda d, dd: row_surprise(d, dd, "svdpp")}
    if task == "ranking":
        functions = {name: lambda d, dd, n=name: ranking_baseline(n, d, dd) for name in RANKING_BASELINES}
        functions["told_persons"] = told_persons_ranking
    scores, extra = functions[name](dataset, data_dir)
    print(json.dumps({"scores": scores, "extra": extra}))


# ----------------------------------------------------------------------------- parent

def measure(command, env=None):
    """Run command through a small wrapper that reports its child's peak RSS and wall time
    (from the child's start to its exit, the wrapper's own start left out); returns (wall
    seconds, peak MiB, stdout, stderr, returncode)."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t; "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t, "
               "file=sys.stderr); sys.exit(p.returncode)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    peak = re.search(r"^PEAK_KB (\d+) (\S+)\n?", done.stderr, re.MULTILINE)
    stderr = done.stderr.replace(peak.group(0), "") if peak else done.stderr  # the child's own
    if peak:
        wall = float(peak.group(2))
    return wall, int(peak.group(1)) / 1024 if peak else float("nan"), done.stdout, stderr, \
        done.returncode


def failed_row(name, stderr):
    """A row whose process failed, with the last line it printed."""
    return {"row": name, "error": stderr.strip().splitlines()[-1] if stderr.strip() else "failed"}


RUN_NUMBERS = itertools.count()  # one scratch folder may see a row's name several times


def train_row(name, args, scratch, extra_overrides=()):
    """A whole `python train.py` run as one row: its test figures (keys without "test_"),
    wall time and peak memory, and its run folder (for later analysis)."""
    run_name = f"bench-{name}-{os.getpid()}-{next(RUN_NUMBERS)}"
    command = [sys.executable, str(ROOT / "train.py"), f"--dataset={args.dataset}",
               f"--data_dir={args.data_dir}", "--download=False", "--progress=False",
               f"--run_name={run_name}", f"--runs_dir={scratch / 'runs'}",
               f"--results_dir={scratch / 'results'}", *extra_overrides]
    wall, peak, out, err, code = measure(command)
    if code != 0:
        return failed_row(name, err)
    summary = json.loads((scratch / "results" / run_name / "summary.json").read_text())
    return {"row": name, **{k[len("test_"):]: v for k, v in summary.items() if k.startswith("test_")},
            "val": {k[len("val_"):]: v for k, v in summary.items() if k.startswith("val_")},
            "wall": wall, "peak_mib": peak, "run_dir": scratch / "runs" / run_name,
            "note": f"best epoch {summary['best_epoch']} of {summary['epochs_run']}",
            "command": "python train.py " + " ".join(extra_overrides)}


def baseline_row(name, args):
    command = [sys.executable, str(ROOT / "benchmark.py"), f"--_row={name}", f"--task={args.task}",
               f"--dataset={args.dataset}", f"--data_dir={args.data_dir}"]
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
          "svd": "Surprise SVD (defaults)", "svdpp": "Surprise SVD++ (defaults)"}


def chosen_rows(args, valid):
    """The rows --only names (all of valid without it); an unknown one ends the run."""
    chosen = args.only.split(",") if args.only else list(valid)
    unknown = set(chosen) - set(valid)
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
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


def speed_pairs(results, peer, peer_seconds, args, scratch, task_overrides=()):
    """The speed bar's ratios: our whole default run over the peer's time, one per pair of runs
    measured back to back. The table's two rows are the first pair; args.speed_pairs - 1 more
    pairs run ours, then the peer, again. This machine's speed drifts by up to half within an
    hour, and it drifts differently for our memory-bound two-thread steps than for a one-thread
    peer, so one pair can land anywhere in that range: the report gives the median of the
    pairs' ratios and their range. [] when either row is missing or failed."""
    by_row = {r["row"]: r for r in results if "error" not in r}
    if "mfmixtaste" not in by_row or peer not in by_row or not peer_seconds(by_row[peer]):
        return []
    ratios = [by_row["mfmixtaste"]["wall"] / peer_seconds(by_row[peer])]
    for _ in range(args.speed_pairs - 1):
        print(f"speed pair {len(ratios) + 1} of {args.speed_pairs} ...", flush=True)
        ours, theirs = (measure_row(name, args, scratch, task_overrides) for name in ("mfmixtaste", peer))
        if "error" in ours or "error" in theirs:
            break
        ratios.append(ours["wall"] / peer_seconds(theirs))
        print(f"   ratio {ratios[-1]:.2f}", flush=True)
    return ratios


def speed_line(ratios, command, first_ours, peer_label, first_peer, target):
    """The speed bar's sentence below a table, from speed_pairs' ratios."""
    median = statistics.median(ratios)
    line = (f"Speed bar: the whole default `{command}` run took {first_ours:.1f} s start to finish, "
            f"{ratios[0]:.2f} times {peer_label} ({first_peer:.2f} s) in the table's pair")
    if len(ratios) > 1:
        line += (f"; over {len(ratios)} pairs measured back to back in this benchmark run the ratio "
                 f"was {min(ratios):.2f} to {max(ratios):.2f}, median **{median:.2f}**")
    return line + f" (target: at most {target:g})."


def peers(args):
    chosen = chosen_rows(args, ROWS)
    loader.load(args.dataset, args.data_dir, allow_download=False)  # parse once, fill the cache
    results = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-bench-") as scratch:
        for name in chosen:
            print(f"running {name} ...", flush=True)
            row = measure_row(name, args, Path(scratch))
            print("  ", row, flush=True)
            results.append(row)
        speed = speed_pairs(results, "svd", lambda r: r["fit_seconds"], args, Path(scratch))
    report = peers_table(results, args, speed)
    print(report)
    write_section(Path(args.output), "peers", report)


def peers_table(results, args, speed=()):
    lines = [f"## Peers on {args.dataset}: test rows of the 75/25 split (seed 42)", "",
             "| model | test MSE | RMSE | MAE | wall time (s) | peak memory (MiB) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {LABELS[r['row']]} | - | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {LABELS[r['row']]} | {r['mse']:.4f} | {r['rmse']:.4f} | {r['mae']:.4f} "
                     f"| {r['wall']:.1f} | {r['peak_mib']:.0f} | {r.get('note', '')} |")
    for label, mse, wall in REPLACED:
        lines.append(f"| {label} | {mse:.4f} | {mse ** 0.5:.4f} | - | {wall} | - | 50 epochs |")
    by_row = {r["row"]: r for r in results if "error" not in r}
    if speed:
        lines += ["", speed_line(speed, "python train.py", by_row["mfmixtaste"]["wall"],
                                 "Surprise SVD's `fit`", by_row["svd"]["fit_seconds"], 2.5)]
        if "mfmixtaste_1thread" in by_row:
            one = by_row["mfmixtaste_1thread"]["wall"]
            lines[-1] += (f" Surprise's `fit` runs on one thread while `train.py` uses two (torch's "
                          f"default here); on one thread (`--threads=1`) the whole run took {one:.1f} s, "
                          f"{one / by_row['svd']['fit_seconds']:.2f} times SVD's `fit`.")
    lines += ["", "Wall time is the whole process, start to finish (imports, data from the parse "
              "cache, training, evaluation, writing results), timed by benchmark.py; the SVD "
              "rows' `fit` time alone is in their notes. Peak memory is the process's maximum "
              "resident set size. Our model trains on 95% of the training rows (the rest choose "
              "the epoch); the baselines fit all training rows.", "",
              machine_lines(f"python benchmark.py --dataset={args.dataset} "
                            f"--data_dir={args.data_dir_given}"
                            + (f" --only={args.only}" if args.only else ""))]
    return "\n".join(lines) + "\n"


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


def write_section(path, name, text):
    """Replace (or append) one marked section of the report, keeping the others."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}{end}\n"
    current = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


# ----------------------------------------------------------------------------- ranking

RANKING_ROWS = ("mfmixtaste", "mfmixtaste_k1", "pop", "ease", "ease_single", "admmslim", "als", "bpr")
RANKING_BASELINES = ("pop", "ease", "ease_single", "admmslim", "als", "bpr")
EASE_CHOSEN_L2 = 1000.0  # what the "ease" row's search chooses on validation (its notes say so)
RANKING_LABELS = {"mfmixtaste": "this project, `--task=ranking` defaults",
                  "mfmixtaste_k1": "this project, `--task=ranking --n_tastes=1`",
                  "pop": "popularity", "ease": "EASE (closed form)",
                  "ease_single": "EASE, one fit at the L2 its search chose",
                  "admmslim": "ADMM SLIM (numpy, as Steck et al. 2020)",
                  "als": "implicit ALS", "bpr": "implicit BPR"}
# RecBole's published ml-1m general-recommendation table (test NDCG@10, Recall@10).
PUBLISHED = [("Pop", 0.1006, 0.0699), ("BPR", 0.2407, 0.1725), ("NeuMF", 0.2393, 0.1717),
             ("LightGCN", 0.2478, 0.1823), ("MultiVAE", 0.2523, 0.1995), ("EASE", 0.2865, 0.2139),
             ("ADMMSLIM", 0.2904, 0.2134)]


def ranking_task(dataset, data_dir, **overrides):
    """The ranking data exactly as `train.py --task=ranking` builds it (same filter and split)."""
    import tasks
    import train
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking", "dataset": dataset,
           **overrides}
    return tasks.RankingTask(cfg, loader.load(dataset, data_dir, allow_download=False), "cpu", 0, 1)


class Scorer:
    """score_all(users) -> (B, n_items) float tensor from a function of numpy user indices."""

    def __init__(self, function):
        self.function = function

    def score_all(self, users):
        return torch_tensor(self.function(users.numpy()))


def torch_tensor(array):
    import torch
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))


def ranking_baseline(name, dataset, data_dir):
    """Fit a baseline for each setting of its grid on the training part, keep the one with the
    best validation NDCG@k, and report its test figures (training and validation items masked)."""
    task = ranking_task(dataset, data_dir)
    X = task.training_matrix()
    # The grids: EASE's L2; iALS as Rendle et al. (2022) tune it, over the dimension, the L2 and
    # the confidence weight alpha; BPR over its learning rate and L2 at 64 factors, 300 epochs.
    grids = {"pop": [{}], "ease": [{"l2": v} for v in (100.0, 250.0, 500.0, 1000.0, 2000.0)],
             "ease_single": [{"l2": EASE_CHOSEN_L2}],
             # RecBole's ADMMSLIM settings (alpha 0.5, rho 4000, non-negative), 50 iterations,
             # its L1 and L2 weights searched.
             "admmslim": [{"l1": l1, "l2": l2} for l1 in ADMMSLIM_L1 for l2 in ADMMSLIM_L2],
             "als": [{"factors": f, "regularization": r, "alpha": a}
                     for f in (64, 128, 256) for r in (0.01, 0.1, 1.0) for a in (1.0, 5.0, 20.0)],
             # BPR: implicit's SGD wants small learning rates here (docs/ranking.md: 0.127 at its
             # defaults, lr 0.01; 0.163 at 0.001 with 300 iterations; more iterations overfit).
             "bpr": [{"factors": 64, "learning_rate": lr, "regularization": r}
                     for lr in (0.0003, 0.0005, 0.001) for r in (0.0001, 0.001)]}
    if name in ("als", "bpr"):
        try:
            import implicit
        except ImportError:
            return None, {"skipped": "the implicit package is not installed: pip install implicit"}
    best = None
    for setting in grids[name]:
        scorer = fit_ranking_baseline(name, X, setting)
        val = task.evaluate(scorer, "val")[f"ndcg@{task.k}"]
        if best is None or val > best[0]:
            best = (val, setting, scorer)
    val, setting, scorer = best
    extra = {"chosen on val": ", ".join(f"{k}={v:g}" for k, v in setting.items()) or "-",
             f"val ndcg@{task.k}": round(val, 4)}
    if name in ("als", "bpr"):
        extra["implicit"] = implicit.__version__
    return task.evaluate(scorer, "test"), extra


# Its grid: L1 and L2 around where a wider search on validation peaked (docs/ranking.md).
ADMMSLIM_L1, ADMMSLIM_L2 = (1.0, 3.0, 10.0), (500.0, 1000.0, 2000.0)


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


def fit_ranking_baseline(name, X, setting):
    if name == "pop":
        counts = np.asarray(X.sum(0)).ravel()
        return Scorer(lambda users: np.broadcast_to(counts, (len(users), len(counts))))
    if name in ("ease", "ease_single", "admmslim"):  # item-item models: a user's scores are X_u B
        weights = admm_slim(X, setting["l1"], setting["l2"]) if name == "admmslim" else ease(X, setting["l2"])
        return Scorer(lambda users: X[users].toarray() @ weights)
    import implicit
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, BLAS single-threaded
        if name == "als":
            model = implicit.cpu.als.AlternatingLeastSquares(
                factors=setting["factors"], regularization=setting["regularization"],
                alpha=setting["alpha"], iterations=15, random_state=0)
        else:
            model = implicit.cpu.bpr.BayesianPersonalizedRanking(
                factors=setting["factors"], learning_rate=setting["learning_rate"],
                regularization=setting["regularization"], iterations=300, random_state=0)
        model.fit(X, show_progress=False)
    user_factors, item_factors = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return Scorer(lambda users: user_factors[users] @ item_factors.T)


def per_user_test_ndcg(task, run_dir):
    """Test NDCG@k of each user for the best model of a train.py ranking run folder."""
    from recommend import Recommender
    model = Recommender.load(run_dir, quiet=True).model  # the run's own rows are the task's
    return task.per_user(model, "test")[:, 0].numpy()


def genre_span(task, movies):
    """How many distinct genres each user's training movies span: (n_users,) ints."""
    genres = sorted({g for names in movies["genres"] for g in names})
    column = {g: k for k, g in enumerate(genres)}
    item_genres = np.zeros((task.n_items, len(genres)), dtype=bool)
    for item, raw in enumerate(task.item_ids):
        if raw in movies.index:
            item_genres[item, [column[g] for g in movies.at[raw, "genres"]]] = True
    X = task.training_matrix()
    return ((X @ item_genres.astype(np.float32)) > 0).sum(1)


def diversity_table(task, rows, data_dir, dataset):
    """The paper's question: does the mixture help users whose tastes span more genres?"""
    import pandas as pd
    movies = loader.load_movies(dataset, data_dir)
    runs = {r["row"]: r for r in rows if "run_dir" in r}
    if movies is None or not {"mfmixtaste", "mfmixtaste_k1"} <= set(runs):
        return ["", "(The genre analysis needs both of this project's rows and the movie file.)"]
    span = genre_span(task, movies)
    quartile = pd.qcut(span, 4, labels=False, duplicates="drop")
    ndcg = {name: per_user_test_ndcg(task, runs[name]["run_dir"]) for name in ("mfmixtaste", "mfmixtaste_k1")}
    k = task.k
    mixture_k = json.loads((runs["mfmixtaste"]["run_dir"] / "config.json").read_text())["n_tastes"]
    lines = ["", f"### Do users with more diverse tastes gain more from K={mixture_k} tastes than from one?", "",
             f"Test NDCG@{k} per user of the two best-by-validation models above, grouped by how many of "
             "the 18 genres (movies.dat) the user's training movies span, in quartiles of users:", "",
             f"| genres spanned | users | K=1 | K={mixture_k} | difference | share of users better with the mixture |",
             "|---|---|---|---|---|---|"]
    groups = [("all users", np.ones(len(span), dtype=bool))]
    groups += [(f"{span[quartile == q].min()}-{span[quartile == q].max()}", quartile == q)
               for q in range(int(quartile.max()) + 1)]
    for label, members in groups:
        one, mix = ndcg["mfmixtaste_k1"][members].mean(), ndcg["mfmixtaste"][members].mean()
        better = (ndcg["mfmixtaste"][members] > ndcg["mfmixtaste_k1"][members]).mean()
        lines.append(f"| {label} | {members.sum():,} | {one:.4f} | {mix:.4f} | {mix - one:+.4f} | {better:.0%} |")
    return lines


def ranking_peers(args):
    chosen = chosen_rows(args, RANKING_ROWS)
    task = ranking_task(args.dataset, args.data_dir)  # also fills the parse cache
    results = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-bench-") as scratch:
        for name in chosen:
            print(f"running {name} ...", flush=True)
            row = measure_row(name, args, Path(scratch), ["--task=ranking"])
            print("  ", {k: v for k, v in row.items() if k != "run_dir"}, flush=True)
            results.append(row)
        speed = speed_pairs(results, "ease_single", lambda r: r["wall"], args, Path(scratch), ["--task=ranking"])
        report = ranking_table(results, args, task, speed)
        report += "\n".join(diversity_table(task, results, args.data_dir, args.dataset)) + "\n"
    print(report)
    write_section(Path(args.output), "ranking", report)


def ranking_table(results, args, task, speed=()):
    k = task.k
    names = [f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "hit", "precision")]
    lines = [f"## Ranking on {args.dataset}: RecBole's protocol, every item ranked for every user", "",
             f"Ratings >= 3 as positives, 10-core filter ({task.n_interactions:,} interactions, "
             f"{task.n_users:,} users, {task.n_items:,} items), each user's interactions split "
             "80/10/10 at random (seed 2020); the test ranking masks the user's training and "
             "validation items. Every model fits the training part and is chosen on validation "
             f"NDCG@{k}; the test part chooses nothing.", "",
             "| model | " + " | ".join(n.replace("@", "@") for n in names)
             + " | wall time (s) | peak memory (MiB) | notes |",
             "|---|" + "---|" * (len(names) + 3)]
    for r in results:
        if "error" in r:
            lines.append(f"| {RANKING_LABELS[r['row']]} | " + "- | " * (len(names) + 2) + f"{r['error']} |")
            continue
        lines.append(f"| {RANKING_LABELS[r['row']]} | " + " | ".join(f"{r[n]:.4f}" for n in names)
                     + f" | {r['wall']:.1f} | {r['peak_mib']:.0f} | {r.get('note', '')} |")
    published = args.dataset == "ml-1m"  # RecBole's table is of ML-1M: beside no other set
    for label, ndcg, recall in PUBLISHED if published else ():
        lines.append(f"| {label}, published by RecBole | {ndcg:.4f} | {recall:.4f} | - | - | - | - | - "
                     "| published figure, not run here |")
    by_row = {r["row"]: r for r in results if "error" not in r}
    if speed:  # below the table, not inside it
        lines += ["", speed_line(speed, "python train.py --task=ranking", by_row["mfmixtaste"]["wall"],
                                 "a whole EASE process with one fit, that reads, filters, splits, fits, "
                                 "scores and ranks every user", by_row["ease_single"]["wall"], 2)]
    if published:
        lines += ["", "Published rows: RecBole's ml-1m general-recommendation benchmark table (test "
                  "NDCG@10 and Recall@10, as published). Differences of protocol: RecBole splits with "
                  "its own random order (the same 80/10/10 ratios, another seed), so its test users' "
                  "items are not ours; its models were tuned with its own search spaces; it trains "
                  "with sampled negatives where its models do. Our ML-1M copy is a reconstruction "
                  "(`../shared/data/ml-1m/SOURCE.txt`) with every (user, movie, rating) triple of "
                  "the original, which is all this protocol reads."]
    lines += ["", "Wall time is the whole process (data from the parse cache, hyperparameter search "
              "for the baselines, training, evaluation), timed by benchmark.py; peak memory is its "
              "maximum resident set.", "",
              machine_lines(f"python benchmark.py --task=ranking --dataset={args.dataset} "
                            f"--data_dir={args.data_dir_given}" + (f" --only={args.only}" if args.only else ""))]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- data sizes

# Smaller sets cut from ML-1M, each its own MovieLens-format folder: (label, kind, fraction).
SUBSETS = [("10% of the users", "users", 0.1), ("10% of each user's ratings", "ratings", 0.1)]
SIZE_ROWS = ("mfmixtaste", "mfmixtaste_k1", "mfmixtaste_pair", "bias_only", "svd", "svdpp")


def subsample(ratings, kind, fraction, seed=0):
    """Row indices (file order) of a seeded subset: all ratings of a random `fraction` of the
    users ("users"), or a random `fraction` of each user's ratings, at least one ("ratings")."""
    rng = np.random.default_rng(seed)
    if kind == "users":
        chosen = rng.choice(ratings.n_users, size=max(1, round(ratings.n_users * fraction)),
                            replace=False)
        return np.flatnonzero(np.isin(ratings.users, chosen))
    order = np.lexsort((rng.random(len(ratings)), ratings.users))  # by user, random within
    per_user = np.bincount(ratings.users, minlength=ratings.n_users)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    keep = np.maximum(1, np.round(per_user * fraction).astype(np.int64))
    position = np.arange(len(ratings)) - np.repeat(starts, per_user)  # rank within the user
    return np.sort(order[position < np.repeat(keep, per_user)])


def write_ratings_dat(folder, ratings, rows, user_ids=None):
    """rows of ratings as an ML-1M ratings.dat (raw ids, or user_ids (len(rows),) in their place;
    the timestamp, unused, is 0), with the movie file beside it when the data has one."""
    folder.mkdir(parents=True, exist_ok=True)
    users = ratings.user_ids[ratings.users[rows]] if user_ids is None else user_ids
    lines = [f"{u}::{i}::{r:g}::0" for u, i, r in zip(users.tolist(), ratings.item_ids[ratings.items[rows]].tolist(),
                                                       ratings.ratings[rows].tolist())]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")


def sizes(args):
    """The defaults on ML-1M and on smaller sets cut from it, against the same peers."""
    if args.dataset != "ml-1m":
        sys.exit("error: --sizes cuts its small sets from ml-1m: leave --dataset at ml-1m")
    full = loader.load("ml-1m", args.data_dir, allow_download=False)
    chosen = chosen_rows(args, SIZE_ROWS)
    lines = ["## Defaults across data sizes: ML-1M and sets cut from it", "",
             "| data | ratings | users | items | ratings per user | ratings per item |",
             "|---|---|---|---|---|---|"]
    table = ["| data | model | test MSE | RMSE | MAE | wall time (s) | notes |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-sizes-") as scratch:
        sets = []
        for k, (label, kind, fraction) in enumerate(SUBSETS):
            rows = subsample(full, kind, fraction)
            write_ratings_dat(Path(scratch) / f"set{k}" / "ml-1m", full, rows)
            sets.append((label, str(Path(scratch) / f"set{k}")))
        sets.append(("ML-1M, all", args.data_dir))
        for label, data_dir in sets:
            ratings = loader.load("ml-1m", data_dir, allow_download=False)
            lines.append(f"| {label} | {len(ratings):,} | {ratings.n_users:,} | {ratings.n_items:,} | "
                         f"{len(ratings) / ratings.n_users:.1f} | {len(ratings) / ratings.n_items:.1f} |")
            here = argparse.Namespace(**{**vars(args), "data_dir": data_dir})
            by_row = {}
            for name in chosen:
                print(f"{label}: running {name} ...", flush=True)
                row = measure_row(name, here, Path(scratch))
                print("  ", row, flush=True)
                by_row[name] = row
                if "error" in row:
                    table.append(f"| {label} | {SIZE_LABELS[name]} | - | - | - | - | {row['error']} |")
                else:
                    table.append(f"| {label} | {SIZE_LABELS[name]} | {row['mse']:.4f} | "
                                 f"{row['rmse']:.4f} | {row['mae']:.4f} | {row['wall']:.1f} | "
                                 f"{row.get('note', '')} |")
            ours, peer = by_row.get("mfmixtaste", {}), by_row.get("svdpp", {})
            if "mse" in ours and "mse" in peer:
                verdicts.append(f"{label}: defaults {ours['mse']:.4f} against SVD++ {peer['mse']:.4f} "
                                f"({'at or below' if ours['mse'] <= peer['mse'] else 'ABOVE'})")
    lines += ["", *table, ""]
    if verdicts:
        lines += ["Test MSE of `python train.py` (defaults) against Surprise SVD++: "
                  + "; ".join(verdicts) + ".", ""]
    lines += ["Each set is split as `train.py` splits any data (75/25 test, 5% of the training "
              "rows for validation, seed 42); every row of a set sees the same split, and the "
              "baselines fit training + validation rows. The small sets are cut at random with "
              "seed 0 and written to a temporary folder (never kept: MovieLens may not be "
              "redistributed). The old defaults are those before the per-row prior: `"
              + " ".join(PAIR_DEFAULTS) + "`.", "",
              machine_lines(f"python benchmark.py --sizes --data_dir={args.data_dir_given}"
                            + (f" --only={args.only}" if args.only else ""))]
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(Path(args.output), "sizes", report)


SIZE_LABELS = {**LABELS, "mfmixtaste_pair": "this project, old defaults (prior per pair 0.03)"}


# ----------------------------------------------------------------------------- shared accounts

# Kula's first case: one account, several people. Real ML-1M users pooled into accounts.
GROUPS = [("pairs", 2), ("triples", 3)]
ACCOUNT_TASTES = (1, 2, 4)
# The rating task's K=1 at its own taste prior, chosen on validation among these (one_taste_row).
ONE_TASTE_PRIORS = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0)


def pool_accounts(ratings, group_size, seed=0):
    """Seeded groups of group_size real users (a random order cut in groups; the few users left
    over are dropped), each pooled into one account: -> (rows, account), the kept ratings' row
    indices in file order and the account (0..n_accounts-1) of each. A movie several persons of
    an account rated is kept once: the first of their ratings in file order, whose person it
    counts as (ratings.users[rows] are the persons)."""
    order = np.random.default_rng(seed).permutation(ratings.n_users)
    n_accounts = ratings.n_users // group_size
    account_of = np.full(ratings.n_users, -1)
    account_of[order[:n_accounts * group_size]] = np.arange(n_accounts * group_size) // group_size
    pooled = np.flatnonzero(account_of[ratings.users] >= 0)
    accounts = account_of[ratings.users[pooled]]
    _, first = np.unique(accounts * ratings.n_items + ratings.items[pooled], return_index=True)
    first = np.sort(first)
    return pooled[first], accounts[first]


def purity(account, taste, person):
    """Per account (0..max(account)): the sum over its tastes of the largest number of one
    person's movies among those the taste dominates, over the account's movies; and the
    baseline, the largest person's share (what one taste holding everything scores). account,
    taste, person: (N,) integer arrays, one entry per (account, movie)."""
    n = np.bincount(account)

    def majority(group):
        triples, counts = np.unique(np.stack([account, group, person]), axis=1, return_counts=True)
        pairs, pair_of = np.unique(triples[:2], axis=1, return_inverse=True)  # (account, group)
        best = np.zeros(pairs.shape[1], dtype=np.int64)
        np.maximum.at(best, pair_of.ravel(), counts)                         # its largest person
        return np.bincount(pairs[0], best, minlength=len(n)) / np.maximum(n, 1)

    return majority(taste), majority(np.zeros_like(account))


def mean_over_accounts(per_account, account):
    """The mean of one of purity's per-account figures over the accounts that have movies among
    the (account, movie) entries given (purity scores the others 0)."""
    return per_account[np.bincount(account) > 0].mean()


def separability(account, person, vectors, sample=500, seed=0):
    """How far the item vectors (one row per (account, movie)) can tell an account's persons
    apart, on `sample` accounts drawn at random: -> (linear split fitted on the persons, scored
    on the same movies; the same, scored on held-out movies (5-fold); 2-means clusters of the
    account's movies), each a mean purity. With K=2 the dominant taste is the sign of
    (A_1 - A_2) . e_j, a linear split without intercept: the first is what the best attention
    could reach on these vectors if it knew the persons, the second what such a split carries
    to movies it was not fitted on, the third what the movies' own grouping (no persons)
    gives."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    chosen = np.random.default_rng(seed).permutation(np.unique(account))[:sample]
    fitted, held_out, clusters = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for a in chosen:
            rows = np.flatnonzero(account == a)
            x, y = vectors[rows], person[rows]
            if min(np.unique(y, return_counts=True)[1]) < 5:  # a person with too few movies to fold
                continue
            fitted.append(LogisticRegression(fit_intercept=False, C=100.0, max_iter=500).fit(x, y).score(x, y))
            held_out.append(cross_val_score(LogisticRegression(fit_intercept=False, max_iter=500), x, y, cv=5).mean())
            groups = KMeans(2, n_init=3, random_state=0).fit_predict(x - x.mean(0))
            clusters.append(purity(np.zeros(len(rows), dtype=int), groups, y)[0][0])
    return np.mean(fitted), np.mean(held_out), np.mean(clusters)


def time_split(account, times, size):
    """A split of each account's movies by when they were rated, with no model: the account's
    ratings in time order, cut at its size - 1 largest gaps between consecutive times (people who
    share an account rate at different times). account, times: (N,) arrays; -> (N,) groups
    0..size-1, in the input order. The paper's score has no time in it: this is information the
    tastes cannot use."""
    order = np.lexsort((times, account))
    ordered_account, ordered_times = account[order], times[order]
    starts = np.flatnonzero(np.r_[True, ordered_account[1:] != ordered_account[:-1]])
    group = np.zeros(len(account), dtype=np.int64)
    for start, end in zip(starts, np.r_[starts[1:], len(account)]):
        gaps = np.diff(ordered_times[start:end])                                  # (n - 1,)
        cuts = np.sort(np.argsort(gaps, kind="stable")[len(gaps) - (size - 1):]) + 1 if len(gaps) >= size else []
        group[start:end] = np.searchsorted(cuts, np.arange(end - start), side="right")
    in_input_order = np.empty_like(group)
    in_input_order[order] = group
    return in_input_order


def cooccurrence_split(account, items, person, sample=500, seed=0, chosen=None):
    """What an account's movies' own grouping by who watches what gives, without the persons and
    without any model: per account (`sample` at random, or those `chosen`), a spectral 2-way
    split of its movies by their cosine co-occurrence among the other accounts; -> mean purity.
    account, items, person: (N,) arrays, one entry per (account, movie) of the pooled set."""
    import warnings

    from scipy.sparse import csr_matrix
    from sklearn.cluster import SpectralClustering
    counts = gram_matrix(csr_matrix((np.ones(len(items)), (account, items))))  # (n_items, n_items)
    if chosen is None:
        chosen = np.random.default_rng(seed).permutation(np.unique(account))[:sample]
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a disconnected graph: spectral still splits it
        for a in chosen:
            rows = np.flatnonzero(account == a)
            own = np.ix_(items[rows], items[rows])
            together, alone = counts[own] - 1.0, np.diag(counts)[items[rows]] - 1.0  # this account left out
            similarity = np.clip(together / np.sqrt(np.outer(alone, alone) + 1e-9), 0.0, None)
            np.fill_diagonal(similarity, 0.0)
            groups = SpectralClustering(2, affinity="precomputed", random_state=0).fit_predict(similarity + 1e-6)
            found.append(purity(np.zeros(len(rows), dtype=int), groups, person[rows])[0][0])
    return float(np.mean(found))


PERSONS = "-persons"  # beside a pooled set's folder: the same ratings, each under its person's own id


def told_apart(accounts, pooled, persons):
    """The accounts' interactions (loader.Interactions) given back to their persons: the same
    items and parts, users the rows of the persons' raw ids (user_ids). pooled and persons: the
    same ratings in the same order, under the accounts' ids and under the persons' own."""
    width = int(pooled.item_ids.max()) + 1                  # (account, movie) as one key
    keys = pooled.user_ids[pooled.users].astype(np.int64) * width + pooled.item_ids[pooled.items]
    order = np.argsort(keys)
    wanted = accounts.user_ids[accounts.users].astype(np.int64) * width + accounts.item_ids[accounts.items]
    person_raw = persons.user_ids[persons.users][order[np.searchsorted(keys[order], wanted)]]
    person_ids, person_rows = np.unique(person_raw, return_inverse=True)
    return loader.Interactions(person_rows.astype(np.int64), accounts.items, accounts.part,
                               person_ids.astype(np.int64), accounts.item_ids)


def told_persons_ranking(dataset, data_dir):
    """A model told who is who, for the ranking task on pooled accounts (data_dir; its persons'
    copy beside it, PERSONS): the accounts' own split (the RecBole protocol), each interaction
    given back to its real person, `train.py --task=ranking` with its defaults trained on the
    persons; each account then ranks by the mixture of its persons' distributions over the
    movies they have not met, p(j | account) = sum_p pi_p p(j | p), pi_p the person's share of
    the account's training movies. The same masking and metrics as every ranking row. The
    split function is replaced in this process only (a child of benchmark.py)."""
    import torch

    import tasks
    import train
    from recommend import Recommender
    pooled = loader.load(dataset, data_dir, allow_download=False)
    persons = loader.load(dataset, data_dir + PERSONS, allow_download=False)   # the same rows
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking", "dataset": dataset}
    task, accounts = tasks.RankingTask(cfg, pooled, "cpu", 0, 1), tasks.ranking_interactions(cfg, pooled)
    told = told_apart(accounts, pooled, persons)
    person_ids, person_rows = told.user_ids, told.users
    split, tasks.ranking_interactions = tasks.ranking_interactions, lambda cfg, ratings: told
    try:
        with tempfile.TemporaryDirectory(prefix="mfmixtaste-persons-") as folder:
            code = train.main(["--task=ranking", f"--dataset={dataset}", f"--data_dir={data_dir + PERSONS}",
                               "--download=False", "--progress=False", "--run_name=persons",
                               f"--runs_dir={folder}/runs", f"--results_dir={folder}/results"])
            if code != 0:
                sys.exit(f"error: the persons' run failed (exit status {code})")
            run = Recommender.load(Path(folder) / "runs" / "persons", quiet=True)
    finally:
        tasks.ranking_interactions = split
    assert np.array_equal(run.item_ids, accounts.item_ids)
    train_part = accounts.part == 0
    members = [[] for _ in accounts.user_ids]                          # account row -> person rows
    for a, p in sorted(set(zip(accounts.users.tolist(), person_rows.tolist()))):
        members[a].append(p)
    share = np.bincount(person_rows[train_part], minlength=len(person_ids))
    seen = loader.UserBatches(torch.from_numpy(person_rows[train_part]), torch.from_numpy(accounts.items[train_part]),
                              len(person_ids), 1, shuffle=False)

    def mixture(users):                                                # (B,) accounts -> (B, n_items)
        rows = []
        with torch.no_grad():
            for a in users.tolist():
                who = torch.tensor(members[a])
                scores = run.model.score_all(who)                       # (P, n_items)
                scores[seen.pairs(who)] = -torch.inf                    # each person's own training movies
                weights = torch.log(torch.from_numpy(share[members[a]] / share[members[a]].sum()).float())
                rows.append(torch.logsumexp(torch.log_softmax(scores, 1) + weights.unsqueeze(1), 0))
        return torch.stack(rows).numpy()

    scorer = Scorer(mixture)
    val = task.evaluate(scorer, "val")[f"ndcg@{task.k}"]
    return task.evaluate(scorer, "test"), {f"val ndcg@{task.k}": round(val, 4), "persons": len(person_ids)}


def dominant_tastes(run_dir, raw_accounts, raw_items):
    """For (raw account, raw movie) pairs, the run's dominant taste (largest mixture weight) of
    each pair it knows: -> (taste (M,), known (N,) bool: the pairs it knows, their item rows
    (M,), the run's item vectors (n_items, d))."""
    import torch

    from recommend import Recommender
    run = Recommender.load(run_dir, quiet=True)
    (users, known_users), (items, known_items) = (loader.positions(run.user_ids, raw_accounts),
                                                  loader.positions(run.item_ids, raw_items))
    known = known_users & known_items
    with torch.no_grad():
        taste = torch.cat([run.model.mixture_weights(torch.from_numpy(u), torch.from_numpy(i)).argmax(1)
                           for u, i in zip(np.array_split(users[known], 16), np.array_split(items[known], 16))])
    return taste.numpy(), known, items[known], run.model.item_factors.detach().numpy()


def top_overlap(model, n_users=200, k=10, seed=0):
    """How alike a model's tastes are: each of a user's first two tastes ranks every movie by
    U_k . e_j; -> the mean number of movies their two top-k lists share, over n_users users drawn
    with numpy's seed (all of them when there are fewer)."""
    import torch
    users = np.random.default_rng(seed).choice(model.n_users, min(n_users, model.n_users), replace=False)
    with torch.no_grad():
        top = torch.einsum("ukd,nd->ukn", model.tastes[torch.from_numpy(users), :2],
                           model.item_factors).topk(k, dim=2).indices.numpy()           # (users, 2, k)
    return float(np.mean([len(np.intersect1d(first, second)) for first, second in top]))


def account_picture(folder, account, person, taste, items, vectors, got, base):
    """results/shared_account_map.svg: one pair account's movies on the rating run's movie map,
    by person and by taste. The account shown: among those of at least 100 movies whose larger
    person holds at most 60% of them, the one whose purity is nearest the mean purity (a typical
    account where both people count). -> the picture's file name."""
    import pictures
    n = np.bincount(account)
    eligible = np.flatnonzero((n >= 100) & (base <= 0.6))
    chosen = eligible[np.argmin(np.abs(got[eligible] - mean_over_accounts(got, account)))]
    rows = np.flatnonzero(account == chosen)
    coordinates, _ = pictures.item_map(vectors)
    name = "shared_account_map.svg"
    pictures.account_map(folder / name, coordinates, items[rows], person[rows], taste[rows],
                         f"One account of two real people ({len(rows)} movies), the rating run's K=2 tastes: "
                         f"purity {got[chosen]:.2f}, the larger person's share {base[chosen]:.2f}")
    return name


def gain_over_one(task, value, one):
    """A shared-accounts row's figure against K=1's (one; None when K=1's run failed): the MSE
    difference (rating) or the relative NDCG@10 gain (ranking)."""
    if one is None:
        return ""
    return f"{value - one:+.4f}" if task == "rating" else f"{value / one - 1:+.1%}"


def told_persons_row(label, task, metric, here, scratch, one):
    """The table row of a model told who is who in each pooled account: rating, train.py's
    defaults on the same ratings under the persons' own ids (the same 75/25 split: it is drawn
    by row, in file order), each test rating predicted for its person; ranking,
    told_persons_ranking (in its own process). one: K=1's figure on the accounts."""
    print(f"{label}: {task}, told the persons ...", flush=True)
    if task == "rating":
        persons = argparse.Namespace(**{**vars(here), "data_dir": here.data_dir + PERSONS})
        row = train_row("rating_told", persons, scratch, ["--task=rating"])
    else:
        row = baseline_row("told_persons", argparse.Namespace(**{**vars(here), "task": "ranking"}))
    if "error" in row:
        return f"| {label} | {task} | told the persons | - | - | - | - | {row['error']} |"
    gain = gain_over_one(task, row[metric], one)
    return f"| {label} | {task} | told the persons | {metric.upper()} {row[metric]:.4f} | {gain} | | | |"


def one_taste_row(label, here, scratch, two):
    """The rating task's K=1 with its taste prior chosen on validation among ONE_TASTE_PRIORS,
    and K=2's gain against it. The defaults' taste prior was chosen for K=2, and a prior counted
    for every taste holds two tastes that agree back like one taste under twice the prior: K=1
    at the defaults is K=1 at half the prior K=2 effectively has. two: K=2's test MSE."""
    print(f"{label}: rating, K=1 at its own taste prior ...", flush=True)
    rows = {prior: train_row(f"rating_k1_prior{prior:g}", here, scratch,
                             ["--task=rating", "--n_tastes=1", f"--prior_tastes={prior:g}"])
            for prior in ONE_TASTE_PRIORS}
    rows = {prior: row for prior, row in rows.items() if "error" not in row}
    if not rows:
        return f"| {label} | rating | K=1 at its own taste prior | - | - | - | - | every run failed |"
    prior = min(rows, key=lambda p: rows[p]["val"]["mse"])
    against = "" if two is None else f"K=2 {gain_over_one('rating', two, rows[prior]['mse'])} against it"
    return (f"| {label} | rating | K=1, prior_tastes {prior:g} (the best of {len(rows)} on validation) | "
            f"MSE {rows[prior]['mse']:.4f} | {against} | | | |")


# What the shared-accounts table's columns mean (its report's closing paragraph).
SHARED_ACCOUNTS_NOTES = (
    "**Purity**: each of an account's movies goes to its dominant taste (the largest mixture "
    "weight); per account, the sum over tastes of the largest number of one person's movies "
    "among them, over the account's movies; averaged over accounts. One taste holding "
    "everything scores the largest person's share. **What the item vectors allow** (pairs, "
    "K=2, 500 accounts at random): with two tastes the dominant one is the sign of "
    "(A_1 - A_2) . e_j, a linear split of the run's item vectors without intercept. A "
    "logistic regression per account fitted on the persons themselves and scored on the same "
    "movies is the best any attention could do if it knew the persons; scored on held-out "
    "movies (5-fold) it is what such a split carries beyond the movies it was fitted on; "
    "2-means clusters of the account's movie vectors are what the movies' own grouping "
    "gives without the persons; co-occurrence: the same without any model, a spectral "
    "2-way split of the account's movies by their cosine co-occurrence among the other "
    "accounts (who watches what); cut in time (rating K=2 rows): no model either, each "
    "account's ratings in time order cut at its largest gap (two for triples): information "
    "the paper's score, without time, cannot use. **Told the persons**: the defaults trained with every "
    "training rating under its real person (rating: the same rows and split under the "
    "persons' ids, each test rating predicted for its person; ranking: the accounts' own "
    "split, each account ranking by the mixture of its persons' distributions, weighted "
    "by their shares of its training movies): what a model that knew who is who reaches, "
    "the reference for the gains of the tastes. **K=1 at its own taste prior** (rating): K=1 "
    "with prior_tastes chosen on validation among 10 to 40. The defaults' prior was chosen "
    "for K=2, and a prior counted for every taste holds two tastes that agree back like one "
    "taste under twice the prior: K=2's gain against this row is what the mixture adds. "
    "Test figures are the test MSE (rating) or test NDCG@10 (ranking) of the "
    "best-by-validation epoch; against K=1: the MSE difference, or the relative NDCG@10 "
    "gain.")


def shared_accounts(args):
    """Kula's first case, measured: real ML-1M users pooled into accounts of two and of three,
    both tasks trained on the pooled accounts with K = 1, 2 and 4, and the same people
    unpooled as the reference. For every mixture: its gain over K=1, and the purity of its
    tastes against the real people; for the rating task, K=1 at its own taste prior too."""
    full = loader.load("ml-1m", args.data_dir, allow_download=False)
    movies = Path(args.data_dir) / "ml-1m" / "movies.dat"
    table = ["| accounts | task | model | test figure | against K=1 | purity | largest person's share "
             "| the run's item vectors: linear split fitted / held out / 2-means |", "|---|---|---|---|---|---|---|---|"]
    purities, maps, overlaps = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-accounts-") as scratch:
        scratch = Path(scratch)
        sets = [("the same people, unpooled", args.data_dir, None)]
        times, time_purity = loader.timestamps("ml-1m", args.data_dir), {}
        for name, size in GROUPS:
            rows, account = pool_accounts(full, size, seed=args.accounts_seed)
            write_ratings_dat(scratch / name / "ml-1m", full, rows, user_ids=account + 1)
            write_ratings_dat(scratch / (name + PERSONS) / "ml-1m", full, rows)  # the persons told apart
            for folder in (name, name + PERSONS):
                if movies.is_file():
                    shutil.copy(movies, scratch / folder / "ml-1m" / "movies.dat")
            sets.append((f"{len(np.unique(account)):,} {name} ({len(rows):,} ratings)", str(scratch / name),
                         (account + 1, full.item_ids[full.items[rows]], full.user_ids[full.users[rows]])))
            by_time = purity(account, time_split(account, times[rows], size), full.users[rows])[0]
            time_purity[sets[-1][0]] = mean_over_accounts(by_time, account)
            if size == 2:
                cooccurring = (account, full.items[rows], full.users[rows])
        for label, data_dir, pooled in sets:
            here = argparse.Namespace(**{**vars(args), "dataset": "ml-1m", "data_dir": data_dir})
            for task, metric in (("rating", "mse"), ("ranking", "ndcg@10")):
                one = two = None
                for k in ACCOUNT_TASTES if pooled is not None else (1, 2):
                    print(f"{label}: {task}, K={k} ...", flush=True)
                    row = train_row(f"{task}_k{k}", here, scratch, [f"--task={task}", f"--n_tastes={k}"])
                    if "error" in row:
                        table.append(f"| {label} | {task} | K={k} | - | - | - | - | {row['error']} |")
                        continue
                    one, two = (row[metric] if k == 1 else one), (row[metric] if k == 2 else two)
                    gain = "" if k == 1 else gain_over_one(task, row[metric], one)
                    cells = ["", "", ""]
                    if pooled is None and k == 2:
                        from recommend import Recommender
                        overlaps[task] = top_overlap(Recommender.load(row["run_dir"], quiet=True).model)
                    if pooled is not None and k > 1:
                        taste, known, items, vectors = dominant_tastes(row["run_dir"], pooled[0], pooled[1])
                        account, person = pooled[0][known], pooled[2][known]
                        got, base = purity(account, taste, person)
                        cells = [f"{mean_over_accounts(got, account):.3f}", f"{mean_over_accounts(base, account):.3f}", ""]
                        purities[(label, task, k)] = (got, base)
                        if k == 2 and "pairs" in label:
                            cells[2] = " / ".join(f"{v:.3f}" for v in separability(account, person, vectors[items]))
                            if task == "rating":  # the same for both tasks: no model in it
                                cells[2] += f"; co-occurrence {cooccurrence_split(*cooccurring):.3f}"
                                maps.append(account_picture(Path(args.output).parent, account, person, taste,
                                                            items, vectors, got, base))
                        if k == 2 and task == "rating":  # no model either: the account's ratings cut in time
                            cells[2] += ("; " if cells[2] else "") + f"cut in time {time_purity[label]:.3f}"
                    table.append(f"| {label} | {task} | K={k} | {metric.upper()} {row[metric]:.4f} | {gain} | "
                                 + " | ".join(cells) + " |")
                if task == "rating":
                    table.append(one_taste_row(label, here, scratch, two))
                if pooled is not None:
                    table.append(told_persons_row(label, task, metric, here, scratch, one))
    lines = ["## Shared accounts: several people behind one account", "",
             f"Real ML-1M users pooled at random (seed {args.accounts_seed}) into accounts of two and of three people; a "
             "movie two of them rated is kept once (the first rating in file order, counted as that "
             "person's). Both tasks are trained with `train.py`'s defaults on the pooled accounts "
             "(their own protocols: the rating task's 75/25 split, the ranking task's RecBole "
             "protocol), with K = 1, 2 and 4 tastes, and on the same people unpooled.", "",
             *table, "",
             SHARED_ACCOUNTS_NOTES, "",
             "How alike the unpooled runs' two tastes are (`top_overlap`: each taste ranks every movie "
             "by U_k . e_j; 200 users, numpy seed 0): their top-10 lists share "
             + " and ".join(f"{v:.2f} movies ({task})" for task, v in overlaps.items()) + ".", "",
             machine_lines(f"python benchmark.py --shared-accounts --data_dir={args.data_dir_given}"
                           + (f" --accounts_seed={args.accounts_seed}" if args.accounts_seed else ""))]
    if purities:
        import pictures
        picture = Path(args.output).parent / "shared_accounts.svg"
        pictures.purity_histograms(picture, purities)
        lines[-1:-1] = [f"![purity per account]({picture.name})", "",
                        *(f"![one shared account's movies by person and by taste]({name})" for name in maps), ""]
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(Path(args.output), "shared-accounts", report)


# ----------------------------------------------------------------------------- scaling

def write_synthetic(path, n_users, n_items, n_ratings, seed=0):
    """An ML-25M-format ratings.csv of random (user, item, rating) triples, in chunks."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        out.write("userId,movieId,rating,timestamp\n")
        for start in range(0, n_ratings, 2_000_000):
            n = min(2_000_000, n_ratings - start)
            block = np.column_stack([rng.integers(1, n_users + 1, n), rng.integers(1, n_items + 1, n),
                                     rng.integers(1, 11, n), rng.integers(8e8, 1.6e9, n)])
            lines = [f"{u},{i},{r / 2:g},{t}" for u, i, r, t in block.tolist()]
            out.write("\n".join(lines) + "\n")


def scaling(args):
    """Time per epoch and peak memory versus size, K and d, and process count."""
    base = Path(args.scaling_dir)
    shapes = {"ml-1m x10 (synthetic)": ("x10", 60_400, 37_000, 10_000_000),
              "ml-25m shape (synthetic)": ("25m", 162_000, 59_000, 25_000_000)}
    cases = [(f"ml-1m (real), K={k} d={d}", args.data_dir, "ml-1m",
              [f"--n_tastes={k}", f"--dim={d}"], 1)
             for k, d in ((1, 32), (2, 32), (4, 32), (8, 32), (2, 16), (2, 64))]
    for label, (folder_name, n_users, n_items, n) in shapes.items():
        folder = base / folder_name
        ratings_csv = folder / "ml-25m" / "ratings.csv"
        if not ratings_csv.is_file():
            print(f"writing {ratings_csv} ({n:,} ratings) ...", flush=True)
            write_synthetic(ratings_csv, n_users, n_items, n)
        started = time.perf_counter()
        loader.load("ml-25m", folder, allow_download=False)  # parse (and fill the cache)
        parse_seconds = time.perf_counter() - started
        print(f"{label}: first load (parse) {parse_seconds:.1f} s", flush=True)
        processes = [1, 2] if "25m" in label else [1]
        for nproc in processes:
            cases.append((f"{label}, K=2 d=32, first parse {parse_seconds:.1f} s", str(folder), "ml-25m",
                          [f"--batch_size={args.large_batch}"], nproc))
    lines = ["## Scaling: time per epoch and peak memory", "",
             "| data, model | processes | ratings/epoch | s per epoch | peak MiB per process |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-scale-") as scratch:
        for k, (label, data_dir, dataset, overrides, nproc) in enumerate(cases):
            run_name = f"scale{k}"
            common = [f"--dataset={dataset}", f"--data_dir={data_dir}", "--download=False",
                      "--progress=False", f"--epochs={args.scaling_epochs}", "--patience=0",
                      f"--run_name={run_name}", f"--runs_dir={scratch}/runs",
                      f"--results_dir={scratch}/results", *overrides]
            if nproc == 1:
                command = [sys.executable, str(ROOT / "train.py"), *common]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *common]
            wall, peak, out, err, code = measure(command)
            if code != 0:
                lines.append(f"| {label} | {nproc} | - | failed: {err.strip()[-200:]} | - |")
                continue
            results = Path(scratch) / "results" / run_name
            summary = json.loads((results / "summary.json").read_text())
            import csv
            with open(results / "metrics.csv") as f:
                epoch_seconds = [float(r["epoch_seconds"]) for r in csv.DictReader(f)]
            # ru_maxrss of the children is the largest single process, i.e. per process.
            lines.append(f"| {label} | {nproc} | "
                         f"{summary['n_train']:,} | {np.median(epoch_seconds):.2f} | {peak:.0f} |")
            print(lines[-1], flush=True)
    lines += ["", f"Median time of the training steps of an epoch over {args.scaling_epochs} "
              "epochs (evaluation excluded); peak memory is the largest resident set of one "
              "process. Synthetic sets: uniform random users, items and half-star ratings, "
              "written in ML-25M's CSV format and read by loader.py; they train with "
              f"--batch_size={args.large_batch}.", "",
              machine_lines(f"python benchmark.py --scaling --data_dir={args.data_dir_given}")]
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(Path(args.output), "scaling", report)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m", choices=list(loader.DATASETS))
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--task", default="rating", choices=["rating", "ranking"],
                        help="rating: MSE peers on the 75/25 split; ranking: top-N peers on RecBole's protocol")
    parser.add_argument("--only", default="", help=f"comma-separated rows of: {', '.join(ROWS)}")
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmark.md"))
    parser.add_argument("--speed_pairs", type=int, default=3,
                        help="pairs (ours, then the peer) of the speed bar, back to back; its ratio is their median")
    parser.add_argument("--scaling", action="store_true", help="time/memory versus size instead")
    parser.add_argument("--shared-accounts", dest="shared_accounts", action="store_true",
                        help="real users pooled into shared accounts: gains over K=1 and purity")
    parser.add_argument("--accounts_seed", type=int, default=0,
                        help="--shared-accounts: the seed of the random pooling of users into accounts")
    parser.add_argument("--sizes", action="store_true",
                        help="the defaults on ML-1M and on small sets cut from it, against the peers")
    parser.add_argument("--scaling_dir", default=os.path.join(tempfile.gettempdir(),
                                                              "mfmixtaste-synthetic"))
    parser.add_argument("--scaling_epochs", type=int, default=2)
    parser.add_argument("--large_batch", type=int, default=65536,
                        help="batch size for the synthetic large sets")
    parser.add_argument("--_row", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The rows run from the project folder: paths given relative to the caller's folder must
    # mean the same there.
    args.data_dir_given = args.data_dir  # as the report's command line shows it
    args.data_dir, args.output, args.scaling_dir = (
        str(Path(p).resolve()) for p in (args.data_dir, args.output, args.scaling_dir))
    try:
        if args._row:
            run_row(args._row, args.task, args.dataset, args.data_dir)
        elif args.scaling:
            scaling(args)
        elif args.sizes:
            sizes(args)
        elif args.shared_accounts:
            shared_accounts(args)
        elif args.task == "ranking":
            ranking_peers(args)
        else:
            peers(args)
    except loader.DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
