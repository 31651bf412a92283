"""New users without retraining (fold-in), every user's answers to a file, on runs of the two
groups of movies of test_recommend.py (users 1-60 watch group A, movies 1-20; 61-120 group B,
21-40; 121-160 both)."""


import numpy as np
import pandas as pd
import pytest
from test_recommend import cli, group, train_run, two_groups

import recommend
from recommend import Recommender, RunError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fold_in")
    data_dir = two_groups(tmp / "data")
    return {"tmp": tmp, "mixture": train_run(tmp, data_dir, "mixture", 2),
            "rating": train_run(tmp, data_dir, "rating", 2, ["--task=rating", "--dim=4", "--epochs=3", "--batch_size=256"])}


def test_a_new_user_of_one_group_is_answered_from_that_group_without_their_items(runs):
    run = Recommender.load(runs["mixture"])
    for met, expected in (([1, 2, 3, 4, 5, 6], 0), ([21, 22, 23, 24, 25], 1)):
        answer = run.recommend_new(met, n=5)
        assert group(answer["item_id"]) == {expected}
        assert not set(met) & set(answer["item_id"]) and list(answer["rank"]) == [1, 2, 3, 4, 5]
    both = run.recommend_new([1, 2, 3, 4, 21, 22, 23, 24], n=8)
    assert group(both["item_id"]) == {0, 1}  # a two-group history gets both groups (two tastes)


def test_a_fold_in_is_deterministic_and_does_not_depend_on_the_other_users_of_its_batch(runs):
    run = Recommender.load(runs["mixture"])
    alone = run.recommend_new([1, 2, 3, 21], n=10)
    assert alone.equals(run.recommend_new([1, 2, 3, 21], n=10))
    histories = pd.DataFrame({"user_id": ["other"] * 5 + ["me"] * 4,
                              "item_id": [30, 31, 32, 33, 34, 1, 2, 3, 21]})
    together = run.recommend_histories(histories, n=10)
    mine = together[together["user_id"] == "me"]
    assert mine["item_id"].tolist() == alone["item_id"].tolist()
    np.testing.assert_allclose(mine["score"], alone["score"], atol=1e-4)
    assert together["user_id"].drop_duplicates().tolist() == ["other", "me"]  # the history's order


def test_a_trained_users_own_history_folds_in_near_the_trained_user(runs):
    run = Recommender.load(runs["mixture"])
    agree = []
    for user in (5, 70, 130, 150):
        met = run.item_ids[run.rated(run.user_row(user))]
        trained = run.recommend(user, n=5)["item_id"].tolist()
        folded = run.recommend_new(met, n=5)["item_id"].tolist()
        agree.append(len(set(trained) & set(folded)))
    assert sum(agree) >= 14, agree  # of 20


def test_a_short_history_is_held_by_the_prior_as_the_runs_least_user_and_a_long_one_is_not(runs, monkeypatch):
    """FOLD_IN_LEAST_SHARE: a history shorter than that share of the mean user's interactions has
    the prior of one that long (its tastes stay smaller, its answer nearer popularity); a longer
    history's fold-in is the same with or without the rule."""
    run = Recommender.load(runs["mixture"])
    run.prior_weights.update(tastes=0.05, attention=0.05)  # the fixture's run trained without a prior
    least = recommend.FOLD_IN_LEAST_SHARE * len(run.seen_items) / len(run.user_ids)
    short, long = [3], list(range(1, 21))
    assert len(short) < least < len(long)

    def folded(items):
        position, rows = np.zeros(len(items), dtype=np.int64), recommend.loader.positions(run.item_ids, np.array(items))[0]
        return run.fold_in(position, rows, None, np.ones(len(items)), 1)[0]

    held = [folded(short), folded(long)]
    monkeypatch.setattr(recommend, "FOLD_IN_LEAST_SHARE", 0.0)
    free = [folded(short), folded(long)]
    assert held[0][:, 0].norm() < 0.9 * free[0][:, 0].norm()
    np.testing.assert_array_equal(held[1].numpy(), free[1].numpy())


def test_a_rating_run_folds_in_from_ratings_and_predicts_near_the_trained_user(runs):
    run = Recommender.load(runs["rating"])
    user = 130
    rows = run.rated(run.user_row(user))
    with pytest.raises(RunError, match="rating run"):
        run.recommend_new(run.item_ids[rows])
    import torch
    with torch.no_grad():
        trained = run.model(torch.full((len(rows),), run.user_row(user)), torch.from_numpy(rows)).numpy()
    folded_rows, folded_bias = run.fold_in(np.zeros(len(rows), np.int64), rows, trained.astype(np.float64),
                                           np.ones(len(rows)), 1)
    with torch.no_grad():
        refit = run.model.score_rows(folded_rows, folded_bias)[0, torch.from_numpy(rows)].numpy()
    assert np.corrcoef(trained, refit)[0, 1] > 0.9
    answer = run.recommend_new(run.item_ids[rows], ratings=trained, n=3)
    assert list(answer.columns[:3]) == ["rank", "item_id", "rating"]
    assert answer["rating"].between(*run.rating_range).all()


