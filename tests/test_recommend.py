"""recommend.py on runs whose tastes are known, the movie files of each format, and bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import loader
from conftest import ROOT, write_ratings
from recommend import Recommender, RunError

GENRE_FLAGS = {"Action": 1, "Romance": 14}  # columns of ml-100k's 19 genre flags


def u_item_line(item_id, title, genre):
    flags = ["0"] * 19
    flags[GENRE_FLAGS[genre]] = "1"
    return f"{item_id}|{title}|01-Jan-1995||http://example.org/{item_id}|" + "|".join(flags)


def two_groups(folder):
    """Movies 1-20 (group A, Action) and 21-40 (group B, Romance); users 1-60 watch only A,
    61-120 only B, 121-160 both: 10 of each, all rated 5. Users 1-60 also rated three B movies
    1 star (below the ranking task's positives: they never train it). Movie 40 is "unknown",
    with no year, as movie 267 of the real u.item. Written as ml-100k, with a latin-1 u.item."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(160):
        if user < 60:
            chosen = rng.choice(20, 15, replace=False)
        elif user < 120:
            chosen = 20 + rng.choice(20, 15, replace=False)
        else:
            chosen = np.concatenate([rng.choice(20, 10, replace=False), 20 + rng.choice(20, 10, replace=False)])
        users += [user + 1] * len(chosen)
        items += list(chosen + 1)
    disliked = [(user + 1, 21 + item) for user in range(60) for item in rng.choice(20, 3, replace=False)]
    ratings = [5.0] * len(users) + [1.0] * len(disliked)
    write_ratings(folder / "ml-100k" / "u.data", np.array(users + [u for u, _ in disliked]),
                  np.array(items + [i for _, i in disliked]), np.array(ratings), sep="\t")
    lines = [u_item_line(m, f"{'Café' if m == 1 else 'Alpha'} {m} (1990)" if m <= 20 else
                         "unknown" if m == 40 else f"Beta {m} (1995)",
                         "Action" if m <= 20 else "Romance") for m in range(1, 41)]
    (folder / "ml-100k" / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


RATING_RUN = ["--task=rating", "--dim=4", "--epochs=3", "--batch_size=256"]


def train_run(tmp, data_dir, name, n_tastes, settings=()):
    # d=1: one taste vector cannot score two opposite groups high at once; two tastes can.
    args = [sys.executable, str(ROOT / "train.py"), "--task=ranking", "--dataset=ml-100k",
            f"--data_dir={data_dir}", f"--runs_dir={tmp / 'runs'}", f"--results_dir={tmp / 'results'}",
            "--download=False", "--progress=False", f"--run_name={name}", f"--n_tastes={n_tastes}",
            "--dim=1", "--init_std=0.5", "--prior_tastes=0", "--prior_attention=0", "--prior_items=0",
            "--batch_size=32", "--epochs=100", "--patience=0", *settings]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tastes")
    data_dir = two_groups(tmp / "data")
    return {"data": data_dir, "tmp": tmp, "mixture": train_run(tmp, data_dir, "mixture", 2),
            "rating": train_run(tmp, data_dir, "rating", 2, RATING_RUN)}


def group(item_ids):
    return {(int(m) - 1) // 20 for m in item_ids}


def test_two_tastes_find_the_two_groups_of_a_both_groups_user(runs):
    mixture = Recommender.load(runs["mixture"])
    split = both_recommended = 0
    for user in range(121, 161):
        tastes = mixture.tastes(user, n=5)
        groups = [group(m["item_id"] for m in taste["top_items"]) for taste in tastes]
        # Each taste's top 5 movies lie in one group, and the two tastes in different groups.
        split += len(groups[0]) == len(groups[1]) == 1 and groups[0] != groups[1]
        both_recommended += group(mixture.recommend(user, n=6)["item_id"]) == {0, 1}
    # Measured: 29 to 32 of the 40 such users split with seeds 0 to 2 (with K=1 there is one
    # taste, in one group, by construction).
    assert split >= 20, split
    assert both_recommended >= 20, both_recommended
    for user in (1, 61):  # a one-group user's recommendations stay in the group
        assert group(mixture.recommend(user, n=3)["item_id"]) == {0 if user == 1 else 1}


def test_recommendations_exclude_rated_items_and_carry_titles_and_tastes(runs):
    run = Recommender.load(runs["mixture"])
    frame = run.recommend(121, n=10)
    rated = set(run.item_ids[run.rated(run.user_row(121))])
    assert len(frame) == 10 and not rated & set(frame["item_id"])
    assert list(frame.columns) == ["rank", "item_id", "title", "year", "genres", "score", "taste", "taste_weight"]
    assert frame["score"].is_monotonic_decreasing and set(frame["taste"]) <= {1, 2}
    assert all(0 < w <= 1 for w in frame["taste_weight"])
    assert frame["title"].str.match(r"(Alpha|Beta|Café) \d+ \(\d{4}\)|unknown$").all()
    everyone = run.recommend_all(n=5)
    assert len(everyone) == 5 * 160
    mine = everyone[everyone["user_id"] == 121]["item_id"].tolist()
    assert mine == frame["item_id"].tolist()[:5]


def test_similar_movies_stay_in_their_group(runs):
    frame = Recommender.load(runs["mixture"]).similar(5, n=5)
    assert 5 not in set(frame["item_id"]) and group(frame["item_id"]) == {0}
    assert frame["cosine"].is_monotonic_decreasing


def test_a_finished_run_leaves_its_pictures_and_projector(runs):
    results = runs["tmp"] / "results" / "mixture"
    for name in ("taste_weights.svg", "item_map.svg"):
        assert "<svg" in (results / name).read_text()
    assert (runs["mixture"] / "projector_config.pbtxt").is_file()
    assert "Café 1 (1990)" in json.loads((runs["mixture"] / "items.json").read_text(encoding="utf-8"))[0]["title"]


def test_large_runs_picture_a_sample_of_users_and_project_their_most_used_items(tmp_path, monkeypatch):
    """Above PICTURE_USERS users the taste histograms hold that many drawn users, each with the
    mean over all of its pairs; above PROJECTOR_ITEMS items the projector shows the most used."""
    from tensorboardX import SummaryWriter

    import pictures
    import runs
    from MFMixTaste import MFMixTaste
    torch.manual_seed(0)
    model = MFMixTaste(50, 30, dim=4, n_tastes=3, global_mean=0.0, init_std=1.0)
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 50, 2000), rng.integers(0, 30, 2000)
    drawn = {}
    monkeypatch.setattr(pictures, "PICTURE_USERS", 7)
    monkeypatch.setattr(pictures, "taste_weights", lambda path, mean, title, note: drawn.update(mean=mean, note=note))
    pictures.run_pictures(tmp_path, model, (users, items), [[]] * 30, "set")
    every_user = pictures.mean_weights(model, users, items, 50)                  # (50, K)
    assert drawn["mean"].shape == (7, 3) and "7 users drawn of 50" in drawn["note"]
    matches = [np.flatnonzero(np.isclose(every_user, row).all(1)) for row in drawn["mean"]]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 7
    monkeypatch.setattr(runs, "PROJECTOR_ITEMS", 5)
    popular = [3, 11, 17, 22, 29]
    seen = np.concatenate([np.arange(30), np.repeat(popular, 4)])
    movies = [{"title": f"m{i}", "genres": []} for i in range(30)]
    with SummaryWriter(str(tmp_path / "run")) as writer:
        runs.write_projector(writer, tmp_path / "run", model.item_factors.detach(), movies, seen)
    shown = (tmp_path / "run" / "00000" / "item_embeddings" / "metadata.tsv").read_text().split("\n")[1:6]
    assert [line.split("\t")[0] for line in shown] == [f"m{i}" for i in popular]
    vectors = np.loadtxt(tmp_path / "run" / "00000" / "item_embeddings" / "tensors.tsv")
    assert np.allclose(vectors, model.item_factors.detach().numpy()[popular], atol=1e-4)


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "recommend.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_the_command_line_prints_titles_and_its_json_round_trips(runs, tmp_path):
    text = cli(runs["mixture"], "--user=121", "--n=5")
    assert text.returncode == 0, text.stderr
    assert "Beta" in text.stdout or "Alpha" in text.stdout
    assert "taste" in text.stdout and len(text.stdout.strip().splitlines()) == 5
    as_json = cli(runs["mixture"], "--user=121", "--n=5", "--json")
    records = json.loads(as_json.stdout)
    expected = Recommender.load(runs["mixture"]).recommend(121, n=5)
    assert [r["item_id"] for r in records] == expected["item_id"].tolist()
    assert [r["score"] for r in records] == expected["score"].tolist()
    tastes = json.loads(cli(runs["mixture"], "--user=121", "--tastes", "--json").stdout)
    assert [t["taste"] for t in tastes] == [1, 2] and abs(sum(t["share"] for t in tastes) - 1) < 1e-2
    similar = cli(runs["mixture"], "--similar=21", "--n=3")
    assert similar.returncode == 0 and "Beta" in similar.stdout and "cosine" in similar.stdout
    plot = tmp_path / "user.svg"
    drawn = cli(runs["mixture"], "--user=121", f"--plot={plot}")
    assert drawn.returncode == 0 and "taste 2" in plot.read_text()


def test_one_answer_loads_neither_pandas_nor_ignite(runs):
    # A process that answers one user imports what the answer needs: pandas alone is 0.3 s of it.
    done = subprocess.run([sys.executable, "-c", "import sys, recommend; code = recommend.main(sys.argv[1:]); "
                           "print(sorted(m for m in ('pandas', 'ignite', 'matplotlib', 'scipy') if m in sys.modules))",
                           str(runs["mixture"]), "--user=121", "--n=3"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]" and len(done.stdout.strip().splitlines()) == 4


@pytest.mark.parametrize("args,message", [
    (["--user=999"], "unknown user id 999: this run's 160 users have ids 1 to 160"),
    (["--similar=77"], "unknown item id 77: this run's 40 items have ids 1 to 40"),
])
def test_unknown_ids_are_one_clear_line(runs, args, message):
    done = cli(runs["mixture"], *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_missing_and_unfinished_runs_are_one_clear_line(tmp_path):
    done = cli(tmp_path / "nowhere", "--user=1")
    assert done.returncode == 2 and "is not a run folder" in done.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    done = cli(tmp_path / "half", "--user=1")
    assert done.returncode == 2 and "is unfinished" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(RunError, match="unfinished"):
        Recommender.load(tmp_path / "half")


def test_a_run_without_a_movie_file_names_movies_by_id(runs, tmp_path):
    data = tmp_path / "data"
    two_groups(data)
    (data / "ml-100k" / "u.item").unlink()
    run_dir = train_run(tmp_path, data, "plain", 1)
    assert not (run_dir / "items.json").exists()
    done = cli(run_dir, "--user=1", "--n=3")
    assert done.returncode == 0 and "named by id" in done.stderr
    assert "[]" not in done.stdout  # no empty genre list
    assert Recommender.load(run_dir).recommend(1, n=3)["title"].str.fullmatch(r"\d+").all()
    tastes = cli(run_dir, "--user=1", "--tastes")
    assert tastes.returncode == 0 and "genres:" not in tastes.stdout


def test_a_run_folder_from_before_items_json_still_answers(runs, tmp_path):
    """Run folders written before items were called items hold movies.json keyed "movie_id":
    they answer as before, with the item_id column."""
    old = tmp_path / "old"
    shutil.copytree(runs["mixture"], old)
    records = json.loads((old / "items.json").read_text(encoding="utf-8"))
    (old / "items.json").unlink()
    (old / "movies.json").write_text(json.dumps([{"movie_id" if k == "item_id" else k: v for k, v in r.items()}
                                                 for r in records]), encoding="utf-8")
    then, now = Recommender.load(old).recommend(121, n=5), Recommender.load(runs["mixture"]).recommend(121, n=5)
    assert then.equals(now) and then["title"].str.contains("Café|Alpha|Beta").all()


# ----------------------------------------------------------------------------- movie files

def test_each_movie_file_format_parses_with_its_encoding(tmp_path):
    write_ratings(tmp_path / "ml-1m" / "ratings.dat", [1], [1], [5.0])
    (tmp_path / "ml-1m" / "movies.dat").write_bytes(
        "1::Café au lait (1993)::Comedy|Romance\n2::Heat (1995)::Action|Crime|Thriller\n".encode("latin-1"))
    movies = loader.load_movies("ml-1m", tmp_path)
    assert movies.loc[1, "title"] == "Café au lait (1993)" and movies.loc[1, "year"] == 1993
    assert movies.loc[2, "genres"] == ["Action", "Crime", "Thriller"]

    write_ratings(tmp_path / "ml-100k" / "u.data", [1], [1], [5.0], sep="\t")
    (tmp_path / "ml-100k" / "u.item").write_bytes(
        (u_item_line(1, "Café Society (1995)", "Romance") + "\n").encode("latin-1"))
    movies = loader.load_movies("ml-100k", tmp_path)
    assert movies.loc[1, "title"] == "Café Society (1995)" and movies.loc[1, "genres"] == ["Romance"]

    write_ratings(tmp_path / "ml-latest-small" / "ratings.csv", [1], [1], [5.0], sep=",",
                  header="userId,movieId,rating,timestamp")
    (tmp_path / "ml-latest-small" / "movies.csv").write_text(
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Untitled,(no genres listed)\n", encoding="utf-8")
    movies = loader.load_movies("ml-latest-small", tmp_path)
    assert movies.loc[1, "title"] == "American President, The (1995)" and movies.loc[1, "year"] == 1995
    assert movies.loc[2, "genres"] == [] and movies.loc[2, "year"] is None


def test_a_folder_without_a_movie_file_has_no_movies(tmp_path):
    write_ratings(tmp_path / "ml-1m" / "ratings.dat", [1], [1], [5.0])
    assert loader.load_movies("ml-1m", tmp_path) is None


# ----------------------------------------------------------------------------- right answers

def test_a_ranking_run_never_recommends_a_movie_the_user_rated_low(runs):
    """The ranking model trains on ratings >= 3 only; the 1-star movies of users 1-60 are still
    movies they rated, and must never come back as recommendations."""
    run = Recommender.load(runs["mixture"])
    everyone = run.recommend_all(n=40)  # every movie each user has not rated
    raw = np.loadtxt(runs["data"] / "ml-100k" / "u.data", dtype=np.int64)
    rated = set(zip(raw[:, 0].tolist(), raw[:, 1].tolist()))
    assert not rated & set(zip(everyone["user_id"].tolist(), everyone["item_id"].tolist()))
    disliked = {(u, m) for u, m, r in raw[:, :3].tolist() if r == 1}
    assert len(disliked) == 180
    for user in (1, 2, 3):
        shown = set(run.recommend(user, n=40)["item_id"])
        assert not shown & {m for u, m in disliked if u == user}
        assert len(shown) == 40 - len({m for u, m in rated if u == user})


def test_recommend_all_returns_at_most_the_unrated_items_and_no_rated_ones(runs):
    run = Recommender.load(runs["mixture"])
    everyone = run.recommend_all(n=5000)  # more than there are movies
    assert np.isfinite(everyone["score"]).all()
    per_user = everyone.groupby("user_id").size()
    assert per_user.loc[1] == 40 - 18 and per_user.loc[121] == 40 - 20


@pytest.mark.parametrize("call", [
    lambda run: run.recommend("abc"), lambda run: run.recommend(6.9), lambda run: run.recommend(True),
    lambda run: run.recommend(6, n=-1), lambda run: run.recommend(6, n=0), lambda run: run.similar(5, n=-2),
    lambda run: run.recommend_all(n=-1), lambda run: run.tastes(6, n=2.5),
])
def test_bad_ids_and_counts_are_run_errors(runs, call):
    with pytest.raises(RunError, match="whole number"):
        call(Recommender.load(runs["mixture"]))


def test_predicted_ratings_are_shown_within_the_rating_range(runs):
    run = Recommender.load(runs["rating"])
    assert run.rating_range == (1.0, 5.0) and run.score_name == "rating"
    with torch.no_grad():
        run.model.item_bias += 10.0  # every prediction far above 5 stars
    assert run.recommend(1, n=5)["rating"].max() == 5.0
    assert run.recommend_all(n=3)["rating"].max() == 5.0


def test_a_movie_without_a_year_keeps_the_year_column_whole(runs):
    run = Recommender.load(runs["rating"])
    assert run.items["year"].iloc[0] == 1990 and run.items["year"].iloc[-1] is None
    # A both-groups user who has not rated movie 40: --n=20 shows all 20 movies left to them.
    user = next(u for u in range(121, 161) if 39 not in run.rated(run.user_row(u)))
    done = cli(runs["rating"], f"--user={user}", "--n=20")
    assert done.returncode == 0 and ".0)" not in done.stdout and "nan" not in done.stdout
    assert "(1990) (1990" not in done.stdout and "unknown  [Romance]" in done.stdout
    as_json = cli(runs["rating"], f"--user={user}", "--n=20", "--json")

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    records = json.loads(as_json.stdout, parse_constant=no_constant)
    years = {r["item_id"]: r["year"] for r in records}
    assert 40 in years and years[40] is None
    assert all(isinstance(y, int) for m, y in years.items() if m != 40)


def test_tastes_show_as_many_movies_as_asked(runs):
    run = Recommender.load(runs["mixture"])
    tastes = run.tastes(121, n=30)
    row = run.user_row(121)
    with torch.no_grad():
        dominant = torch.softmax(run.model.attention[row] @ run.model.item_factors.T, 0).argmax(0).numpy()
    unrated = np.ones(len(run.item_ids), dtype=bool)
    unrated[run.rated(row)] = False
    assert [len(t["top_items"]) for t in tastes] == [min(30, int((unrated & (dominant == k)).sum())) for k in (0, 1)]


def test_a_tastes_movies_are_what_the_model_recommends_under_it(runs):
    """Under each taste: unrated movies on which that taste holds the largest weight, by the
    model's own score (biases included); so the model's top recommendation leads the list of
    the taste that holds it, and the user's own movies are filed as rated_tastes files them."""
    for name in ("mixture", "rating"):
        run = Recommender.load(runs[name])
        for user in (1, 61, 121, 140):
            tastes, top = run.tastes(user, n=5), run.recommend(user, n=1).iloc[0]
            rated = set(run.item_ids[run.rated(run.user_row(user))])
            for taste in tastes:
                scores = [m[run.score_name] for m in taste["top_items"]]
                assert scores == sorted(scores, reverse=True) and not rated & {m["item_id"] for m in taste["top_items"]}
                assert all(m["weight"] >= 1 / len(tastes) for m in taste["top_items"])
            leads = [t["top_items"][0]["item_id"] for t in tastes if t["top_items"]]
            assert top["item_id"] in leads
            own = run.rated_tastes(user)
            for taste in tastes:
                assert [m["item_id"] for m in taste["rated_items"]] == \
                    own[own["taste"] == taste["taste"]]["item_id"].head(5).tolist()
            assert abs(sum(t["share"] for t in tastes) - 1) < 1e-3


@pytest.mark.parametrize("name,damage", [
    ("dataset.npz", b"not a zip"), ("items.json", b"[{\"item_id\": 1"), ("config.json", b"[1, 2]"),
])
def test_a_damaged_run_file_is_named_in_one_line(runs, tmp_path, name, damage):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(runs["mixture"], copy)
    (copy / name).write_bytes(damage)
    done = cli(copy, "--user=1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{copy / name} is damaged" in done.stderr


def test_a_map_that_cannot_be_written_is_one_line(runs):
    done = cli(runs["mixture"], "--user=1", "--plot=/no/such/folder/x.svg")
    assert done.returncode == 2 and "cannot write /no/such/folder/x.svg" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_best_model_is_chosen_by_its_score_not_by_its_name(tmp_path):
    from files import best_model_file
    for name in ("best_model_9_neg_val_mse=-0.8000.pt", "best_model_12_neg_val_mse=-0.7000.pt",
                 "best_model_3_val_ndcg_at_10=0.1000.pt"):
        (tmp_path / name).write_bytes(b"")
    assert best_model_file(tmp_path).name == "best_model_3_val_ndcg_at_10=0.1000.pt"
    (tmp_path / "best_model_3_val_ndcg_at_10=0.1000.pt").unlink()
    assert best_model_file(tmp_path).name == "best_model_12_neg_val_mse=-0.7000.pt"
    assert best_model_file(tmp_path / "nothing") is None


def test_rated_tastes_split_a_both_groups_users_movies_by_group(runs):
    """Users 121-160 rated 10 Action and 10 Romance movies: each rated movie is listed with the
    taste that carries it, and the two tastes split the two groups (purity against the group)."""
    from bench import studies
    run = Recommender.load(runs["mixture"])
    purities = []
    for user in range(121, 161):
        frame = run.rated_tastes(user)
        assert list(frame.columns) == ["item_id", "title", "taste", "weight"] and len(frame) == 20
        assert set(frame["item_id"]) == set(run.item_ids[run.rated(run.user_row(user))])
        assert frame["taste"].isin([1, 2]).all() and frame["weight"].between(0.5, 1).all()  # K=2
        groups = (frame["item_id"].to_numpy() - 1) // 20
        purities.append(studies.purity(np.zeros(20, dtype=int), frame["taste"].to_numpy(), groups)[0][0])
    print("mean purity", np.mean(purities))
    assert np.mean(purities) >= 0.9, purities  # one group per taste (0.5 if both held both)
    tastes = json.loads(cli(runs["mixture"], "--user=121", "--tastes", "--n=3", "--json").stdout)
    assert all(len(t["rated_items"]) <= 3 for t in tastes)
    assert {m["item_id"] for t in tastes for m in t["rated_items"]} <= set(run.rated_tastes(121)["item_id"])
    text = cli(runs["mixture"], "--user=121", "--tastes", "--n=3").stdout
    assert "the user's own items it holds the most weight on:" in text and "would recommend" in text
