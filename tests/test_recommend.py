"""recommend.py on runs whose tastes are known, the movie files of each format, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

import loader
from conftest import ROOT, write_ratings
from recommend import Recommender, RunError

GENRE_FLAGS = {"Action": 1, "Romance": 14}  # columns of ml-100k's 19 genre flags


def u_item_line(movie_id, title, genre):
    flags = ["0"] * 19
    flags[GENRE_FLAGS[genre]] = "1"
    return f"{movie_id}|{title}|01-Jan-1995||http://example.org/{movie_id}|" + "|".join(flags)


def two_groups(folder):
    """Movies 1-20 (group A, Action) and 21-40 (group B, Romance); users 1-60 watch only A,
    61-120 only B, 121-160 both: 10 of each. Written as ml-100k, with a latin-1 u.item."""
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
    write_ratings(folder / "ml-100k" / "u.data", np.array(users), np.array(items),
                  np.full(len(users), 5.0), sep="\t")
    lines = [u_item_line(m, f"{'Café' if m == 1 else 'Alpha'} {m} (1990)" if m <= 20 else f"Beta {m} (1995)",
                         "Action" if m <= 20 else "Romance") for m in range(1, 41)]
    (folder / "ml-100k" / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def train_run(tmp, data_dir, name, n_tastes):
    # d=1: one taste vector cannot score two opposite groups high at once; two tastes can.
    args = [sys.executable, str(ROOT / "train.py"), "--task=ranking", "--dataset=ml-100k",
            f"--data_dir={data_dir}", f"--runs_dir={tmp / 'runs'}", f"--results_dir={tmp / 'results'}",
            "--download=False", "--progress=False", f"--run_name={name}", f"--n_tastes={n_tastes}",
            "--dim=1", "--init_std=0.5", "--prior_tastes=0", "--prior_attention=0", "--prior_items=0",
            "--batch_size=32", "--epochs=100", "--patience=0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tastes")
    data_dir = two_groups(tmp / "data")
    return {"data": data_dir, "tmp": tmp, "mixture": train_run(tmp, data_dir, "mixture", 2)}


def group(movie_ids):
    return {(int(m) - 1) // 20 for m in movie_ids}


def test_two_tastes_find_the_two_groups_of_a_both_groups_user(runs):
    mixture = Recommender.load(runs["mixture"])
    split = both_recommended = 0
    for user in range(121, 161):
        tastes = mixture.tastes(user, n=5)
        groups = [group(m["movie_id"] for m in taste["top_movies"]) for taste in tastes]
        # Each taste's top 5 movies lie in one group, and the two tastes in different groups.
        split += len(groups[0]) == len(groups[1]) == 1 and groups[0] != groups[1]
        both_recommended += group(mixture.recommend(user, n=6)["movie_id"]) == {0, 1}
    # Measured: 29 to 32 of the 40 such users split with seeds 0 to 2 (with K=1 there is one
    # taste, in one group, by construction).
    assert split >= 20, split
    assert both_recommended >= 20, both_recommended
    for user in (1, 61):  # a one-group user's recommendations stay in the group
        assert group(mixture.recommend(user, n=3)["movie_id"]) == {0 if user == 1 else 1}


def test_recommendations_exclude_rated_movies_and_carry_titles_and_tastes(runs):
    run = Recommender.load(runs["mixture"])
    frame = run.recommend(121, n=10)
    rated = set(run.item_ids[run.rated(run.user_row(121))])
    assert len(frame) == 10 and not rated & set(frame["movie_id"])
    assert list(frame.columns) == ["rank", "movie_id", "title", "year", "genres", "score", "taste", "taste_weight"]
    assert frame["score"].is_monotonic_decreasing and set(frame["taste"]) <= {1, 2}
    assert all(0 < w <= 1 for w in frame["taste_weight"])
    assert frame["title"].str.match(r"(Alpha|Beta|Café) \d+ \(\d{4}\)").all()
    everyone = run.recommend_all(n=5)
    assert len(everyone) == 5 * 160
    mine = everyone[everyone["user_id"] == 121]["movie_id"].tolist()
    assert mine == frame["movie_id"].tolist()[:5]


def test_similar_movies_stay_in_their_group(runs):
    frame = Recommender.load(runs["mixture"]).similar(5, n=5)
    assert 5 not in set(frame["movie_id"]) and group(frame["movie_id"]) == {0}
    assert frame["cosine"].is_monotonic_decreasing


def test_a_finished_run_leaves_its_pictures_and_projector(runs):
    results = runs["tmp"] / "results" / "mixture"
    for name in ("taste_weights.svg", "item_map.svg"):
        assert "<svg" in (results / name).read_text()
    assert (runs["mixture"] / "projector_config.pbtxt").is_file()
    assert "Café 1 (1990)" in json.loads((runs["mixture"] / "movies.json").read_text(encoding="utf-8"))[0]["title"]


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
    assert [r["movie_id"] for r in records] == expected["movie_id"].tolist()
    assert [r["score"] for r in records] == expected["score"].tolist()
    tastes = json.loads(cli(runs["mixture"], "--user=121", "--tastes", "--json").stdout)
    assert [t["taste"] for t in tastes] == [1, 2] and abs(sum(t["share"] for t in tastes) - 1) < 1e-2
    similar = cli(runs["mixture"], "--similar=21", "--n=3")
    assert similar.returncode == 0 and "Beta" in similar.stdout and "cosine" in similar.stdout
    plot = tmp_path / "user.svg"
    drawn = cli(runs["mixture"], "--user=121", f"--plot={plot}")
    assert drawn.returncode == 0 and "taste 2" in plot.read_text()


@pytest.mark.parametrize("args,message", [
    (["--user=999"], "unknown user id 999: this run's 160 users have ids 1 to 160"),
    (["--similar=77"], "unknown movie id 77: this run's 40 movies have ids 1 to 40"),
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
    assert not (run_dir / "movies.json").exists()
    done = cli(run_dir, "--user=1", "--n=3")
    assert done.returncode == 0 and "named by id" in done.stderr
    assert Recommender.load(run_dir).recommend(1, n=3)["title"].str.fullmatch(r"\d+").all()


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
