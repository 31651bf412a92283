import argparse
import importlib.util
import itertools
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmark
import loader
from bench import peers, studies
from conftest import ROOT


def run_benchmark(tmp_path, data_dir, only, *options):
    output = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--dataset=ml-100k",
                           f"--data_dir={data_dir}", f"--only={only}", f"--output={output}", *options],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return done, output


def table_mse(report, label):
    row = next(line for line in report.splitlines() if line.startswith(f"| {label} "))
    return float(row.split("|")[2])


def test_baseline_rows_are_measured_and_ordered(tmp_path, synthetic_ml100k):
    done, output = run_benchmark(tmp_path, synthetic_ml100k, "global_mean,bias_only")
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    assert "<!-- peers-ml-100k:begin -->" in report and "Machine:" in report
    assert "--only=global_mean,bias_only" in report
    assert table_mse(report, "biases only (user + item)") < table_mse(report, "global mean")
    assert "replaced script" not in report  # its published figures are ML-1M's: beside no other set
    # Wall time and peak memory were measured, not left blank.
    row = next(line for line in report.splitlines() if line.startswith("| global mean "))
    assert re.search(r"\| \d+\.\d \| - \| \d+ \|", row), row  # whole process; no fit of its own


def test_surprise_rows_run_or_say_how_to_install(tmp_path, synthetic_ml100k):
    done, output = run_benchmark(tmp_path, synthetic_ml100k, "svd")
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    if importlib.util.find_spec("surprise") is None:
        assert "pip install scikit-surprise" in report
    else:
        assert table_mse(report, "Surprise SVD (searched on validation)") < 1.5
        row = next(line for line in report.splitlines() if line.startswith("| Surprise SVD"))
        assert "chosen on val n_factors=" in row and "seeds 0-2: test mse" in row
        assert re.search(r"\| \d+\.\d \| \d+\.\d \| \d+ \|", row), row  # whole process, one fit, memory


def test_unknown_row_is_refused(tmp_path, synthetic_ml100k):
    done, _ = run_benchmark(tmp_path, synthetic_ml100k, "svd,magic")
    assert done.returncode != 0 and "unknown row(s) magic" in done.stderr


def test_a_row_named_by_its_label_is_refused_with_the_rows_name_and_help_lists_every_task(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--task=ranking", "--only=popularity",
                           f"--dataset={tmp_path / 'none.csv'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "popularity is the row pop" in done.stderr
    shown = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--help"], capture_output=True, text=True,
                           timeout=300).stdout
    assert all(row in " ".join(shown.split()) for row in ("pop,", "ease,", "admmslim,", "svdpp"))


def test_the_reports_command_line_carries_every_option_given(tmp_path, synthetic_ml100k):
    items = tmp_path / "names.csv"
    items.write_text("item_id,title\n5,Five\n")
    done, output = run_benchmark(tmp_path, synthetic_ml100k, "bias_only", f"--items={items}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"--items={items}" in output.read_text() and "--only=bias_only" in output.read_text()


def test_sections_are_replaced_in_place(tmp_path):
    path = tmp_path / "report.md"
    benchmark.write_section(path, "peers", "first\n")
    benchmark.write_section(path, "scaling", "scale\n")
    benchmark.write_section(path, "peers", "second\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "scale" in text
    assert text.index("second") < text.index("scale")


def test_fit_biases_recovers_known_biases():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 5000), rng.integers(0, 20, 5000)
    true_user, true_item = rng.normal(0, 0.5, 30), rng.normal(0, 0.5, 20)
    ratings = 3.0 + true_user[users] + true_item[items]
    mu, user_bias, item_bias = peers.fit_biases(users, items, ratings, 30, 20, reg=0.01,
                                                    sweeps=50)
    predictions = mu + user_bias[users] + item_bias[items]
    assert np.abs(predictions - ratings).max() < 1e-2


def test_relative_paths_work_from_another_folder(tmp_path, synthetic_ml100k):
    """The rows run from the project folder: a data_dir relative to the caller must still be found."""
    assert synthetic_ml100k == tmp_path / "data"
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--dataset=ml-100k",
                           "--data_dir=data", "--only=global_mean", "--output=bench.md"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "bench.md").read_text()
    assert table_mse(report, "global mean") > 0 and "--data_dir=data" in report


def test_a_failed_row_reports_its_own_error_not_the_memory_line():
    *_, stderr, code = peers.measure([sys.executable, "-c", "import sys; sys.exit('error: boom')"])
    assert code == 1 and "PEAK_KB" not in stderr
    assert peers.failed_row("svd", stderr) == {"row": "svd", "error": "error: boom"}