def test_weights_and_unknown_items_in_histories(runs):
    run = Recommender.load(runs["mixture"])
    heavy_a = run.recommend_new([1, 2, 3, 21, 22, 23], weights=[5, 5, 5, 0.2, 0.2, 0.2], n=4)
    heavy_b = run.recommend_new([1, 2, 3, 21, 22, 23], weights=[0.2, 0.2, 0.2, 5, 5, 5], n=4)
    assert group(heavy_a["item_id"][:2]) == {0} and group(heavy_b["item_id"][:2]) == {1}
    answer = run.recommend_new([1, 2, 999, "x"], n=3)
    assert answer.attrs["unknown_items"] == 2
    with pytest.raises(RunError, match="no item this run knows: lost"):
        run.recommend_histories(pd.DataFrame({"user_id": ["lost"], "item_id": [999]}))
    popular = run.recommend_histories(pd.DataFrame({"user_id": ["lost"], "item_id": [999]}), n=3, fallback="popular")
    assert popular.attrs["popular_for"] == 1 and len(popular) == 3


def test_the_command_line_answers_a_history_file_and_every_user_to_csv_and_parquet(runs, tmp_path):
    history = tmp_path / "new.csv"
    history.write_text("customer,product\nc1,1\nc1,2\nc1,3\nc2,21\nc2,22\nc2,777\n")
    out = tmp_path / "answers.parquet"
    done = cli(runs["mixture"], f"--history={history}", "--n=4", f"--out={out}")
    assert done.returncode == 0, done.stderr
    assert "answered 2 of 2 users" in done.stderr and "1 history rows name items the run never saw" in done.stderr
    answers = pd.read_parquet(out)
    assert list(answers.columns) == ["user_id", "rank", "item_id", "score", "title"]
    assert group(answers[answers["user_id"] == "c1"]["item_id"]) == {0}
    assert group(answers[answers["user_id"] == "c2"]["item_id"]) == {1}
    one = cli(runs["mixture"], "--history_items=21,22,23", "--n=3")
    assert one.returncode == 0 and group(pd.read_csv(__import__("io").StringIO(one.stdout))["item_id"]) == {1}
    # --fold_in_steps reaches the fold-in: one step from the nearest user scores otherwise than 40
    scores = [pd.read_csv(__import__("io").StringIO(cli(runs["mixture"], "--history_items=21,22,23", "--n=3",
                                                        *steps).stdout))["score"] for steps in ([], ["--fold_in_steps=1"])]
    assert not np.allclose(scores[0], scores[1])
    assert cli(runs["mixture"], "--history_items=21", "--fold_in_steps=0").returncode == 2
    everyone = tmp_path / "top.csv"
    done = cli(runs["mixture"], "--all", "--n=5", f"--out={everyone}")
    assert done.returncode == 0, done.stderr
    written = pd.read_csv(everyone)
    expected = Recommender.load(runs["mixture"]).recommend_all(n=5)
    assert len(written) == 5 * 160 and written["item_id"].tolist() == expected["item_id"].tolist()
    assert written["title"].notna().all() and not list(tmp_path.glob(".*"))  # no temporary left


def test_bad_histories_are_one_line_and_leave_no_file(runs, tmp_path):
    lost = tmp_path / "lost.csv"
    lost.write_text("user,item\nu1,999\nu1,998\n")
    out = tmp_path / "answers.csv"
    done = cli(runs["mixture"], f"--history={lost}", f"--out={out}")
    assert done.returncode == 2 and "no item this run knows: u1" in done.stderr and "--fallback=popular" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not out.exists()
    done = cli(runs["mixture"], f"--history={tmp_path / 'none.csv'}")
    assert done.returncode == 2 and "no such file" in done.stderr
    done = cli(runs["mixture"], "--all", f"--out={tmp_path / 'x.txt'}")
    assert done.returncode == 2 and ".csv or .parquet" in done.stderr
    rating = cli(runs["rating"], "--history_items=1,2")
    assert rating.returncode == 2 and "rating run" in rating.stderr


def test_every_user_of_a_run_folds_in_block_by_block(runs):
    """Every user of the run folded in at once from their own items: each block of users is
    fitted together (FOLD_IN_STEPS steps), and the answers stay in their group."""
    run = Recommender.load(runs["mixture"])
    users = np.repeat(np.arange(1, 121), np.diff(run.seen_indptr)[:120])
    histories = pd.DataFrame({"user_id": users, "item_id": run.item_ids[run.seen_items[:run.seen_indptr[120]]]})
    answers = recommend.Recommender.recommend_histories(run, histories, n=3, block=50)
    right = [group(answers[answers["user_id"] == u]["item_id"]) == {0 if u <= 60 else 1} for u in range(1, 121)]
    assert sum(right) >= 110, sum(right)


def test_a_run_of_sparse_users_folds_in_with_more_steps():
    rich = np.concatenate([[0], np.cumsum(np.full(50, 120))])   # 120 training items a user
    sparse = np.concatenate([[0], np.cumsum(np.full(50, 8))])   # 8: Amazon's kind of user
    ranking = {"prior_user_pairs": 100}
    assert recommend.fold_in_steps_for(ranking, rich) == recommend.FOLD_IN_STEPS
    assert recommend.fold_in_steps_for(ranking, sparse) == recommend.FOLD_IN_STEPS_SPARSE > recommend.FOLD_IN_STEPS
    assert recommend.fold_in_steps_for({"prior_user_pairs": 0}, sparse) == recommend.FOLD_IN_STEPS  # no reference: as ML-1M
    with_empty = np.concatenate([[0], np.cumsum(np.r_[np.full(50, 120), np.zeros(500, dtype=int)])])
    assert recommend.fold_in_steps_for(ranking, with_empty) == recommend.FOLD_IN_STEPS  # users with none don't count
