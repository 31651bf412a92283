"""Measure this project against its peers on the same split, in one run.

    python benchmark.py --data_dir=../shared/data                      # every row, ML-1M
    python benchmark.py --data_dir=../shared/data --only=mfmixtaste,svd # a quick look
    python benchmark.py --scaling                                       # time/memory vs size
    python benchmark.py --generate=ml-25m --to=big/ratings.csv          # a synthetic set of ML-25M's shape
    python benchmark.py --large=big/ratings.csv                         # rating, ranking and ALS on such a file
    python benchmark.py --cost_curve                                    # time/memory vs interactions, users, items
    python benchmark.py --sizes --data_dir=../shared/data               # defaults on small sets
    python benchmark.py --user_fraction=0.1 --data_dir=../shared/data   # the same rows on 10% of ML-1M's users
    python benchmark.py --shared-accounts --data_dir=../shared/data     # real users pooled into accounts
    python benchmark.py --shared-accounts --accounts_seed=1 ...         # another draw of the accounts
    python benchmark.py --variant=item_bag --task=ranking --dataset=PATH # a train.py run of a model variant (bench/variants.py)

Each row runs in its own process, timed from start to finish by this script, with that process's
peak resident memory. Rows: this project with train.py's defaults (`python train.py`, start to
finish), the same with n_tastes=1 (biased MF), the global mean, a bias-only baseline, and
scikit-surprise's SVD and SVD++ (optional: a clear message when it is missing). Everything uses
loader.split, so the test rows are those of train.py. The report goes to results/benchmark.md.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import loader
from bench import peers, studies
from bench.peers import LABELS, ROOT, chosen_rows, machine_lines, measure_row

ROWS = ("mfmixtaste", "mfmixtaste_1thread", "mfmixtaste_k1", "global_mean", "bias_only", "svd",
        "svdpp")


# The replaced script (a 2020 PyTorch/Ignite trio), on this same protocol.
# Not run by this benchmark: the replaced script's ML-1M figures, typed in (its split differs: the
# published figure's ML-1M copy orders users 3000-6040 otherwise), marked so in the table.
REPLACED = [("replaced script, published (author's machine; another split)", 0.7878, "13m44s"),
            ("replaced script, run on a 2-core machine once (another session)", 0.7838, "194 s")]


def run_row(name, task, dataset, data_dir, columns="", split="random", choices=""):
    """Child process: compute one baseline row and print it as JSON (choices: the file where the
    searches leave their choices, peers.record_setting)."""
    functions = {"global_mean": peers.row_global_mean, "bias_only": peers.row_bias_only,
                 "svd": lambda d, dd, c: peers.row_surprise(d, dd, "svd", c, choices),
                 "svd_single": lambda d, dd, c: peers.row_surprise(d, dd, "svd", c, fixed=peers.chosen_setting(choices, "svd")),
                 "svdpp": lambda d, dd, c: peers.row_surprise(d, dd, "svdpp", c, choices)}
    if task == "ranking":
        functions = {name: lambda d, dd, c, n=name: peers.ranking_baseline(n, d, dd, c, split, choices)
                     for name in peers.RANKING_BASELINES}
        functions["told_persons"] = lambda d, dd, c: studies.told_persons_ranking(d, dd)
    scores, extra = functions[name](dataset, data_dir, columns)
    print(json.dumps({"scores": scores, "extra": extra}))


def speed_pairs(results, peer, peer_seconds, args, scratch, task_overrides=(), pair_peer=None):
    """The speed bar's ratios: our whole default run over the peer's time, one per pair of runs
    measured back to back. The table's two rows are the first pair; args.speed_pairs - 1 more
    pairs run ours, then the peer, again. This machine's speed drifts by up to half within an
    hour, and it drifts differently for our memory-bound two-thread steps than for a one-thread
    peer, so one pair can land anywhere in that range: the report gives the median of the
    pairs' ratios and their range. [] when either row is missing or failed. pair_peer: the row
    the later pairs run for the peer (default peer): one fit at the setting the peer's search
    chose, where the peer's row searches (a pair would otherwise search again: 20 minutes for
    SVD on ML-1M)."""
    by_row = {r["row"]: r for r in results if "error" not in r}
    if "mfmixtaste" not in by_row or peer not in by_row or not peer_seconds(by_row[peer]):
        return []
    ratios = [by_row["mfmixtaste"]["wall"] / peer_seconds(by_row[peer])]
    for _ in range(args.speed_pairs - 1):
        print(f"speed pair {len(ratios) + 1} of {args.speed_pairs} ...", flush=True)
        ours, theirs = (measure_row(name, args, scratch, task_overrides) for name in ("mfmixtaste", pair_peer or peer))
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


def versus_ease_search(by_row):
    """The ranking table's second bar: our whole run against EASE's whole process with the L2
    search that gives its figure (the ease row), as lines to add below the table ([] without both)."""
    if "mfmixtaste" not in by_row or "ease" not in by_row:
        return []
    ours, ease = by_row["mfmixtaste"]["wall"], by_row["ease"]["wall"]
    return ["", f"Against EASE's whole process with the L2 search that gives its figure ({ease:.1f} s): "
                f"{ours / ease:.2f} times (target: at most 1)."]


def rating_peers(args):
    chosen = chosen_rows(args, ROWS, LABELS)
    args.described = loader.load(args.dataset, args.data_dir, allow_download=False,  # parse once, fill the cache
                                 columns=args.columns).described
    results = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-bench-") as scratch:
        args.choices = str(Path(scratch) / "choices.json")  # SVD's choice, which the speed pairs fit again
        for name in chosen:
            print(f"running {name} ...", flush=True)
            row = measure_row(name, args, Path(scratch))
            print("  ", row, flush=True)
            results.append(row)
        speed = speed_pairs(results, "svd", lambda r: r["fit_seconds"], args, Path(scratch), pair_peer="svd_single")
    report = peers_table(results, args, speed)
    return report


def peers_table(results, args, speed=()):
    split = "the 75/25 split (seed 42)" if not args.described or "pre-split" not in " ".join(args.described) \
        else "the dataset's own test file"
    lines = [f"## Peers on {data_name(args)}: test rows of {split}", "", *data_lines(args),
             "| model | test MSE | RMSE | MAE | whole process (s) | one fit (s) | peak memory (MiB) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {LABELS[r['row']]} | - | - | - | - | - | - | {r['error']} |")
            continue
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") else "-"
        lines.append(f"| {LABELS[r['row']]} | {r['mse']:.4f} | {r['rmse']:.4f} | {r['mae']:.4f} "
                     f"| {r['wall']:.1f} | {fit} | {r['peak_mib']:.0f} | {r.get('note', '')} |")
    for label, mse, wall in REPLACED if data_name(args) == "ml-1m" else ():  # the replaced script's ML-1M figures
        lines.append(f"| {label} | {mse:.4f} | {mse ** 0.5:.4f} | - | {wall} (not run here) | - | - | 50 epochs; "
                     "a figure typed in, not measured by this run |")
    by_row = {r["row"]: r for r in results if "error" not in r}
    if speed:
        lines += ["", speed_line(speed, "python train.py", by_row["mfmixtaste"]["wall"],
                                 "Surprise SVD's `fit`", by_row["svd"]["fit_seconds"], 2.0)]
        if "mfmixtaste_1thread" in by_row:
            one = by_row["mfmixtaste_1thread"]["wall"]
            lines[-1] += (f" Surprise's `fit` runs on one thread while `train.py` uses two (torch's "
                          f"default here); on one thread (`--threads=1`) the whole run took {one:.1f} s, "
                          f"{one / by_row['svd']['fit_seconds']:.2f} times SVD's `fit`.")
    lines += ["", "Whole process: start to finish (imports, data from the parse cache, for the peers "
              "their search on validation and three seeds, training, evaluation, writing results), timed "
              "by benchmark.py; one fit: the Surprise rows' `fit` alone at their chosen setting. Peak memory "
              "is the process's maximum resident set size. Every model fits the same training rows (95% of "
              "the training part) and is chosen on the other 5% (ours: its epoch; the peers: their settings, "
              "peers.SURPRISE_GRIDS); the test rows choose nothing. Stochastic rows are means of seeds 0-2 "
              "(their spread in the notes).", "", machine_lines(args.command)]
    return "\n".join(lines) + "\n"


def data_name(args):
    """The dataset as a report names it: the MovieLens name (and the share of its users cut), or
    the file's or folder's name."""
    if getattr(args, "user_fraction", 1.0) != 1.0:
        return f"{args.dataset}, {args.user_fraction:.0%} of its users (seed 0)"
    return args.dataset if loader.is_movielens(args.dataset) else f"`{Path(args.dataset).name}`"


def cut_users(args, scratch):
    """args.user_fraction < 1: write that share of the MovieLens set's users (all their ratings,
    seeded, studies.subsample) into scratch as the same set, and point args.data_dir there.
    -> the report's section suffix ("" for the whole set)."""
    if args.user_fraction == 1.0:
        return ""
    if not 0.0 < args.user_fraction < 1.0 or args.dataset != "ml-1m":
        sys.exit(f"error: --user_fraction={args.user_fraction:g} must lie in (0, 1] and cuts ml-1m "
                 f"(not --dataset={args.dataset})")
    full = loader.load(args.dataset, args.data_dir, allow_download=False)
    folder = Path(scratch) / args.dataset
    studies.write_ratings_dat(folder, full, studies.subsample(full, "users", args.user_fraction))
    for name in ("movies.dat", "users.dat"):  # titles and genres for the tables' studies
        source = Path(args.data_dir) / args.dataset / name
        if source.is_file():
            (folder / name).write_bytes(source.read_bytes())
    args.data_dir = str(scratch)
    return f"-users-{args.user_fraction:g}"