def test_ranking_rows_are_measured_and_the_ml_1m_table_stays_with_ml_1m(tmp_path, synthetic_ml100k):
    output = tmp_path / "bench.md"
    benchmark.write_section(output, "ranking", "ML-1M's ranking table\n")  # another set's table: not overwritten
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--task=ranking",
                           "--dataset=ml-100k", f"--data_dir={synthetic_ml100k}", "--only=pop,ease,als",
                           f"--output={output}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    assert "<!-- ranking-ml-100k:begin -->" in report and "Machine:" in report
    assert "<!-- ranking:begin -->\nML-1M's ranking table\n<!-- ranking:end -->" in report
    for label in ("popularity", "EASE (closed form)"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {label} "))
        ndcg, recall = (float(x) for x in row.split("|")[2:4])
        assert 0 < ndcg <= 1 and 0 < recall <= 1
    assert "chosen on val l2=" in report
    # RecBole's published rows are of ML-1M: they are not set beside another dataset's figures.
    assert "published by RecBole" not in report and "RecBole's ml-1m" not in report
    if importlib.util.find_spec("implicit") is None:
        assert "pip install implicit" in report
    else:
        assert re.search(r"\| implicit ALS \| 0\.\d{4} \|", report)


def test_subsets_keep_whole_users_or_a_share_of_each_users_ratings():
    import loader
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(50), rng.integers(1, 40, 50))
    ratings = loader.encode(users, rng.integers(0, 30, len(users)), np.ones(len(users)))
    per_user = np.bincount(ratings.users)
    rows = studies.subsample(ratings, "users", 0.1)
    kept = np.unique(ratings.users[rows])
    assert len(kept) == 5 and len(rows) == per_user[kept].sum()  # every rating of 5 users
    rows = studies.subsample(ratings, "ratings", 0.1)
    assert np.all(np.diff(rows) > 0)  # file order, no repeats
    expected = np.maximum(1, np.round(per_user * 0.1))
    assert np.array_equal(np.bincount(ratings.users[rows], minlength=50), expected)
    assert np.array_equal(rows, studies.subsample(ratings, "ratings", 0.1))  # seeded
    assert not np.array_equal(rows, studies.subsample(ratings, "ratings", 0.1, seed=1))


def test_a_share_of_ml_1m_users_is_cut_whole_into_its_own_section(tmp_path):
    from conftest import mixture_ratings, write_ratings
    users, items, ratings = mixture_ratings()
    write_ratings(tmp_path / "data" / "ml-1m" / "ratings.dat", users, items, ratings)
    (tmp_path / "data" / "ml-1m" / "movies.dat").write_text("5::Five (1995)::Drama\n")
    args = argparse.Namespace(dataset="ml-1m", data_dir=str(tmp_path / "data"), user_fraction=0.25)
    scratch = tmp_path / "cut"
    assert benchmark.cut_users(args, scratch) == "-users-0.25"
    assert args.data_dir == str(scratch) and (scratch / "ml-1m" / "movies.dat").is_file()
    cut = loader.load("ml-1m", scratch, allow_download=False)
    kept = np.unique(cut.user_ids)
    assert len(kept) == round(0.25 * len(np.unique(users)))  # a quarter of the users, every rating of each
    assert len(cut) == np.isin(users, kept).sum()
    assert benchmark.data_name(args) == "ml-1m, 25% of its users (seed 0)"  # RecBole's whole-ML-1M rows stay out
    whole = argparse.Namespace(dataset="ml-1m", data_dir=str(tmp_path / "data"), user_fraction=1.0)
    assert benchmark.cut_users(whole, scratch) == "" and benchmark.data_name(whole) == "ml-1m"
    for fraction, dataset in ((1.5, "ml-1m"), (0.0, "ml-1m"), (0.5, "ml-100k")):
        with pytest.raises(SystemExit, match="--user_fraction"):
            benchmark.cut_users(argparse.Namespace(dataset=dataset, data_dir="", user_fraction=fraction), scratch)


def test_the_sizes_report_runs_every_row_on_every_set(tmp_path):
    from conftest import mixture_ratings, write_ratings
    write_ratings(tmp_path / "data" / "ml-1m" / "ratings.dat",
                  *mixture_ratings(n_users=300, n_items=80, n_ratings=20000))
    output = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--sizes", "--data_dir=data",
                           "--only=bias_only,mfmixtaste_pair", "--output=bench.md"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    assert "<!-- sizes:begin -->" in report and "--sizes --data_dir=data" in report
    sizes = [line for line in report.splitlines() if line.startswith("| 10% of the users |")]
    assert sizes[0].split("|")[3].strip() == "30"  # 10% of 300 users, in the sizes table
    for data in ("10% of the users", "10% of each user's ratings", "ML-1M, all"):
        for model in ("biases only (user + item)", "this project, old defaults"):
            row = next(line for line in report.splitlines()
                       if line.startswith(f"| {data} | {model}"))
            assert 0 < float(row.split("|")[3]) < 5, row


