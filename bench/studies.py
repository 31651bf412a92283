"""The research studies of benchmark.py, each a report of its own beside the peers' tables:

- sizes: the defaults on ML-1M and on smaller sets cut from it, against the same peers;
- shared accounts: real users pooled into accounts, do the tastes find the people behind them;
- the genre analysis of the ranking table: do users of more diverse tastes gain from the mixture;
- scaling: time per epoch and peak memory against data size, tastes, dimension and processes.

Each study returns its report as markdown (benchmark.py writes it into results/benchmark.md).
"""

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import loader
from bench.peers import (
    LABELS,
    PAIR_DEFAULTS,
    ROOT,
    Scorer,
    baseline_row,
    chosen_rows,
    gram_matrix,
    machine_lines,
    measure,
    measure_row,
    train_row,
)


def per_user_test_ndcg(task, run_dir):
    """Test NDCG@k of each user for the best model of a train.py ranking run folder (NaN for a
    user without test items)."""
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


def diversity_table(task, rows, data_dir, dataset, items=""):
    """The paper's question: does the mixture help users whose tastes span more genres? Over the
    users with test items (a user too small to split has none)."""
    import pandas as pd
    movies = loader.load_movies(dataset, data_dir, items=items)
    runs = {r["row"]: r for r in rows if "run_dir" in r}
    if movies is None or not any(len(g) for g in movies["genres"]):
        return ["", "(The genre analysis needs genres: MovieLens's movie file, or an --items file with a genres "
                "column. Skipped.)"]
    if not {"mfmixtaste", "mfmixtaste_k1"} <= set(runs):
        return ["", "(The genre analysis needs both of this project's rows.)"]
    ndcg = {name: per_user_test_ndcg(task, runs[name]["run_dir"]) for name in ("mfmixtaste", "mfmixtaste_k1")}
    tested = np.isfinite(ndcg["mfmixtaste"])
    ndcg = {name: values[tested] for name, values in ndcg.items()}
    span = genre_span(task, movies)[tested]
    n_genres = len({g for names in movies["genres"] for g in names})
    quartile = pd.qcut(span, 4, labels=False, duplicates="drop")
    k = task.k
    mixture_k = json.loads((runs["mfmixtaste"]["run_dir"] / "config.json").read_text())["n_tastes"]
    lines = ["", f"### Do users with more diverse tastes gain more from K={mixture_k} tastes than from one?", "",
             f"Test NDCG@{k} per user of the two best-by-validation models above, grouped by how many of "
             f"the {n_genres} genres the user's training items span, in quartiles of users:", "",
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


# Bins of users by their training items for mixture_use: (first, last) counts, inclusive.
HISTORY_BINS = ((1, 3), (4, 5), (6, 8), (9, 15), (16, 50), (51, 200), (201, None))


def mixture_use(task, model, pairs_per_block=1 << 20):
    """How much a ranking model's mixture does, on validation (the test set chooses nothing):
    NDCG@k as trained and with the attention off (every mixture weight 1/K: each user scores
    with the mean of their tastes, one vector), over all users and by training items; the mean
    cosine between a user's tastes (1: copies of one vector); the mean largest mixture weight on
    the training pairs and the share of pairs where it exceeds 0.9 (1/K: no choice made). The
    model is left as it was."""
    import copy

    import torch
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        averaged.user_factors[:, 1] = 0  # attention rows (n_users, K, d): logits 0, weights 1/K
        per_user = {"trained": task.per_user(model, "val")[:, 0].numpy(),
                    "averaged": task.per_user(averaged, "val")[:, 0].numpy()}
        tastes = torch.nn.functional.normalize(model.tastes, dim=-1)                # (n_users, K, d)
        cosines = tastes @ tastes.transpose(1, 2)                                   # (n_users, K, K)
        upper = torch.triu_indices(model.n_tastes, model.n_tastes, offset=1)
        cosine = float(cosines[:, upper[0], upper[1]].mean())
        pairs = task.training_matrix().tocoo()
        largest = torch.cat([model.mixture_weights(torch.from_numpy(pairs.row[s:s + pairs_per_block]).long(),
                                                   torch.from_numpy(pairs.col[s:s + pairs_per_block]).long()).max(1).values
                             for s in range(0, pairs.nnz, pairs_per_block)])          # (pairs,)
    counts = np.bincount(pairs.row, minlength=task.n_users)
    validated = np.isfinite(per_user["trained"])
    bins = [("all users", validated)]
    bins += [(f"{first}-{last}" if last else f"{first} and more",
              validated & (counts >= first) & (counts <= (last or counts.max())))
             for first, last in HISTORY_BINS]
    return {"bins": [(label, int(members.sum()), float(per_user["trained"][members].mean()),
                      float(per_user["averaged"][members].mean())) for label, members in bins if members.any()],
            "cosine": cosine, "largest_weight": float(largest.mean()),
            "decided_share": float((largest > 0.9).float().mean())}


def mixture_table(task, rows):
    """mixture_use of the benchmark's mfmixtaste row, as report lines (none for K=1)."""
    from recommend import Recommender
    run = next((r for r in rows if r["row"] == "mfmixtaste" and "run_dir" in r), None)
    if run is None:
        return []
    model = Recommender.load(run["run_dir"], quiet=True).model
    if model.n_tastes < 2:
        return []
    use, k = mixture_use(task, model), task.k
    lines = ["", f"### What the K={model.n_tastes} tastes add", "",
             f"Validation NDCG@{k} of the mfmixtaste row's chosen model as trained, and with its attention "
             f"off (each user scoring with the mean of their tastes), by the user's training items. A "
             f"user's tastes have mean cosine {use['cosine']:.2f} to each other (1: copies of one vector); "
             f"on the training pairs the largest mixture weight is {use['largest_weight']:.2f} on average "
             f"(1/K = {1 / model.n_tastes:.2f}: no choice), over 0.9 on {use['decided_share']:.0%} of them.", "",
             "| training items | users | as trained | tastes averaged | difference |", "|---|---|---|---|---|"]
    for label, users, trained, averaged in use["bins"]:
        change = f"{(trained - averaged) / averaged:+.1%}" if averaged else "-"
        lines.append(f"| {label} | {users:,} | {trained:.4f} | {averaged:.4f} | {change} |")
    return lines


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
              machine_lines(args.command)]
    report = "\n".join(lines) + "\n"
    return report