def data_lines(args):
    """What train.py said it read, for a file (a MovieLens table needs no such lines)."""
    if loader.is_movielens(args.dataset) or not args.described:
        return []
    return ["Read as `train.py` reads it: " + "; ".join(args.described) + ".", ""]


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


RANKING_ROWS = ("mfmixtaste", "mfmixtaste_k1", "pop", "ease", "ease_single", "admmslim", "als", "bpr")


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


def ranking_peers(args):
    chosen = chosen_rows(args, RANKING_ROWS, RANKING_LABELS)
    if "ease_single" in chosen:  # it fits at the L2 the ease row's search chooses: that search runs first
        chosen = [name for name in chosen if name != "ease"]
        chosen.insert(chosen.index("ease_single"), "ease")
    task = peers.ranking_task(args.dataset, args.data_dir, args.columns, split=args.split)  # also fills the parse cache
    split = [f"--split={args.split}"] if args.split != "random" else []
    results = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-bench-") as scratch:
        args.choices = str(Path(scratch) / "choices.json")  # each search's choice, for the rows that reuse it
        for name in chosen:
            print(f"running {name} ...", flush=True)
            row = measure_row(name, args, Path(scratch), ["--task=ranking", *split])
            print("  ", {k: v for k, v in row.items() if k not in ("run_dir", "stdout")}, flush=True)
            results.append(row)
        speed = speed_pairs(results, "ease_single", lambda r: r["wall"], args, Path(scratch), ["--task=ranking", *split])
        report = ranking_table(results, args, task, speed)
        report += "\n".join(studies.diversity_table(task, results, args.data_dir, args.dataset, args.items)) + "\n"
        report += "\n".join(studies.mixture_table(task, results)) + "\n"
    return report