def test_pooled_accounts_keep_every_movie_once_and_record_its_person():
    import loader
    # Users 1-6 in file order; users 1 and 2 both rated movie 10 (user 1 first).
    users = np.array([1, 2, 1, 3, 4, 2, 5, 6, 6, 3])
    items = np.array([10, 10, 11, 12, 12, 13, 10, 10, 11, 14])
    ratings = loader.encode(users, items, np.arange(1.0, 11.0) % 5 + 1)
    rows, account = studies.pool_accounts(ratings, 2, seed=0)
    assert np.all(np.diff(rows) > 0)  # file order
    assert len(np.unique(account)) == 3
    persons = ratings.user_ids[ratings.users[rows]]
    # Each account is two persons; each (account, movie) once; every rating of a person is kept
    # unless an earlier rating of the same movie by the account's other person was.
    members = {a: set(persons[account == a]) for a in np.unique(account)}
    assert all(len(m) <= 2 for m in members.values())
    pairs = list(zip(account.tolist(), ratings.items[rows].tolist()))
    assert len(pairs) == len(set(pairs))
    account_of = {p: a for a, m in members.items() for p in m}
    for row in range(len(users)):
        a = account_of.get(users[row])
        kept = row in rows
        earlier = any(account_of.get(users[r]) == a and items[r] == items[row] for r in range(row))
        assert kept != earlier or a is None, row
    assert studies.pool_accounts(ratings, 2, seed=0)[0].tolist() == rows.tolist()  # seeded


def test_purity_on_a_hand_made_account():
    # Account 0: persons 7,7,7,8,8 with tastes 0,0,1,1,1 -> taste 0 {7: 2}, taste 1 {7: 1, 8: 2}:
    # (2 + 2) / 5; the largest person holds 3 of 5. Account 1: two persons, one taste: 1 / 2.
    account = np.array([0, 0, 0, 0, 0, 1, 1])
    taste = np.array([0, 0, 1, 1, 1, 0, 0])
    person = np.array([7, 7, 7, 8, 8, 2, 3])
    got, base = studies.purity(account, taste, person)
    assert got.tolist() == [0.8, 0.5] and base.tolist() == [0.6, 0.5]
    # Tastes that match the persons exactly score 1.
    assert studies.purity(account, np.array([0, 0, 0, 1, 1, 0, 1]), person)[0].tolist() == [1.0, 1.0]


def test_told_apart_gives_each_account_interaction_back_to_its_person():
    import loader
    rng = np.random.default_rng(0)
    # 8 persons, 12 movies each (drawn from 30), pooled in pairs; the accounts' ranking split.
    users = np.repeat(np.arange(1, 9), 12)
    items = np.concatenate([rng.choice(30, 12, replace=False) + 1 for _ in range(8)])
    full = loader.encode(users, items, np.full(len(users), 4.0))
    rows, account = studies.pool_accounts(full, 2, seed=0)
    pooled = loader.encode(account + 101, full.item_ids[full.items[rows]], full.ratings[rows])
    persons = loader.encode(full.user_ids[full.users[rows]], full.item_ids[full.items[rows]], full.ratings[rows])
    accounts = loader.split_per_user(pooled, loader.implicit_feedback(pooled, 3.0, core=1)[0], seed=1)
    told = studies.told_apart(accounts, pooled, persons)
    assert np.array_equal(told.items, accounts.items) and np.array_equal(told.part, accounts.part)
    # Each interaction's person is the one whose rating the account kept for that movie.
    kept = dict(zip(zip((account + 101).tolist(), full.item_ids[full.items[rows]].tolist()),
                    full.user_ids[full.users[rows]].tolist()))
    expected = [kept[(a, i)] for a, i in zip(accounts.user_ids[accounts.users].tolist(),
                                             accounts.item_ids[accounts.items].tolist())]
    assert told.user_ids[told.users].tolist() == expected
    assert sorted(told.user_ids.tolist()) == list(range(1, 9))