SIZE_LABELS = {**LABELS, "mfmixtaste_pair": "this project, old defaults (prior per pair 0.03)"}


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
        times, time_purity = loader.load("ml-1m", args.data_dir, allow_download=False).timestamps, {}
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
             machine_lines(args.command)]
    if purities:
        import pictures
        picture = Path(args.output).parent / "shared_accounts.svg"
        pictures.purity_histograms(picture, purities)
        lines[-1:-1] = [f"![purity per account]({picture.name})", "",
                        *(f"![one shared account's movies by person and by taste]({name})" for name in maps), ""]
    report = "\n".join(lines) + "\n"
    return report


# Shapes of real sets for the generator: (users, items, interactions).
SHAPES = {"ml-100k": (943, 1_682, 100_000), "ml-1m": (6_040, 3_706, 1_000_209), "ml-10m": (69_878, 10_677, 10_000_054),
          "ml-25m": (162_541, 59_047, 25_000_095), "1m-users": (1_000_000, 200_000, 100_000_000)}


def synthetic_interactions(n_users, n_items, n_rows, seed=0, n_groups=20, block=2_000_000):
    """Interactions with the marginals of real sets, in blocks of users: -> (users, items, ratings,
    timestamps), each (about n_rows,), users in order. Activity: each user's count lognormal
    (sigma 1.2, at least 5: heavy-tailed, as ML-25M's median 71, mean 154, max 32k); item
    popularity Zipf-like (item rank r drawn with weight (r + 10)^-1.1: the top 1% of items take
    about a fifth of the rows). Planted tastes: items fall in n_groups groups; each user holds
    1-3 of them and takes 60% of the items from those groups (by popularity within the group),
    the rest from the whole catalogue. Ratings in half stars, higher inside a user's groups;
    times spread over a user's own span. A (user, item) drawn twice is kept once."""
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(0.0, 1.2, n_users)
    counts = np.maximum(5, np.round(counts * (n_rows / counts.sum()))).astype(np.int64)
    weight = (np.arange(n_items) + 10.0) ** -1.1
    item_of_rank = rng.permutation(n_items)                  # popularity rank -> item id
    group = rng.integers(0, n_groups, n_items)              # each item's taste group
    cumulative = np.cumsum(weight) / weight.sum()
    in_group = [np.flatnonzero(group[item_of_rank] == g) for g in range(n_groups)]  # ranks, by popularity
    group_cumulative = [np.cumsum(weight[r]) / weight[r].sum() for r in in_group]
    step = max(1, block // int(counts.mean()))
    for first in range(0, n_users, step):
        last = min(n_users, first + step)
        held = rng.integers(0, n_groups, (last - first, 3))   # each user's groups: the first n_held of them
        n_held = rng.integers(1, 4, last - first)

        def draw(users, held=held, n_held=n_held, first=first):  # (n,) users of this block -> (n,) items
            chosen_group = held[users - first, rng.integers(0, n_held[users - first])]
            ranks = np.searchsorted(cumulative, rng.random(len(users))).clip(max=n_items - 1)
            from_group = rng.random(len(users)) < 0.6
            for g in range(n_groups):
                rows = np.flatnonzero(from_group & (chosen_group == g))
                if len(rows) and len(in_group[g]):
                    ranks[rows] = in_group[g][np.searchsorted(group_cumulative[g], rng.random(len(rows))).clip(
                        max=len(in_group[g]) - 1)]
            return item_of_rank[ranks]

        # Draw, keep each (user, item) once, and draw again what each user still lacks (a heavy
        # user meets the popular items many times over): four rounds come within a few percent.
        want = np.minimum(counts[first:last], n_items)
        keys = np.zeros(0, dtype=np.int64)
        for _ in range(4):
            have = np.bincount(keys // n_items - first, minlength=last - first)
            lacking = np.maximum(want - have, 0)
            if not lacking.any():
                break
            users = np.repeat(np.arange(first, last), np.ceil(lacking * 1.3).astype(np.int64))
            keys = np.unique(np.concatenate([keys, users.astype(np.int64) * n_items + draw(users)]))
        users, items = keys // n_items, keys % n_items
        # Each user cut to its count, keeping a random subset of its items (keys are sorted by user).
        per_user = np.bincount(users - first, minlength=last - first)
        order = np.lexsort((rng.random(len(users)), users))
        position = np.empty(len(users), dtype=np.int64)
        position[order] = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        users, items = users[position < want[users - first]], items[position < want[users - first]]
        liked = (group[items][:, None] == held[users - first]).any(1)
        ratings = np.clip(np.round((3.0 + 0.8 * liked + rng.normal(0, 0.9, len(users))) * 2) / 2, 0.5, 5.0)
        begin = rng.integers(8e8, 1.5e9, last - first)[users - first]
        times = begin + rng.integers(0, 10 ** 8, len(users))  # within three years of the user's start
        yield users, items, ratings.astype(np.float32), times


def write_interactions(path, n_users, n_items, n_rows, seed=0):
    """synthetic_interactions written as an ML-25M-style ratings.csv (userId, movieId, rating,
    timestamp; ids from 1), through pyarrow's CSV writer. -> rows written."""
    import pyarrow as pa
    import pyarrow.csv as pv
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("userId", pa.int64()), ("movieId", pa.int64()), ("rating", pa.float32()),
                        ("timestamp", pa.int64())])
    written = 0
    with pv.CSVWriter(str(path) + ".part", schema) as out:
        for users, items, ratings, times in synthetic_interactions(n_users, n_items, n_rows, seed):
            out.write_table(pa.table([users + 1, items + 1, ratings, times], schema=schema))
            written += len(users)
    Path(str(path) + ".part").replace(path)
    return written


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
            write_interactions(ratings_csv, n_users, n_items, n)
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
              machine_lines(args.command)]
    report = "\n".join(lines) + "\n"
    return report