def ranking_table(results, args, task, speed=()):
    k = task.k
    names = [f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "hit", "precision")]
    protocol = (f"Ratings >= 3 as positives, 10-core filter ({task.n_interactions:,} interactions, "
                f"{task.n_users:,} users, {task.n_items:,} items), each user's interactions split "
                "80/10/10 at random (seed 2020)") if loader.is_movielens(args.dataset) and args.split == "random" else \
        "The data as `train.py --task=ranking` reads, filters and splits it (its first lines: " + \
        "; ".join(task.described) + ")"
    lines = [f"## Ranking on {data_name(args)}: every item ranked for every user", "",
             f"{protocol}; the test ranking masks the user's training and validation items. Every model fits "
             f"the training part and is chosen on validation NDCG@{k}; the test part chooses nothing.", "",
             "| model | " + " | ".join(n.replace("@", "@") for n in names)
             + " | wall time (s) | peak memory (MiB) | notes |",
             "|---|" + "---|" * (len(names) + 3)]
    for r in results:
        if "error" in r:
            lines.append(f"| {RANKING_LABELS[r['row']]} | " + "- | " * (len(names) + 2) + f"{r['error']} |")
            continue
        lines.append(f"| {RANKING_LABELS[r['row']]} | " + " | ".join(f"{r[n]:.4f}" for n in names)
                     + f" | {r['wall']:.1f} | {r['peak_mib']:.0f} | {r.get('note', '')} |")
    published = data_name(args) == "ml-1m"  # RecBole's table is of the whole ML-1M: beside no other set
    for label, ndcg, recall in PUBLISHED if published else ():
        lines.append(f"| {label}, published by RecBole | {ndcg:.4f} | {recall:.4f} | - | - | - | - | - "
                     "| published figure, not run here |")
    by_row = {r["row"]: r for r in results if "error" not in r}
    if speed:  # below the table, not inside it
        lines += ["", speed_line(speed, "python train.py --task=ranking", by_row["mfmixtaste"]["wall"],
                                 "a whole EASE process with one fit, that reads, filters, splits, fits, "
                                 "scores and ranks every user", by_row["ease_single"]["wall"], 1.5)]
    lines += versus_ease_search(by_row)
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
              machine_lines(args.command)]
    return "\n".join(lines) + "\n"