def test_cooccurrence_split_finds_persons_who_watch_apart():
    rng = np.random.default_rng(0)
    # Two kinds of viewers: of movies 0-9 and of movies 10-19, 6 movies each. Accounts 0-19 pool
    # one person of each kind; accounts 20-59 two persons of one kind, so that the kinds' movies
    # are watched together elsewhere. The split by co-occurrence finds the mixed accounts' persons.
    account, items, person = [], [], []
    for a in range(60):
        for n, kind in enumerate((0, 1) if a < 20 else (a % 2, a % 2)):
            account += [a] * 6
            items += (rng.choice(10, 6, replace=False) + 10 * kind).tolist()
            person += [2 * a + n] * 6
    account, items, person = np.array(account), np.array(items), np.array(person)
    assert studies.cooccurrence_split(account, items, person, chosen=range(20)) == 1.0
    scrambled = 2 * account + rng.integers(0, 2, len(account))  # persons no co-occurrence can tell apart
    assert studies.cooccurrence_split(account, items, scrambled, chosen=range(20)) < 0.8


def test_time_split_cuts_each_account_at_its_largest_gaps():
    # Account 0: person 7 rates at times 1-3, person 8 at 100-101 (given in a shuffled order);
    # account 1: three persons at 0-1, 50-51, 200; account 2: one rating, left whole.
    account = np.array([0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 2])
    times = np.array([3, 100, 51, 1, 0, 101, 200, 2, 50, 1, 7])
    person = np.array([7, 8, 2, 7, 1, 8, 3, 7, 2, 1, 9])
    pairs = studies.time_split(account, times, 2)
    assert len(set(pairs[person == 7])) == 1 and len(set(pairs[person == 8])) == 1
    assert pairs[person == 7][0] != pairs[person == 8][0] and pairs[account == 2].tolist() == [0]
    assert studies.purity(account[account == 0], pairs[account == 0], person[account == 0])[0][0] == 1.0
    triples = studies.time_split(account, times, 3)
    assert studies.purity(account, triples, person)[0].tolist() == [1.0, 1.0, 1.0]
    # Interleaved in time, persons are not found: no better than the larger person's share.
    account, times, person = np.zeros(6, dtype=int), np.arange(6), np.array([7, 8, 7, 8, 7, 8])
    got, base = studies.purity(account, studies.time_split(account, times, 2), person)
    assert got[0] <= 4 / 6 and base[0] == 0.5


def test_top_overlap_counts_the_movies_two_tastes_share():
    import torch

    from MFMixTaste import MFMixTaste
    model = MFMixTaste(30, 40, dim=4, n_tastes=2)
    with torch.no_grad():
        model.user_factors[:, 0, 1] = model.user_factors[:, 0, 0]   # the same taste twice
    assert studies.top_overlap(model, n_users=20) == 10.0
    with torch.no_grad():
        model.user_factors[:, 0, 1] = -model.user_factors[:, 0, 0]  # opposite tastes: the 10 best against the 10 worst of 40
    assert studies.top_overlap(model, n_users=20) == 0.0
    with torch.no_grad():
        model.user_factors[:, 0, 1] = model.user_factors[:, 0, 0]
        model.user_factors[:5, 0, 1] *= -1                          # 5 users of 30 with opposite tastes
    assert studies.top_overlap(model, n_users=30) == 10.0 * 25 / 30


def test_one_taste_row_chooses_its_prior_on_validation_and_skips_failed_runs(monkeypatch):
    """K=1 at its own taste prior: the prior with the best validation MSE, whatever the test
    figures say; a failed run is left out; K=2's gain is measured against the chosen run."""
    val_test = {10.0: (0.80, 0.70), 15.0: (0.78, 0.75), 20.0: (0.79, 0.60), 25.0: (0.81, 0.61)}
    asked = []

    def fake_train_row(name, args, scratch, overrides):
        prior = float(overrides[-1].split("=")[1])
        asked.append(prior)
        if prior not in val_test:
            return {"row": name, "error": "failed"}
        val, test = val_test[prior]
        return {"row": name, "mse": test, "val": {"mse": val}}

    monkeypatch.setattr(studies, "train_row", fake_train_row)
    line = studies.one_taste_row("pairs", None, None, two=0.74)
    assert asked == list(studies.ONE_TASTE_PRIORS)
    assert "prior_tastes 15 (the best of 4 on validation)" in line and "MSE 0.7500" in line
    assert "K=2 -0.0100 against it" in line
    monkeypatch.setattr(studies, "ONE_TASTE_PRIORS", (30.0,))
    assert "every run failed" in studies.one_taste_row("pairs", None, None, two=0.74)


