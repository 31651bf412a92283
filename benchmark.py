"""Measure this project against its peers on the same split, in one run.

    python benchmark.py --data_dir=../shared/data                      # every row, ML-1M
    python benchmark.py --data_dir=../shared/data --only=mfmixtaste,svd # a quick look
    python benchmark.py --scaling                                       # time/memory vs size

Each row runs in its own process, timed from start to finish by this script, with that process's
peak resident memory. Rows: this project with train.py's defaults (`python train.py`, start to
finish), the same with n_tastes=1 (biased MF), the global mean, a bias-only baseline, and
scikit-surprise's SVD and SVD++ (optional: a clear message when it is missing). Everything uses
loader.split, so the test rows are those of train.py. The report goes to results/benchmark.md.
"""

import argparse
import json
import os
import platform
import re
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


def run_row(name, dataset, data_dir):
    """Child process: compute one baseline row and print it as JSON."""
    functions = {"global_mean": row_global_mean, "bias_only": row_bias_only,
                 "svd": lambda d, dd: row_surprise(d, dd, "svd"),
                 "svdpp": lambda d, dd: row_surprise(d, dd, "svdpp")}
    scores, extra = functions[name](dataset, data_dir)
    print(json.dumps({"scores": scores, "extra": extra}))


# ----------------------------------------------------------------------------- parent

def measure(command, env=None):
    """Run command through a small wrapper that reports its child's peak RSS; returns
    (wall seconds, peak MiB, stdout, stderr, returncode)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "file=sys.stderr); sys.exit(p.returncode)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    peak = re.search(r"^PEAK_KB (\d+)\n?", done.stderr, re.MULTILINE)
    stderr = done.stderr.replace(peak.group(0), "") if peak else done.stderr  # the child's own
    return wall, int(peak.group(1)) / 1024 if peak else float("nan"), done.stdout, stderr, \
        done.returncode


def failed_row(name, stderr):
    """A row whose process failed, with the last line it printed."""
    return {"row": name, "error": stderr.strip().splitlines()[-1] if stderr.strip() else "failed"}


def train_row(name, args, scratch, extra_overrides=()):
    run_name = f"bench-{name}-{os.getpid()}"
    command = [sys.executable, str(ROOT / "train.py"), f"--dataset={args.dataset}",
               f"--data_dir={args.data_dir}", "--download=False", "--progress=False",
               f"--run_name={run_name}", f"--runs_dir={scratch / 'runs'}",
               f"--results_dir={scratch / 'results'}", *extra_overrides]
    wall, peak, out, err, code = measure(command)
    if code != 0:
        return failed_row(name, err)
    summary = json.loads((scratch / "results" / run_name / "summary.json").read_text())
    return {"row": name, "mse": summary["test_mse"], "rmse": summary["test_rmse"],
            "mae": summary["test_mae"], "wall": wall, "peak_mib": peak,
            "note": f"best epoch {summary['best_epoch']} of {summary['epochs_run']}",
            "command": "python train.py " + " ".join(extra_overrides)}


def baseline_row(name, args):
    command = [sys.executable, str(ROOT / "benchmark.py"), f"--_row={name}",
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


def peers(args):
    chosen = args.only.split(",") if args.only else list(ROWS)
    unknown = set(chosen) - set(ROWS)
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(sorted(unknown))}; valid: {', '.join(ROWS)}")
    loader.load(args.dataset, args.data_dir, allow_download=False)  # parse once, fill the cache
    results = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-bench-") as scratch:
        for name in chosen:
            print(f"running {name} ...", flush=True)
            if name == "mfmixtaste":
                row = train_row(name, args, Path(scratch))
            elif name == "mfmixtaste_1thread":  # as Surprise's fit runs: one thread
                row = train_row(name, args, Path(scratch), ["--threads=1"])
            elif name == "mfmixtaste_k1":
                row = train_row(name, args, Path(scratch), ["--n_tastes=1"])
            else:
                row = baseline_row(name, args)
            print("  ", row, flush=True)
            results.append(row)
    report = peers_table(results, args)
    print(report)
    write_section(Path(args.output), "peers", report)


def peers_table(results, args):
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
    if "mfmixtaste" in by_row and by_row.get("svd", {}).get("fit_seconds"):
        ratio = by_row["mfmixtaste"]["wall"] / by_row["svd"]["fit_seconds"]
        lines += ["", f"Speed bar: the whole default `python train.py` run took "
                  f"{by_row['mfmixtaste']['wall']:.1f} s start to finish, "
                  f"{ratio:.2f} times Surprise SVD's `fit` ({by_row['svd']['fit_seconds']:.2f} s) "
                  "measured in the same benchmark run (target: at most 4)."]
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
    parser.add_argument("--only", default="", help=f"comma-separated rows of: {', '.join(ROWS)}")
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmark.md"))
    parser.add_argument("--scaling", action="store_true", help="time/memory versus size instead")
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
            run_row(args._row, args.dataset, args.data_dir)
        elif args.scaling:
            scaling(args)
        else:
            peers(args)
    except loader.DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