def main():
    if sys.argv[1:2] and sys.argv[1].startswith("--variant"):  # the rest are train.py's --key=value
        from bench import variants
        name = sys.argv[1].partition("=")[2]
        if name not in variants.VARIANTS:
            sys.exit(f"error: --variant={name} is not one of {', '.join(variants.VARIANTS)} (bench/variants.py)")
        sys.exit(variants.train_variant(name, sys.argv[2:]))
    parser = command_line()
    args = parser.parse_args()
    peers.exit_on_terminate()
    args.command = shlex.join(["python", "benchmark.py", *sys.argv[1:]])  # the reports' Command: line, as given
    # The rows run from the project folder: paths given relative to the caller's folder must
    # mean the same there.
    args.data_dir, args.output, args.scaling_dir = (
        str(Path(p).resolve()) for p in (args.data_dir, args.output, args.scaling_dir))
    if not loader.is_movielens(args.dataset):
        args.dataset = str(Path(args.dataset).resolve())
    args.items = args.items and str(Path(args.items).resolve())
    run(args)


def command_line():
    """The command line's parser (main; tests check the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m",
                        help=f"a MovieLens name ({', '.join(loader.DATASETS)}) or a file or folder, as train.py takes")
    parser.add_argument("--data_dir", default="data", help="MovieLens names: where their files are")
    parser.add_argument("--columns", default="", help="a file's columns, as train.py's --columns")
    parser.add_argument("--items", default="", help="a file naming the items (and their genres), as train.py's --items")
    parser.add_argument("--task", default="rating", choices=["rating", "ranking"],
                        help="rating: MSE peers on the 75/25 split; ranking: top-N peers on RecBole's protocol")
    parser.add_argument("--split", default="random", choices=["random", "time", "last"],
                        help="--task=ranking: every row on train.py's --split (time: a global cut; last: each user's latest)")
    parser.add_argument("--only", default="", help=f"comma-separated rows of the task's table: rating {', '.join(ROWS)}; "
                                                   f"ranking {', '.join(RANKING_ROWS)}")
    parser.add_argument("--user_fraction", type=float, default=1.0,
                        help="the rating or ranking table on a seeded random share of ML-1M's users (0.1: 604 "
                             "users, about 100k ratings, ML-100K's size), cut into a temporary folder")
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
    parser.add_argument("--fold_in", action="store_true",
                        help="new users without retraining: held-out users folded in, against trained-in, EASE, popularity")
    parser.add_argument("--fold_in_steps", type=int, default=0,
                        help="--fold_in: steps of Adam fitting each new user (default 0: the run's own, as recommend.py)")
    parser.add_argument("--fold_in_seeds", default="0",
                        help="--fold_in: the numpy seeds of the held-out users, comma-separated (each: two runs); "
                             "the table gives their mean")
    parser.add_argument("--weights_study", action="store_true",
                        help="event types: ML-1M's ratings as views, carts, purchases; unweighted, weighted, purchases only")
    parser.add_argument("--sniffers", action="store_true",
                        help="awkward files read by our dialect guess, CleverCSV's and DuckDB's (pip install clevercsv duckdb)")
    parser.add_argument("--cost_curve", action="store_true",
                        help="time and memory against interactions, users and items (synthetic sets), with ALS and EASE")
    parser.add_argument("--large", default="",
                        help="a large file (e.g. --generate=ml-25m's): a one-epoch rating run against ALS, then ranking")
    parser.add_argument("--large_repeats", type=int, default=3, help="--large: pairs of rating and ALS processes")
    parser.add_argument("--large_ranking_epochs", type=int, default=1,
                        help="--large: epochs of the ranking run, each evaluated (0: none)")
    parser.add_argument("--generate", choices=list(studies.SHAPES),
                        help="write synthetic interactions of a real set's shape (users, items, rows) as a CSV "
                             "that --dataset reads (to --to), instead of a benchmark")
    parser.add_argument("--to", default="", help="--generate: the CSV file to write")
    parser.add_argument("--_row", default="", help=argparse.SUPPRESS)
    parser.add_argument("--choices", default="", help=argparse.SUPPRESS)  # a child row's: peers.record_setting's file
    return parser


def run(args):
    """The study or table the command line asks for, printed and written into the report."""
    if args.generate:
        target = Path(args.to or Path(tempfile.gettempdir()) / f"mfmixtaste-{args.generate}" / "ratings.csv")
        rows = studies.write_interactions(target, *studies.SHAPES[args.generate])
        print(f"wrote {rows:,} interactions shaped like {args.generate} to {target}")
        return
    try:
        if args._row:
            run_row(args._row, args.task, args.dataset, args.data_dir, args.columns, args.split, args.choices)
            return
        section, study = (("scaling", studies.scaling) if args.scaling else ("large", studies.large) if args.large
                          else ("cost-curve", studies.cost_curve) if args.cost_curve
                          else ("sniffers", studies.sniffers) if args.sniffers
                          else (_per_dataset("fold-in", args), studies.fold_in_study) if args.fold_in
                          else ("event-weights", studies.weights_study) if args.weights_study
                          else ("sizes", studies.sizes) if args.sizes
                          else ("shared-accounts", studies.shared_accounts) if args.shared_accounts
                          else (_per_dataset("ranking", args), ranking_peers) if args.task == "ranking"
                          else (_per_dataset("peers", args), rating_peers))
        with tempfile.TemporaryDirectory(prefix="mfmixtaste-cut-") as scratch:  # MovieLens may not be kept
            section += cut_users(args, scratch)
            report = study(args)
    except loader.DataError as error:
        sys.exit(f"error: {error}")
    print(report)
    write_section(Path(args.output), section, report)


def _per_dataset(section, args):
    """A table's or study's section for ML-1M, or its own section for another dataset (Beauty's
    ranking table or fold-in beside ML-1M's, not over it)."""
    return section if args.dataset == "ml-1m" else f"{section}-{loader.dataset_name(args.dataset)}"


if __name__ == "__main__":
    main()