def test_admm_slim_weights_are_sparse_non_negative_and_follow_co_occurrence():
    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    X = (rng.random((400, 30)) < 0.15).astype(np.float32)
    X[:, 1] = X[:, 0]                      # item 1 is seen exactly with item 0
    X = sp.csr_matrix(X)
    weights = peers.admm_slim(X, l1=1.0, l2=10.0, rho=50.0)
    assert weights.shape == (30, 30) and (weights >= 0).all()
    assert np.all(np.diag(weights) == 0)   # no item explains itself
    # Item 0 predicts item 1 better than any other item does.
    assert weights[0, 1] == weights[:, 1].max() > 0
    sparser = peers.admm_slim(X, l1=20.0, l2=10.0, rho=50.0)
    assert np.count_nonzero(sparser) < np.count_nonzero(weights)


def test_the_speed_bar_is_the_median_of_interleaved_pairs(monkeypatch, tmp_path):
    # Our run and the peer's alternate, so that a drift of the machine's speed reaches both
    # sides of a pair; the figure is the median ratio, not the best one.
    calls, seconds = [], iter([9.0, 3.0, 5.0, 2.0])  # pairs 2 and 3: ours 9 / 3, 5 / 2

    def measure_row(name, *args):
        calls.append(name)
        return {"row": name, "wall": next(seconds)} if name == "mfmixtaste" else \
            {"row": name, "wall": 0.0, "fit_seconds": next(seconds)}

    monkeypatch.setattr(benchmark, "measure_row", measure_row)
    first = [{"row": "mfmixtaste", "wall": 4.0}, {"row": "svd", "wall": 7.0, "fit_seconds": 2.0}]
    args = type("Args", (), {"speed_pairs": 3})()
    ratios = benchmark.speed_pairs(first, "svd", lambda r: r["fit_seconds"], args, tmp_path, pair_peer="svd_single")
    assert calls == ["mfmixtaste", "svd_single", "mfmixtaste", "svd_single"]  # the pairs fit SVD's choice, no search
    assert ratios == [2.0, 3.0, 2.5]
    line = benchmark.speed_line(ratios, "python train.py", 4.0, "SVD's fit", 2.0, 2.5)
    assert "2.00 to 3.00, median **2.50**" in line and "over 3 pairs" in line
    # A missing peer row: no speed bar at all, rather than a ratio of nothing.
    assert benchmark.speed_pairs(first[:1], "svd", lambda r: r["fit_seconds"], args, tmp_path) == []


def test_the_bar_against_ease_with_its_search_is_our_time_over_its_and_needs_both_rows():
    lines = benchmark.versus_ease_search({"mfmixtaste": {"wall": 10.0}, "ease": {"wall": 25.0}})
    assert "(25.0 s): 0.40 times (target: at most 1)" in lines[-1]
    assert benchmark.versus_ease_search({"mfmixtaste": {"wall": 10.0}}) == []
    assert benchmark.versus_ease_search({"ease": {"wall": 25.0}}) == []


def test_the_generator_has_the_marginals_of_real_sets_and_writes_a_file_the_loader_reads(tmp_path):
    users, items, ratings, times = (np.concatenate(parts) for parts in
                                    zip(*studies.synthetic_interactions(3000, 2000, 100_000, seed=2, block=50_000)))
    assert 0.8 * 100_000 < len(users) <= 100_000
    assert len(np.unique(users.astype(np.int64) * 2000 + items)) == len(users)        # each pair once
    activity = np.bincount(users, minlength=3000)
    assert activity.min() >= 1 and activity.mean() > 1.4 * np.median(activity)       # heavy-tailed users
    popularity = np.sort(np.bincount(items, minlength=2000))[::-1]
    assert popularity[:20].sum() > 0.04 * len(items) and popularity[:20].sum() > 2 * popularity[-200:].sum()  # long tail
    assert set(np.unique(ratings * 2)) <= set(range(1, 11)) and (8e8 <= times).all()
    path = tmp_path / "big" / "ratings.csv"
    written = studies.write_interactions(path, 300, 100, 5_000, seed=1)
    found = loader.load(str(path))
    assert len(found) == written and found.has_ratings and found.timestamps is not None


ALS_LIKE = {"factors": (16, 32, 64, 128, 256, 512), "reg": (0.001, 0.01, 0.1, 1.0, 10.0, 100.0),
            "alpha": (0.3, 1.0, 5.0, 20.0, 50.0)}


def ridge(setting, peak=(4, 4, 2)):
    """Interacting knobs, as ALS's factors and L2: the best L2 grows with the factors (a diagonal
    ridge), so no single axis improves from most points on the ridge."""
    f, r, a = (ALS_LIKE[name].index(setting[name]) for name in ALS_LIKE)
    return -(abs(r - f - (peak[1] - peak[0])) + 0.15 * abs(f - peak[0]) + 0.5 * abs(a - peak[2])), setting["factors"]