# A three-iteration implicit ALS (64 factors) over every row of a file, as one whole process: the
# yardstick of a one-epoch rating run on the same file (docs/scale.md).
PEER_PROCESS = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np, implicit, loader
from bench import peers
from scipy.sparse import csr_matrix
from threadpoolctl import threadpool_limits
ratings = loader.load({dataset!r}, allow_download=False)
X = csr_matrix((np.ones(len(ratings), dtype=np.float32), (ratings.users, ratings.items)),
               shape=(ratings.n_users, ratings.n_items))
started = time.perf_counter()
if {peer!r} == "als":
    with threadpool_limits(1, "blas"):
        implicit.cpu.als.AlternatingLeastSquares(factors=64, iterations=3, random_state=0).fit(X, show_progress=False)
else:
    peers.ease(X, 100.0)
print("fit_seconds", time.perf_counter() - started)
"""


def peer_process(dataset, peer="als"):
    """The command of a whole process fitting a peer on every row of a file: "als" (implicit,
    64 factors, 3 iterations) or "ease" (L2 100)."""
    return [sys.executable, "-c", PEER_PROCESS.format(root=str(ROOT), dataset=dataset, peer=peer)]


def timed_train_run(name, args, dataset, scratch, overrides):
    """A whole train.py process on a file, timed with its peak memory (peers.train_row): its row
    and the rows of its metrics.csv; a failed run stops the study with the line it ended on."""
    row = train_row(name, argparse.Namespace(dataset=dataset, data_dir=args.data_dir), Path(scratch), overrides)
    if "error" in row:
        raise loader.DataError(f"{name} failed: {row['error']}")
    with open(Path(scratch) / "results" / row["run_dir"].name / "metrics.csv") as f:
        return row, list(csv.DictReader(f))


def large(args):
    """Scale at one file's size (benchmark.py --large=FILE, e.g. --generate=ml-25m's): whole
    processes measured side by side, args.large_repeats times, medians and ranges: a one-epoch
    rating run against a three-iteration implicit ALS (64 factors) with its loading; then one
    ranking run of args.large_ranking_epochs epochs, each evaluated (every item ranked for every
    user), its phases read from its own metrics."""
    dataset = str(Path(args.large).resolve())
    started = time.perf_counter()
    ratings = loader.load(dataset, allow_download=False)  # parse once (and fill the cache): the runs read the cache
    lines = [f"## Large data: {Path(dataset).name}", "",
             f"{len(ratings):,} rows, {ratings.n_users:,} users, {ratings.n_items:,} items; first parse "
             f"{time.perf_counter() - started:.1f} s. Whole processes (imports, loading from the parse cache, "
             "the run, its files), each the median of the repeats run side by side, with the range.", "",
             "| process | wall s (median, range) | peak GiB | figures |", "|---|---|---|---|"]
    del ratings
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-large-") as scratch:
        rating, als = "rating, 1 epoch", "implicit ALS, 64 factors, 3 iterations"
        timings, figures = {rating: [], als: []}, {}
        for _ in range(args.large_repeats):
            row, _ = timed_train_run("rating", args, dataset, scratch, ["--epochs=1"])
            timings[rating].append((row["wall"], row["peak_mib"]))
            figures[rating] = (row["stdout"].strip().splitlines() or [""])[-1][:120]
            wall, peak, out, err, code = measure(peer_process(dataset))
            if code:
                raise loader.DataError(f"{als} failed: {err.strip()[-300:]}")
            timings[als].append((wall, peak))
            figures[als] = (out.strip().splitlines() or [""])[-1][:120]
            for name in timings:
                print(f"{name}: {timings[name][-1][0]:.1f} s, {timings[name][-1][1] / 1024:.2f} GiB", flush=True)
        for name, runs in timings.items():
            walls = sorted(w for w, _ in runs)
            lines.append(f"| {name} | {np.median(walls):.1f} ({walls[0]:.1f}-{walls[-1]:.1f}) | "
                         f"{max(p for _, p in runs) / 1024:.2f} | {figures[name]} |")
        rating_walls, als_walls = ([w for w, _ in runs] for runs in timings.values())
        ratios = sorted(r / a for r, a in zip(rating_walls, als_walls))
        lines += ["", f"One-epoch rating run over ALS, pair by pair: median {np.median(ratios):.2f} "
                      f"({ratios[0]:.2f}-{ratios[-1]:.2f}).", ""]
        if args.large_ranking_epochs:
            row, rows = timed_train_run("ranking", args, dataset, scratch, [
                "--task=ranking", f"--epochs={args.large_ranking_epochs}", "--eval_every=1", "--patience=0",
                "--test_curve=False"])  # val_seconds: a validation ranking alone
            lines += [f"Ranking, {args.large_ranking_epochs} epoch(s), each evaluated: whole process {row['wall']:.0f} s, "
                      f"peak {row['peak_mib'] / 1024:.2f} GiB; epochs' training "
                      f"{', '.join(r['epoch_seconds'] for r in rows)} s; a validation ranking (every item for every "
                      f"user) {', '.join(r['val_seconds'] for r in rows)} s; test NDCG@10 {row['ndcg@10']:.4f}, "
                      f"validation {row['val']['ndcg@10']:.4f}. Its first lines:", "", "```",
                      *[line for line in row["stdout"].splitlines() if not line.startswith("epoch ")][:12], "```", ""]
            print("\n".join(lines[-8:]), flush=True)
    lines += [machine_lines(f"python benchmark.py --large={args.large}")]
    return "\n".join(lines) + "\n"


# The cost curve's sizes: a base shape and each axis at 1/8, 1/4 and 1/2 of it, the others held.
CURVE_BASE = (32_000, 8_000, 4_000_000)  # users, items, interactions
CURVE_EASE_MOST = 16_000  # EASE's items x items inverse in float64: 2 GB at 16k items, 14 GB at ML-25M's 59k


def cost_curve(args):
    """Time and peak memory against interactions, users and items (benchmark.py --cost_curve):
    synthetic sets (write_interactions) at CURVE_BASE and each axis at 1/8, 1/4, 1/2 of it, the
    others held; per set, whole processes: a one-epoch rating run, a one-epoch ranking run with
    one validation ranking, ALS (3 iterations, 64 factors) and EASE where its items allow.
    The figures go to the table and to docs' picture (pictures.cost_curve)."""
    base_users, base_items, base_rows = CURVE_BASE
    shapes = [("base", base_users, base_items, base_rows)]
    for share in (8, 4, 2):
        shapes += [("interactions", base_users, base_items, base_rows // share),
                   ("users", base_users // share, base_items, base_rows),
                   ("items", base_users, base_items // share, base_rows)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-curve-") as scratch:
        for axis, n_users, n_items, n_rows in shapes:
            path = Path(scratch) / f"{n_users}-{n_items}-{n_rows}.csv"
            if not path.is_file():
                write_interactions(path, n_users, n_items, n_rows)
            loader.load(str(path), allow_download=False)  # the parse cache, outside the timings
            found = {"axis": axis, "users": n_users, "items": n_items, "interactions": n_rows}
            for task, extra in (("rating", []), ("ranking", ["--task=ranking", "--eval_every=1", "--test_curve=False"])):
                row, [epoch] = timed_train_run(f"{task}-{path.stem}", args, str(path), scratch,
                                               ["--epochs=1", "--patience=0", *extra])
                found.update({f"{task}_epoch": float(epoch["epoch_seconds"]), f"{task}_wall": row["wall"],
                              f"{task}_peak": row["peak_mib"] / 1024})
                if task == "ranking":
                    found["ranking_eval"] = float(epoch["val_seconds"])
            for peer in ("als", "ease"):
                if peer == "ease" and n_items > CURVE_EASE_MOST:
                    continue
                wall, peak, out, err, code = measure(peer_process(str(path), peer))
                if code:
                    raise loader.DataError(f"{peer} failed: {err.strip()[-300:]}")
                found.update({f"{peer}_fit": float(out.split()[-1]), f"{peer}_wall": wall, f"{peer}_peak": peak / 1024})
            rows.append(found)
            print(found, flush=True)
            shutil.rmtree(Path(scratch) / "runs", ignore_errors=True)
    lines = ["## Cost curve: time and memory against interactions, users and items", "",
             "| axis | users | items | interactions | rating: epoch s, whole s, GiB | ranking: epoch s, "
             "validation ranking s, whole s, GiB | ALS 3 it.: fit s, whole s, GiB | EASE: fit s, whole s, GiB |",
             "|---|---|---|---|---|---|---|---|"]
    order = ("base", "interactions", "users", "items")
    for r in sorted(rows, key=lambda r: (order.index(r["axis"]), r["interactions"], r["users"], r["items"])):
        ease = (f"{r['ease_fit']:.1f}, {r['ease_wall']:.1f}, {r['ease_peak']:.2f}" if "ease_fit" in r
                else f"not run (over {CURVE_EASE_MOST:,} items)")
        lines.append(f"| {r['axis']} | {r['users']:,} | {r['items']:,} | {r['interactions']:,} | "
                     f"{r['rating_epoch']:.1f}, {r['rating_wall']:.1f}, {r['rating_peak']:.2f} | "
                     f"{r['ranking_epoch']:.1f}, {r['ranking_eval']:.1f}, {r['ranking_wall']:.1f}, "
                     f"{r['ranking_peak']:.2f} | {r['als_fit']:.1f}, {r['als_wall']:.1f}, {r['als_peak']:.2f} | {ease} |")
    picture = Path(args.output).parent / "cost_curve.svg"
    from pictures import cost_curve as draw
    draw(picture, rows)
    lines += ["", f"Each a single whole process (imports, loading from the parse cache, the run, its files); "
              f"the picture is {picture.name}. Synthetic sets of studies.write_interactions, seed 0.", "",
              machine_lines("python benchmark.py --cost_curve")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- file dialects

# Awkward files (issue 45), each with what a reader must find: the separator, whether the first
# line is a header, and the rows it then holds. Written to a temporary folder by sniffers().
AWKWARD = {
    "spaces around ids": ("r.csv", "user,item,rating\n" + "".join(f"{u}, {10 + u % 7}, {u % 5 + 1}\n" for u in range(60)),
                          ",", True),
    "headerless user,item,date": ("r.csv", "".join(f"u{k},i{k % 7},2020-01-{k % 28 + 1:02d}\n" for k in range(60)),
                                  ",", False),
    "';' with decimal commas": ("r.csv", "user;item;rating\n" + "".join(f"{u};{u % 9};{u % 4},5\n" for u in range(60)),
                                ";", True),
    "spaces, CRLF, trailing blank": ("r.txt", "".join(f"{u} {u % 9} {u % 5 + 1} \r\n" for u in range(60)), " ", False),
    "numeric header ,0,1,2": ("r.csv", ",0,1,2\n" + "".join(f"{k},{k % 13},{k % 9},{k % 5 + 1}\n" for k in range(60)),
                              ",", True),
    "Latin-1 ids": ("r.csv", "user,item\n" + "".join(f"u{k},caf\xe9{k % 3}\n" for k in range(60)), ",", True),
    "MovieLens '::'": ("r.dat", "".join(f"{u}::{u % 9}::{u % 5 + 1}::97830{u:04d}\n" for u in range(60)), "::", False),
    "one line per user": ("r.txt", "".join(f"{u} " + " ".join(str(i) for i in range(u % 5 + 2)) + "\n"
                                           for u in range(60)), " ", False),
}


def sniffers(args):
    """Whether CleverCSV's and DuckDB's dialect detection read the awkward files as ours does
    (separator and header), each file written in a temporary folder: the measure of whether a
    library can replace formats.sniff (issue 45)."""
    import tempfile

    import formats

    def ours(path):
        layout = formats.sniff(path)
        return ("lines" if layout.kind == "per_user" else " " if layout.sep is None else layout.sep,
                layout.header is not None)

    def clevercsv_sniff(path):
        import clevercsv
        sample = path.read_bytes()[:formats.SAMPLE_BYTES].decode("latin-1")
        dialect = clevercsv.Sniffer().sniff(sample)
        return dialect.delimiter, clevercsv.Sniffer().has_header(sample)

    def duckdb_sniff(path):
        import duckdb
        found = duckdb.connect().execute(f"SELECT Delimiter, HasHeader FROM sniff_csv('{path}')").fetchone()
        return found[0], bool(found[1])

    readers = {"this project (formats.sniff)": ours, "CleverCSV": clevercsv_sniff, "DuckDB sniff_csv": duckdb_sniff}
    lines = ["## Reading awkward files: our dialect guess against CleverCSV's and DuckDB's", "",
             "| file | truth (separator, header) | " + " | ".join(readers) + " |", "|---|---|" + "---|" * len(readers)]
    right = dict.fromkeys(readers, 0)
    with tempfile.TemporaryDirectory() as scratch:
        for name, (file_name, text, sep, header) in AWKWARD.items():
            path = Path(scratch) / name.replace(" ", "_").replace("'", "").replace(",", "") / file_name
            path.parent.mkdir()
            path.write_bytes(text.encode("latin-1"))
            truth = ("lines" if name == "one line per user" else sep, header)
            cells = []
            for reader, sniff in readers.items():
                try:
                    got = sniff(path)
                except Exception as error:  # a library's refusal is a result here
                    cells.append(f"refused ({type(error).__name__})")
                    continue
                right[reader] += got == truth
                cells.append(("right" if got == truth else "**wrong**") + f": {got[0]!r}, {got[1]}")
            lines.append(f"| {name} | {truth[0]!r}, {truth[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Right: " + ", ".join(f"{reader} {n} of {len(AWKWARD)}" for reader, n in right.items())
              + ". Neither library knows one line per user (a list, not a table), `::` or runs of spaces as "
              "MovieLens and LightGCN write them; see docs/data.md for the load time of each at 25M rows.", "",
              machine_lines(args.command)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- fold-in

FOLD_IN_HELD = 0.1          # share of users held out entirely (seeded)
FOLD_IN_HISTORY = 0.8       # share of a held-out user's items given as their history; the rest is their test
EASE_L2 = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)  # EASE's L2, chosen on the run's validation part


def fold_in_study(args):
    """New users without retraining, measured: FOLD_IN_HELD of the users held out entirely
    (numpy seed s for each s of --fold_in_seeds), the rest split 80/10/10 within each user (seed
    2020) as the ranking task splits them. Run A trains on the rest; run B also on 80% of each
    held-out user's items (the same split otherwise, as pre-split folders, so both choose on the
    same validation part). Each held-out user is folded into A from 1, 3 or all of their 80%
    (recommend.py's fold-in) and ranked (their given items masked) against their other 20%:
    NDCG@10 beside B's trained rows, EASE given the same history (its L2 chosen on A's validation
    part) and popularity; with several seeds, each figure the mean of the seeds' (ML-1M's 603
    users of a draw moved every column by up to 7% from one draw to the next).
    The rating task (ratings, not positives; MovieLens names; the first seed): fold-in MSE on the
    held-out 20% beside B's. Validation never sees a held-out user."""
    from bench import peers

    name = args.dataset if loader.is_movielens(args.dataset) else f"`{Path(args.dataset).name}`"
    try:
        seeds = [int(seed) for seed in str(args.fold_in_seeds).split(",")]
    except ValueError:
        sys.exit(f"error: --fold_in_seeds={args.fold_in_seeds}: give whole numbers separated by commas, e.g. 0,1,2")
    cfg = peers.task_config(args.dataset, "ranking", args.columns)
    ratings = loader.load(args.dataset, args.data_dir, allow_download=False, columns=args.columns)
    rows, _ = loader.implicit_feedback(ratings, cfg["ranking_min_rating"], cfg["ranking_core"])
    by_seed = [_fold_in_ranking(args, ratings, rows, cfg, seed) for seed in seeds]
    mean = lambda key, size: np.mean([found["sizes"][size][key] for found in by_seed])

    def cell(key, size):
        """The seeds' mean, and with several their range."""
        values = [found["sizes"][size][key] for found in by_seed]
        return f"{np.mean(values):.4f}" + (f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else "")

    l2s = ", ".join(f"{found['l2']:g}" for found in by_seed)
    table = [f"| history given | fold-in | trained in | EASE (L2 {l2s}) | popularity | users | seconds to fold in and answer |",
             "|---|---|---|---|---|---|---|"]
    for size in (1, 3, None):
        label = "all (80%)" if size is None else f"{size}"
        trained = cell("trained", size) if size is None else "-"
        users = " / ".join(f"{found['sizes'][size]['users']:,}" for found in by_seed)
        seconds = " / ".join(f"{found['sizes'][size]['seconds']:.1f}" for found in by_seed)
        table.append(f"| {label} | **{cell('fold', size)}** | {trained} | {cell('ease', size)} | {cell('pop', size)} | "
                     f"{users} | {seconds} |")
    first = by_seed[0]
    gap = mean("fold", None) / mean("trained", None) - 1
    seeded = f"numpy seed{'s' if len(seeds) > 1 else ''} {args.fold_in_seeds}"
    lines = [f"## New users without retraining (fold-in) on {name}", "",
             f"{first['held']:,} of {first['users']:,} users held out ({seeded}); each folded in from 1, 3 or "
             f"all of {FOLD_IN_HISTORY:.0%} of their items ({first['steps']} steps of Adam) and ranked against "
             "the rest; test NDCG@10 over every item but the given ones"
             + (", the mean of the seeds (their range in brackets)" if len(seeds) > 1 else "")
             + ". Run A trains without them, run B with their 80% (the same split of the other users, as pre-split "
             "folders); EASE fits A's training part, its L2 chosen on A's validation (validation NDCG@10 "
             + ", ".join(f"{found['ease_val']:.4f}" for found in by_seed) + ").", "", *table, "",
             f"From whole histories the fold-in is {gap:+.1%} against trained-in and "
             f"{mean('fold', None) / mean('ease', None) - 1:+.1%} against EASE.", ""]
    if ratings.has_ratings:
        lines += _fold_in_ratings(ratings, args.fold_in_steps, seeds[0])
    return "\n".join(lines + [machine_lines(args.command)]) + "\n"


def _fold_in_ranking(args, ratings, rows, cfg, seed):
    """fold_in_study's ranking figures for the users held out by numpy seed `seed` -> {"sizes":
    {1, 3, None (all): {fold, trained, ease, pop, users, seconds}}, held, users, steps, l2, ease_val}."""
    import pandas as pd
    import torch
    from scipy.sparse import csr_matrix

    from bench import peers

    held, user_list, held_rows, given, a_parts, b_parts = _hold_out(ratings, rows, cfg["split_seed"], seed)
    raw_user, raw_item = ratings.user_ids[ratings.users], ratings.item_ids[ratings.items]
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-fold-in-") as scratch:
        columns = {"user": raw_user, "item": raw_item}
        run = {name: _train_on_parts(Path(scratch), name, parts, columns, ["--task=ranking"])
               for name, parts in (("a", a_parts), ("b", b_parts))}
    trained_a, trained_b = run["a"], run["b"]
    trained_a.fold_in_steps = args.fold_in_steps or trained_a.fold_in_steps
    ids = trained_a.item_ids
    known_items = set(ids)  # run A's items: a test item outside them cannot be ranked
    test = {}
    for u, i in zip(raw_user[held_rows[~given]], raw_item[held_rows[~given]]):
        test.setdefault(u, set()).add(i)
    history = pd.DataFrame({"user_id": raw_user[held_rows[given]], "item_id": raw_item[held_rows[given]]})
    history = history[np.isin(history["item_id"], ids)]
    # EASE on A's training matrix, its L2 chosen on A's validation part.
    train_a = a_parts[0]
    a_items = loader.positions(ids, raw_item[train_a])[0]
    a_users_ids, a_users = np.unique(raw_user[train_a], return_inverse=True)
    X = csr_matrix((np.ones(len(train_a), dtype=np.float32), (a_users, a_items)), shape=(len(a_users_ids), len(ids)))
    X.data[:] = 1.0
    valid_a = a_parts[1]
    v_users = np.searchsorted(a_users_ids, raw_user[valid_a])
    v_items = loader.positions(ids, raw_item[valid_a])[0]
    valid = {}
    for u, i in zip(v_users, v_items):
        valid.setdefault(u, set()).add(i)
    best_l2, best_val = None, -1.0
    for l2 in EASE_L2:
        weights = peers.ease(X, l2)
        chosen = np.array(sorted(valid))
        scores = torch.from_numpy(np.asarray(X[chosen] @ weights))
        value = _ndcg(scores, X[chosen], [valid[u] for u in chosen])
        if value > best_val:
            best_l2, best_val, best_weights = l2, value, weights
    popular = torch.from_numpy(np.asarray(X.sum(0)).ravel())
    sizes = {}
    for size in (1, 3, None):
        chosen = history if size is None else history.groupby("user_id", sort=False).head(size)
        started = time.perf_counter()
        folded = trained_a.recommend_histories(chosen, n=len(ids), block=256)
        seconds = time.perf_counter() - started
        users_here = chosen["user_id"].drop_duplicates().to_numpy()
        scores = np.full((len(users_here), len(ids)), -np.inf, dtype=np.float32)
        # Each answer's and each given item's row among users_here (on Beauty, 27M answer rows:
        # a lookup in one pass, not a Python loop over them).
        where = pd.Index(users_here)
        rows_f = where.get_indexer(folded["user_id"])
        given_rows = where.get_indexer(chosen["user_id"])
        scores[rows_f, loader.positions(ids, folded["item_id"].to_numpy())[0]] = -folded["rank"].to_numpy()
        chosen_items = loader.positions(ids, chosen["item_id"].to_numpy())[0]
        given_x = csr_matrix((np.ones(len(chosen), dtype=np.float32),
                              (given_rows, chosen_items)), shape=(len(users_here), len(ids)))
        given_x.data[:] = 1.0
        truth = [{i for i in test.get(u, ()) if i in known_items} for u in users_here]
        truth_rows = [set(loader.positions(ids, np.array(sorted(t), dtype=ids.dtype))[0]) if t else set() for t in truth]
        found = {"fold": _ndcg(torch.from_numpy(scores), given_x, truth_rows),
                 "ease": _ndcg(torch.from_numpy(np.asarray(given_x @ best_weights)), given_x, truth_rows),
                 "pop": _ndcg(popular.expand(len(users_here), -1).clone(), given_x, truth_rows),
                 "users": len(users_here), "seconds": seconds}
        if size is None:
            b_rows = loader.positions(trained_b.user_ids, users_here.astype(trained_b.user_ids.dtype))[0]
            with torch.no_grad():
                b_scores = trained_b.model.score_all(torch.from_numpy(b_rows))
            b_truth = [set(loader.positions(trained_b.item_ids, np.array(sorted(t), dtype=ids.dtype))[0]) if t else set()
                       for t in truth]
            b_given = csr_matrix((np.ones(len(chosen), dtype=np.float32),
                                  (given_rows,
                                   loader.positions(trained_b.item_ids, chosen["item_id"].to_numpy())[0])),
                                 shape=(len(users_here), len(trained_b.item_ids)))
            found["trained"] = _ndcg(b_scores, b_given, b_truth)
        sizes[size] = found
    return {"sizes": sizes, "held": len(held), "users": len(user_list), "steps": trained_a.fold_in_steps,
            "l2": best_l2, "ease_val": best_val}


def _fold_in_ratings(ratings, fold_in_steps, seed=0):
    """The rating task's fold-in, measured as fold_in_study measures the ranking task's, on every
    rating: FOLD_IN_HELD of the users held out (numpy seed `seed`), the others' ratings split 80/10/10
    within each user (seed 2020); run A trains without the held-out users, run B with 80% of each
    one's ratings. Each held-out user is folded into A from 1, 3 or all of those ratings; the MSE
    of their other 20% beside B's trained-in predictions and A's without the user (the global
    mean and item biases: what an unknown user gets). -> the report's lines."""

    import pandas as pd
    import torch


    held, user_list, held_rows, given, a_parts, b_parts = _hold_out(ratings, np.arange(len(ratings)), 2020, seed)
    raw_user, raw_item = ratings.user_ids[ratings.users], ratings.item_ids[ratings.items]
    frame = lambda chosen: pd.DataFrame({"user_id": raw_user[chosen], "item_id": raw_item[chosen],
                                         "rating": ratings.ratings[chosen]})
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-fold-in-rating-") as scratch:
        columns = {"user": raw_user, "item": raw_item, "rating": ratings.ratings}
        runs = {name: _train_on_parts(Path(scratch), name, parts, columns)
                for name, parts in (("a", a_parts), ("b", b_parts))}
    run_a, run_b = runs["a"], runs["b"]
    run_a.fold_in_steps = fold_in_steps or run_a.fold_in_steps
    test = frame(held_rows[~given])
    test = test[np.isin(test["item_id"], run_a.item_ids) & np.isin(test["item_id"], run_b.item_ids)]
    history = frame(held_rows[given])
    truth = torch.tensor(test["rating"].to_numpy(np.float32))

    def mse(run, user_rows, user_of_test, rows=None, bias=None):
        items = torch.from_numpy(loader.positions(run.item_ids, loader.as_ids(test["item_id"].to_numpy(), run.item_ids))[0])
        with torch.no_grad():
            if rows is None:
                predictions = run.model(torch.from_numpy(user_rows[user_of_test]), items)
            else:
                predictions = run.model.score_rows(rows, bias)[torch.from_numpy(user_of_test), items]
        low, high = run.rating_range
        return float((predictions.clamp(low, high) - truth).pow(2).mean())

    b_rows = loader.positions(run_b.user_ids, loader.as_ids(test["user_id"].to_numpy(), run_b.user_ids))[0]
    trained = mse(run_b, b_rows, np.arange(len(test)))
    with torch.no_grad():  # A without the user: the global mean and the item's bias
        items = torch.from_numpy(loader.positions(run_a.item_ids, loader.as_ids(test["item_id"].to_numpy(), run_a.item_ids))[0])
        unknown = run_a.model.global_bias + run_a.model.item_bias[items]
        unknown = float((unknown.clamp(*run_a.rating_range) - truth).pow(2).mean())
    table = ["| history given | fold-in MSE | trained in | without the user (global mean + item bias) | fold-in time |",
             "|---|---|---|---|---|"]
    for size in (1, 3, None):
        chosen = history if size is None else history.groupby("user_id", sort=False).head(size)
        chosen = chosen[np.isin(chosen["item_id"], run_a.item_ids)]
        started = time.perf_counter()
        users, position, items, values, weights, _ = run_a.read_histories(chosen, None)
        rows, bias = run_a.fold_in(position, items, values, weights, len(users))
        seconds = time.perf_counter() - started
        where = {user: k for k, user in enumerate(users)}  # a history's user -> its folded row
        user_of_test = np.array([where[user] for user in test["user_id"]])
        label, beside = ("all (80%)", f"{trained:.4f}") if size is None else (f"{size}", "-")
        table.append(f"| {label} | **{mse(run_a, None, user_of_test, rows, bias):.4f}** | {beside} | {unknown:.4f} | "
                     f"{seconds:.1f} s |")
    return [f"### The rating task: {len(held):,} of {len(user_list):,} users held out (numpy seed {seed})", "",
            f"Every rating (not only the positives): each held-out user folded into run A from 1, 3 or all of "
            f"{FOLD_IN_HISTORY:.0%} of their ratings, the MSE of their other ratings ({len(test):,}); run B trained "
            "them in (the other users' ratings split 80/10/10 within each user, seed 2020, as pre-split folders; "
            "predictions clipped to the training range, as train.py evaluates).", "", *table, ""]


def _hold_out(ratings, rows, split_seed, seed=0):
    """The fold-in studies' split of rows (indices into ratings): FOLD_IN_HELD of their users held
    out entirely (numpy seed `seed`), the others' rows split 80/10/10 within each user (split_seed);
    each held-out user's rows in random order, the first FOLD_IN_HISTORY of them (at least one)
    given as their history. -> (held users, every user, held rows by user, given (bool, as held
    rows), run A's parts [train, valid, test], run B's: A's with the given rows in training and
    the held users' other rows in test)."""
    rng = np.random.default_rng(seed)
    users = ratings.users[rows]
    user_list = np.unique(users)
    held = np.sort(rng.choice(user_list, int(len(user_list) * FOLD_IN_HELD), replace=False))
    is_held = np.isin(users, held)
    kept = rows[~is_held]
    # split_per_user keeps the rows' order: its parts line up with kept
    rest_part = loader.split_per_user(ratings, kept, fractions=(0.8, 0.1, 0.1), seed=split_seed).part
    held_rows = rows[is_held]
    held_rows = held_rows[np.lexsort((rng.random(len(held_rows)), ratings.users[held_rows]))]
    counts = np.bincount(ratings.users[held_rows], minlength=ratings.n_users)[held]
    within = np.arange(len(held_rows)) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    given = within < np.repeat(np.floor(counts * FOLD_IN_HISTORY).astype(int).clip(min=1), counts)
    a_parts = [kept[rest_part == p] for p in range(3)]
    b_parts = [np.concatenate([a_parts[0], held_rows[given]]), a_parts[1], np.concatenate([a_parts[2], held_rows[~given]])]
    return held, user_list, held_rows, given, a_parts, b_parts


def _train_on_parts(scratch, name, parts, columns, settings=()):
    """A train.py run (its defaults, plus settings) on parts (train, valid, test row indices) as
    a pre-split folder scratch/name of the given columns ({name: array over every row}) ->
    the finished run, loaded (recommend.Recommender)."""
    import subprocess

    import pandas as pd

    import recommend

    folder = scratch / name
    folder.mkdir()
    for part, chosen in zip(("train", "valid", "test"), parts):
        pd.DataFrame({column: values[chosen] for column, values in columns.items()}).to_csv(
            folder / f"{part}.csv", index=False)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *settings, f"--dataset={folder}", "--progress=False",
                           f"--runs_dir={scratch / 'runs'}", f"--results_dir={scratch / 'results'}",
                           f"--run_name={name}"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: the fold-in study's run {name} failed: {done.stderr.strip()[-500:]}")
    return recommend.Recommender.load(scratch / "runs" / name, quiet=True)


def _ndcg(scores, given, truth, k=10):
    """Mean NDCG@k (tasks.rank_metrics, the evaluators' own) of scores (U, n_items) with each
    user's given items (a CSR (U, n_items)) masked, against truth (a list of sets of item
    columns); users without truth are left out."""
    import torch

    import tasks

    scores = scores.clone().float()
    coo = given.tocoo()
    scores[torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))] = -torch.inf
    relevant = torch.zeros(scores.shape, dtype=torch.bool)
    for row, wanted in enumerate(truth):
        relevant[row, list(wanted)] = True
    return float(tasks.rank_metrics(scores, relevant, k)[:, 0].mean())


# ----------------------------------------------------------------------------- event weights

EVENTS = {1: "view", 2: "view", 3: "view", 4: "cart", 5: "purchase"}  # ML-1M's stars as a shop's events


def weights_study(args):
    """Event types, measured on ML-1M's ratings read as a shop's events (EVENTS: 1-3 stars a view,
    4 a cart, 5 a purchase): every user's events split 80/10/10 at random (seed 2020) as a
    pre-split folder whose validation and test files keep the purchases only; three ranking runs
    on it, unweighted (every event one interaction), weighted (view 0.25, cart 0.5, purchase 1)
    and purchases-only (purchase=1: views and carts dropped), each chosen on validation
    purchases and scored on the held-out purchases."""
    import json
    import subprocess

    import pandas as pd

    ratings = loader.load("ml-1m", args.data_dir, allow_download=False)
    events = pd.DataFrame({"user": ratings.user_ids[ratings.users], "item": ratings.item_ids[ratings.items],
                           "event": pd.Series(np.rint(ratings.ratings).astype(int)).map(EVENTS)})
    part = loader.split_per_user(ratings, np.arange(len(ratings)), (0.8, 0.1, 0.1), seed=2020).part
    runs = {"unweighted": [], "weighted (view 0.25, cart 0.5, purchase 1)":
            ["--event_weights=event:view=0.25,cart=0.5,purchase=1"], "purchases only": ["--event_weights=event:purchase=1"]}
    lines = ["## Event types: ML-1M's ratings as a shop's views, carts and purchases", "",
             "| model | test NDCG@10 on held-out purchases | Recall@10 | held-out purchases scored | training interactions |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="mfmixtaste-events-") as scratch:
        folder = Path(scratch) / "events"
        folder.mkdir()
        for p, name in enumerate(("train", "valid", "test")):
            chosen = events[part == p]
            (chosen if p == 0 else chosen[chosen["event"] == "purchase"]).to_csv(folder / f"{name}.csv", index=False)
        for label, extra in runs.items():
            command = [sys.executable, str(ROOT / "train.py"), "--task=ranking", f"--dataset={folder}", "--progress=False",
                       f"--runs_dir={scratch}/runs", f"--results_dir={scratch}/results", "--run_name=r", *extra]
            shutil.rmtree(Path(scratch) / "runs", ignore_errors=True)
            shutil.rmtree(Path(scratch) / "results", ignore_errors=True)
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"error: the event study's run '{label}' failed: {done.stderr.strip()[-400:]}")
            summary = json.loads((Path(scratch) / "results" / "r" / "summary.json").read_text())
            tested = next((line for line in done.stdout.splitlines() if line.startswith("pre-split:")), "")
            lines.append(f"| {label} | {summary['test_ndcg@10']:.4f} | {summary['test_recall@10']:.4f} | "
                         f"{tested.split('test ')[-1].split(' rows')[0] if tested else '-'} | {summary['n_train']:,} |")
    lines += ["", f"Events: {', '.join(f'{k} stars {v}' for k, v in EVENTS.items())}; the split's validation and test "
              "files keep the purchases (5 stars) only; test rows whose user or item a run never trained on are "
              "dropped (the purchases-only run loses the users who never bought in training).", "",
              machine_lines(args.command)]
    return "\n".join(lines) + "\n"