def test_the_peers_search_finds_the_whole_grids_best_where_knobs_interact():
    every = {values: ridge(dict(zip(ALS_LIKE, values)))[0] for values in itertools.product(*ALS_LIKE.values())}
    best = max(every, key=every.get)
    # One knob at a time from the grid's centre (the old climb) stops on the ridge, short of it:
    centre = (64, 0.1, 5.0)
    along_axes = [centre[:a] + (v,) + centre[a + 1:] for a, name in enumerate(ALS_LIKE) for v in ALS_LIKE[name]]
    assert max(along_axes, key=every.get) == centre != best
    for peak in [(4, 4, 2), (1, 3, 0), (5, 2, 4)]:
        score = lambda setting, peak=peak: ridge(setting, peak)
        truth = max(every, key=lambda values: score(dict(zip(ALS_LIKE, values)))[0])
        # the whole grid where the budget allows it, TPE then the full neighbourhood where not
        for budget, most in ((None, 180), (40, 179)):
            value, setting, result, fits = peers.grid_search(ALS_LIKE, score, budget)
            assert tuple(setting.values()) == truth and value == 0.0 and result == setting["factors"]
            assert fits <= most
    # A grid of one setting (or none: popularity) is scored once.
    assert peers.grid_search({}, lambda s: (1.0, "r")) == (1.0, {}, "r", 1)
    assert peers.grid_search({"l2": (7.0,)}, lambda s: (s["l2"], None))[:2] == (7.0, {"l2": 7.0})


def test_a_choice_at_an_end_of_its_axis_is_an_edge_unless_the_axis_is_fixed_or_the_end_is_no_l2():
    grid = {"factors": (16, 64, 256), "regularization": (0.0, 0.01, 0.1), "lr": (0.01,)}
    assert peers.grid_edges(grid, {"factors": 256, "regularization": 0.01, "lr": 0.01}) == ["factors"]
    assert peers.grid_edges(grid, {"factors": 64, "regularization": 0.0, "lr": 0.01}) == []
    assert peers.grid_edges(grid, {"factors": 16, "regularization": 0.1, "lr": 0.01}) == ["factors", "regularization"]


class _FakeImplicit:
    """An implicit model's fit as fit_along meets it: its factors after each iteration, then the
    callback; implicit's ModelFitError at the end of a fit whose factors went NaN. A user's score of
    an item is user . item: every user's one factor good(iterations) ? 1 : -1, an item's its
    training count, so validation NDCG is popularity's where good, its reverse's elsewhere."""

    def __init__(self, setting, X, good, log, nan_at_end=False):
        self.setting, self.good, self.log, self.nan_at_end = setting, good, log, nan_at_end
        self.counts = np.asarray(X.sum(0)).ravel().astype(np.float32).reshape(-1, 1)

    def fit(self, X, show_progress=False, callback=None):
        from implicit.recommender_base import ModelFitError
        for iteration in range(self.setting["iterations"]):
            self.log.append((self.setting.get("learning_rate"), iteration + 1))
            sign = 1.0 if self.good(self.setting, iteration + 1) else -1.0
            self.user_factors, self.item_factors = np.full((X.shape[0], 1), sign, np.float32), self.counts
            if callback:  # fit_along's; a refit at the chosen count has none
                callback(iteration, 0.0, 0.0, 0)  # BPR's four arguments
        if self.nan_at_end:
            raise ModelFitError("NaN encountered in factors")


def test_bpr_chooses_its_iterations_along_one_fit(monkeypatch, synthetic_ml100k):
    """BPR's (and ALS's) iterations: validation scored after each count of the grid's axis in one
    fit, the best count kept, the fit ended after PATIENCE counts without a better one."""
    pytest.importorskip("implicit")
    X = peers.ranking_task("ml-100k", str(synthetic_ml100k)).training_matrix()
    log = []

    def good(setting, iterations):  # lr 0.01 good after 51 to 100 iterations; lr 0.001 never
        return setting["learning_rate"] == 0.01 and 50 < iterations <= 100

    monkeypatch.setattr(peers, "implicit_model", lambda name, setting, seed=0: _FakeImplicit(setting, X, good, log))
    monkeypatch.setitem(peers.GRIDS, "bpr", {"factors": (8,), "learning_rate": (0.001, 0.01), "regularization": (0.0,),
                                             "iterations": (50, 100, 300, 1000)})
    test, extra = peers.ranking_baseline("bpr", "ml-100k", str(synthetic_ml100k))
    assert extra["chosen on val"] == "factors=8, learning_rate=0.01, regularization=0, iterations=100"
    assert extra["settings fitted"] == 2 and 0 < test["ndcg@10"] <= 1
    ran = {lr: max(i for rate, i in log if rate == lr) for lr in (0.001, 0.01)}
    # lr 0.01: better at 100, then 300 and 1000 no better (the whole fit); lr 0.001: its first
    # count the best, then 100 and 300 no better: ended there, 700 iterations saved
    assert ran == {0.01: 1000, 0.001: 300}


def test_a_fit_that_ends_in_nan_factors_keeps_its_best_count_before_them(monkeypatch, synthetic_ml100k):
    """implicit's BPR at too large a step ends in NaN factors, found after its last iteration
    (ModelFitError, Amazon Beauty at lr 1.0): the count that scored best before is kept."""
    pytest.importorskip("implicit")
    X = peers.ranking_task("ml-100k", str(synthetic_ml100k)).training_matrix()
    monkeypatch.setattr(peers, "implicit_model", lambda name, setting, seed=0: _FakeImplicit(
        setting, X, lambda setting, iterations: True, [], nan_at_end=True))
    values = iter([0.1, 0.3, 0.2])
    value, iterations, scorer = peers.fit_along("bpr", X, {"learning_rate": 1.0}, (1, 2, 3), lambda scorer: next(values))
    assert (value, iterations) == (0.3, 2) and scorer is not None


def test_als_stopped_along_its_fit_is_the_fit_of_that_many_iterations(synthetic_ml100k):
    """What lets the iterations axis be chosen along one fit: implicit's ALS after N iterations of
    a longer fit is the N-iteration fit, to the bit (each half-step a deterministic solve)."""
    pytest.importorskip("implicit")
    task = peers.ranking_task("ml-100k", str(synthetic_ml100k))
    X = task.training_matrix()
    setting = {"factors": 8, "regularization": 1.0, "alpha": 5.0}
    seen = []

    def validation(scorer):  # the 5-iteration factors' scores are the best: later counts score less
        seen.append(scorer.score_all(torch.arange(4)))
        return -len(seen) + (2 if len(seen) == 2 else 0)

    value, iterations, scorer = peers.fit_along("als", X, setting, (2, 5, 15, 30, 60), validation)
    assert (iterations, len(seen)) == (5, 4)  # 2, 5, then 15 and 30 no better (PATIENCE): no 60
    straight = peers.fit_ranking_baseline("als", X, {**setting, "iterations": 5})
    assert torch.equal(scorer.score_all(torch.arange(4)), straight.score_all(torch.arange(4)))
    assert not torch.equal(seen[0], seen[1])


def test_a_seeded_bpr_fit_is_repeatable(synthetic_ml100k):
    """BPR's search chooses the same setting run to run only if a seeded fit repeats: implicit's
    BPR on several threads races (Hogwild), so peers fit it on one."""
    pytest.importorskip("implicit")
    X = peers.ranking_task("ml-100k", str(synthetic_ml100k)).training_matrix()
    setting = {"factors": 8, "learning_rate": 0.05, "regularization": 0.001, "iterations": 20}
    first, second = (peers.fit_ranking_baseline("bpr", X, setting, seed=3).score_all(torch.arange(50)) for _ in range(2))
    other_seed = peers.fit_ranking_baseline("bpr", X, setting, seed=4).score_all(torch.arange(50))
    assert torch.equal(first, second) and not torch.equal(first, other_seed)


def test_the_one_fit_ease_row_fits_at_the_l2_its_search_chose_on_the_same_data(monkeypatch, synthetic_ml100k, tmp_path):
    fitted = []

    def fit(name, X, setting, seed=0):  # validation NDCG peaks at L2 250 (not the old constant 1000)
        fitted.append((name, setting["l2"]))
        counts = np.asarray(X.sum(0)).ravel() * (1.0 if setting["l2"] == 250.0 else -1.0)
        return peers.Scorer(lambda users: np.broadcast_to(counts, (len(users), len(counts))))

    monkeypatch.setattr(peers, "fit_ranking_baseline", fit)
    choices = tmp_path / "choices.json"
    with pytest.raises(RuntimeError, match="the ease row's search has not run"):
        peers.ranking_baseline("ease_single", "ml-100k", str(synthetic_ml100k), choices=str(choices))
    _, extra = peers.ranking_baseline("ease", "ml-100k", str(synthetic_ml100k), choices=str(choices))
    assert extra["chosen on val"] == "l2=250" and len(fitted) == len(peers.GRIDS["ease"]["l2"])
    fitted.clear()
    _, extra = peers.ranking_baseline("ease_single", "ml-100k", str(synthetic_ml100k), choices=str(choices))
    assert fitted == [("ease_single", 250.0)] and extra["settings fitted"] == 1


def test_mixture_use_tells_copied_tastes_from_a_mixture_that_chooses(synthetic_ml100k):
    """Copies of one taste score the same whatever the weights (attention off changes nothing,
    cosine 1); orthogonal tastes with a sharp attention have cosine 0, weights near 1, and a
    score that the attention changes. The model itself is left as it was."""
    import torch

    from MFMixTaste import MFMixTaste
    task = peers.ranking_task("ml-100k", synthetic_ml100k)
    torch.manual_seed(0)
    model = MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2, init_std=0.5)
    with torch.no_grad():
        model.user_factors[:, 0, 1] = model.user_factors[:, 0, 0]  # both tastes the same vector
    copied = studies.mixture_use(task, model)
    assert copied["cosine"] > 0.999
    assert all(abs(trained - averaged) < 1e-6 for _, _, trained, averaged in copied["bins"])
    assert copied["bins"][0][0] == "all users" and copied["bins"][0][1] == sum(b[1] for b in copied["bins"][1:])
    with torch.no_grad():
        model.user_factors[:, 0, 0], model.user_factors[:, 0, 1] = torch.eye(4)[0], torch.eye(4)[1]
        model.user_factors[:, 1] = 50 * model.user_factors[:, 0]  # attention: each taste claims its items
        model.item_factors.abs_()  # every item scores >= 0 under both tastes, so one claims it sharply
        before = model.user_factors.clone()
    chosen = studies.mixture_use(task, model)
    assert abs(chosen["cosine"]) < 1e-6 and chosen["largest_weight"] > 0.9 and chosen["decided_share"] > 0.5
    assert chosen["bins"][0][2] != chosen["bins"][0][3]
    assert torch.equal(model.user_factors, before)
    with torch.no_grad():
        model.user_factors[:, 1] = 0
    assert studies.mixture_use(task, model)["largest_weight"] == pytest.approx(0.5)


def test_the_fold_in_studys_held_out_users_follow_their_seed():
    """--fold_in_seeds: each seed holds out its own users (the same ones again for the same
    seed), and none of them is in run A's parts; run B trains on their given rows only."""
    from conftest import mixture_ratings

    ratings = loader.encode(*mixture_ratings(n_users=200, n_items=50, n_ratings=4000))
    rows = np.arange(len(ratings))
    first, again, other = (studies._hold_out(ratings, rows, 2020, seed) for seed in (0, 0, 1))
    assert np.array_equal(first[0], again[0]) and not np.array_equal(first[0], other[0])
    for held, _, held_rows, given, a_parts, b_parts in (first, other):
        assert len(held) == int(200 * studies.FOLD_IN_HELD)
        assert not np.isin(ratings.users[np.concatenate(a_parts)], held).any()
        assert np.array_equal(np.setdiff1d(b_parts[0], a_parts[0]), np.sort(held_rows[given]))


def test_fold_in_seeds_that_are_not_numbers_are_one_line(tmp_path, synthetic_ml100k):
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--fold_in", "--fold_in_seeds=0,one",
                           f"--data_dir={synthetic_ml100k}", "--dataset=ml-100k", f"--output={tmp_path / 'b.md'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "--fold_in_seeds=0,one: give whole numbers" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b.md").exists()


def _gone(pid):
    """A process that has exited (a zombie no one reaped counts: it holds no core)."""
    try:
        status = open(f"/proc/{pid}/status").read() if sys.platform == "linux" else ""
    except FileNotFoundError:
        return True
    if status:
        return re.search(r"^State:\s+Z", status, re.MULTILINE) is not None
    try:
        import os
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
def test_a_killed_benchmark_stops_its_rows_process_and_removes_its_scratch(tmp_path):
    """benchmark.py killed mid-row: the row's process (under measure's wrapper) is stopped with it,
    not left running on the cores, and its scratch folder is removed."""
    import signal
    import time
    pid_file, scratch_root = tmp_path / "row.pid", tmp_path / "scratch"
    scratch_root.mkdir()
    row = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    script = (f"import sys, tempfile; sys.path.insert(0, {str(ROOT)!r}); from bench import peers; "
              f"peers.exit_on_terminate()\n"
              f"with tempfile.TemporaryDirectory(dir={str(scratch_root)!r}):\n"
              f"    peers.measure([sys.executable, '-c', {row!r}])\n")
    benchmark_process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120  # a slow, shared machine starts two interpreters slowly
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        row_pid = int(pid_file.read_text())
        benchmark_process.send_signal(signal.SIGTERM)
        assert benchmark_process.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while not _gone(row_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(row_pid)
        assert list(scratch_root.iterdir()) == []
    finally:
        benchmark_process.kill()
