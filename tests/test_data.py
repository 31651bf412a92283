"""Your own data: every format, header spelling, id kind, duplicates, pre-split folders, the
small-user split and each bad file, on small files the tests write themselves."""

import bz2
import gzip
import json
import lzma
import zipfile

import numpy as np
import pytest

import formats
import loader
from conftest import SHARED_DATA, mixture_ratings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def rows(n_users=30, n_items=20, n=300, seed=0):
    """(users, items, ratings, times) of n distinct (user, item) pairs, raw ids sparse."""
    users, items, ratings = mixture_ratings(n_users=n_users, n_items=n_items, n_ratings=n, seed=seed)
    return users, items, ratings, 978300000 + 17 * np.arange(n)


def write_text(path, lines, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt") as out:
        out.write("\n".join(lines) + "\n")
    return path


def delimited(sep, header=None, quote=False):
    users, items, ratings, times = rows()
    cell = (lambda v: f'"{v}"') if quote else str
    lines = [sep.join(header)] if header else []
    lines += [sep.join(cell(v) for v in (u, i, f"{r:g}", t)) for u, i, r, t in zip(users, items, ratings, times)]
    return lines


def same_rows(found, users, items, ratings=None):
    """found (loader.Ratings) holds exactly these raw rows, in file order."""
    assert found.user_ids[found.users].tolist() == list(users)
    assert found.item_ids[found.items].tolist() == list(items)
    if ratings is not None:
        np.testing.assert_allclose(found.ratings, ratings)


# ----------------------------------------------------------------------------- formats

@pytest.mark.parametrize("sep,header", [
    (",", ["userId", "movieId", "rating", "timestamp"]),
    ("\t", ["user_id", "item_id", "rating", "timestamp"]),
    ("::", None),
    ("|", ["customer_id", "product_id", "stars", "unixReviewTime"]),
    (";", ["reviewerID", "asin", "overall", "time"]),
    ("   ", None),  # runs of whitespace
    (",", ["USER", "ITEM", "Score", "TS"]),
])
def test_delimited_rows_with_or_without_a_header_read_the_same(tmp_path, sep, header):
    users, items, ratings, times = rows()
    found = loader.load(str(write_text(tmp_path / "ratings.txt", delimited(sep, header))))
    same_rows(found, users, items, ratings)
    assert found.timestamps.tolist() == times.tolist() and found.has_ratings


def test_quoted_fields_and_a_byte_order_mark_are_read(tmp_path):
    users, items, ratings, _ = rows()
    lines = delimited(",", ["userId", "movieId", "rating", "timestamp"], quote=True)
    lines[0] = "\ufeff" + lines[0]
    same_rows(loader.load(str(write_text(tmp_path / "r.csv", lines))), users, items, ratings)


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_files_read_as_the_plain_one(tmp_path, suffix, opener):
    users, items, ratings, _ = rows()
    path = write_text(tmp_path / f"ratings.csv{suffix}", delimited(",", ["user", "item", "rating", "ts"]), opener)
    same_rows(loader.load(str(path)), users, items, ratings)


def test_zstandard_and_zip_read_as_the_plain_one(tmp_path):
    import pyarrow as pa
    users, items, ratings, _ = rows()
    text = ("\n".join(delimited("::")) + "\n").encode()
    with pa.output_stream(str(tmp_path / "ratings.dat.zst"), compression="zstd") as out:
        out.write(text)
    same_rows(loader.load(str(tmp_path / "ratings.dat.zst")), users, items, ratings)
    with zipfile.ZipFile(tmp_path / "ratings.zip", "w") as zipped:
        zipped.writestr("inside/ratings.dat", text)
    same_rows(loader.load(str(tmp_path / "ratings.zip")), users, items, ratings)


def test_parquet_is_read_by_its_column_names(tmp_path):
    import pandas as pd
    users, items, ratings, times = rows()
    pd.DataFrame({"extra": 1, "itemId": items, "userId": users, "rating": ratings,
                  "timestamp": pd.to_datetime(times, unit="s")}).to_parquet(tmp_path / "r.parquet")
    found = loader.load(str(tmp_path / "r.parquet"))
    same_rows(found, users, items, ratings)
    assert found.timestamps.tolist() == times.tolist()


def test_amazons_json_lines_reviews_are_read_by_their_field_names(tmp_path):
    users, items, ratings, times = rows()
    reviews = [json.dumps({"reviewerID": f"A{u}", "asin": f"B00{i}", "overall": float(r), "unixReviewTime": int(t),
                           "reviewText": "fine"}) for u, i, r, t in zip(users, items, ratings, times)]
    found = loader.load(str(write_text(tmp_path / "Video_Games_5.json.gz", reviews, gzip.open)))
    same_rows(found, [f"A{u}" for u in users], [f"B00{i}" for i in items], ratings)
    assert found.timestamps.tolist() == times.tolist() and "JSON lines" in found.described[0]


def test_recbole_atomic_files_are_read_by_their_typed_header(tmp_path):
    users, items, ratings, times = rows()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in zip(users, items, ratings, times)]
    found = loader.load(str(write_text(tmp_path / "ml.inter", lines)))
    same_rows(found, users, items, ratings)
    assert "RecBole" in found.described[0]


def test_one_line_per_user_keeps_each_users_order_and_has_no_ratings(tmp_path):
    lines = ["1 1 2 3 4 5", "2 6 7 8 9 10 4 11", "u3 4 12 13 14"]
    found = loader.load(str(write_text(tmp_path / "Beauty.txt", lines)))
    assert not found.has_ratings and "one line per user" in found.described[0]
    assert found.user_ids.dtype.kind == "U"  # "u3" makes every user id a string
    assert found.user_ids[found.users].tolist() == ["1"] * 5 + ["2"] * 7 + ["u3"] * 4
    assert found.item_ids[found.items].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 4, 11, 4, 12, 13, 14]
    assert found.timestamps.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]


def test_a_folder_with_one_data_file_beside_its_readme_is_that_file(tmp_path):
    users, items, ratings, _ = rows()
    write_text(tmp_path / "set" / "interactions.csv", delimited(",", ["user", "item", "rating", "time"]))
    write_text(tmp_path / "set" / "SOURCE.txt", ["where the data came from"])
    write_text(tmp_path / "set" / "movies.csv", ["item,title", "5,A"])
    same_rows(loader.load(str(tmp_path / "set")), users, items, ratings)


# ----------------------------------------------------------------------------- columns and ids

def test_unknown_header_names_say_which_columns_exist_and_columns_names_them(tmp_path):
    users, items, ratings, times = rows()
    path = write_text(tmp_path / "log.csv", [f"who,what,when,{'x'}"] +
                      [f"v{u},p{i},{t},0" for u, i, t in zip(users, items, times)])
    with pytest.raises(loader.DataError) as error:
        loader.load(str(path))
    assert "its columns are who, what, when, x" in str(error.value) and "--columns=who,what" in str(error.value)
    found = loader.load(str(path), columns="who,what,,when")
    assert not found.has_ratings and found.timestamps.tolist() == times.tolist()
    assert found.user_ids[found.users].tolist() == [f"v{u}" for u in users]
    by_position = loader.load(str(path), columns="0,1,,2")
    assert by_position.item_ids[by_position.items].tolist() == [f"p{i}" for i in items]
    with pytest.raises(loader.DataError, match="has no column 'buyer'; its columns are who, what"):
        loader.load(str(path), columns="buyer,what")


def test_ids_keep_their_own_spelling(tmp_path):
    path = write_text(tmp_path / "r.csv", ["user,item,rating", "007,a,1", "7,a,2", "7,b,3", "u-1,b,4"])
    found = loader.load(str(path))
    assert sorted(found.user_ids.tolist()) == ["007", "7", "u-1"]  # "007" is not 7
    plain = loader.load(str(write_text(tmp_path / "p.csv", ["user,item,rating", "12,3,1", "-4,3,2", "12,5,3"])))
    assert plain.user_ids.dtype == np.int64 and plain.user_ids.tolist() == [-4, 12]


def test_a_headerless_third_column_of_unix_times_is_a_timestamp(tmp_path):
    users, items, _, times = rows()
    found = loader.load(str(write_text(tmp_path / "clicks.tsv", [f"{u}\t{i}\t{t}" for u, i, t in zip(users, items, times)])))
    assert not found.has_ratings and found.timestamps.tolist() == times.tolist()


def test_datetimes_become_seconds(tmp_path):
    path = write_text(tmp_path / "r.csv", ["user,item,rating,date", "1,2,5,2001-09-09 01:46:40", "2,3,4,2001-09-09"])
    assert loader.load(str(path)).timestamps.tolist() == [1_000_000_000, 999_993_600]


def test_duplicates_keep_the_latest_by_time_and_are_counted(tmp_path):
    path = write_text(tmp_path / "r.csv", ["user,item,rating,time", "1,2,5,300", "1,2,1,100", "1,3,4,50",
                                           "2,2,2,10", "1,2,3,200", "2,2,4,10"])
    found = loader.load(str(path))
    assert [(found.user_ids[u], found.item_ids[i], r) for u, i, r in zip(found.users, found.items, found.ratings)] \
        == [(1, 2, 5.0), (1, 3, 4.0), (2, 2, 4.0)]  # the latest by time; a tie: the last in the file
    assert any("3 duplicate (user, item) rows merged" in line for line in found.described)


@pytest.mark.parametrize("scale", [(0.5, 5.0), (1.0, 10.0), (0.0, 1.0)])
def test_other_rating_scales_train_within_their_range(tmp_path, scale):
    import train
    users, items, _, _ = rows(n=600, seed=3)
    ratings = np.round(np.random.default_rng(0).uniform(*scale, len(users)) * 2) / 2
    path = write_text(tmp_path / "r.csv", ["user,item,rating"] + [f"{u},{i},{r:g}" for u, i, r in zip(users, items, ratings)])
    assert train.main([f"--dataset={path}", "--epochs=2", "--dim=4", "--progress=False", "--run_name=s",
                       f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}"]) == 0
    arrays = np.load(tmp_path / "runs" / "s" / "dataset.npz")
    low, high = arrays["rating_range"]
    assert scale[0] <= low and high <= scale[1]
    summary = json.loads((tmp_path / "results" / "s" / "summary.json").read_text())
    assert summary["test_mse"] < np.var(ratings) * 1.5


# ----------------------------------------------------------------------------- pre-split and ranking

def test_a_pre_split_folder_is_used_as_given_for_both_tasks(tmp_path):
    import tasks
    import train
    users, items, ratings, _ = rows(n=400)
    lines = [f"{u}\t{i}\t{r:g}" for u, i, r in zip(users, items, ratings)]
    write_text(tmp_path / "set" / "data.train.inter", ["user_id:token\titem_id:token\trating:float"] + lines[:300])
    write_text(tmp_path / "set" / "data.valid.inter", ["user_id:token\titem_id:token\trating:float"] + lines[300:350])
    test_lines = lines[350:] + ["999\t5\t3", "7\t99999\t4"]  # a user and an item never in training
    write_text(tmp_path / "set" / "data.test.inter", ["user_id:token\titem_id:token\trating:float"] + test_lines)
    found = loader.load(str(tmp_path / "set"))
    assert np.bincount(found.part).tolist() == [300, 50, 50]
    assert any("2 of the 52 test rows dropped" in line for line in found.described)
    train_rows, val_rows, test_rows = loader.rating_split(found)
    assert (len(train_rows), len(val_rows), len(test_rows)) == (300, 50, 50)
    cfg = train.resolve_config(["--task=ranking", f"--dataset={tmp_path / 'set'}"])
    data = tasks.ranking_interactions(cfg, found)
    assert np.bincount(data.part).tolist() == [300, 50, 50]  # every row a positive: no filter, no split of ours
    with pytest.raises(loader.DataError, match="used as given"):
        tasks.ranking_interactions({**cfg, "ranking_core": 5}, found)


def test_without_a_valid_file_validation_comes_from_training(tmp_path):
    users, items, ratings, _ = rows(n=400)
    lines = [f"{u},{i},{r:g}" for u, i, r in zip(users, items, ratings)]
    write_text(tmp_path / "set" / "train.csv", ["user,item,rating"] + lines[:320])
    write_text(tmp_path / "set" / "test.csv", ["user,item,rating"] + lines[320:])
    found = loader.load(str(tmp_path / "set"))
    train_rows, val_rows, test_rows = loader.rating_split(found, val_fraction=0.1)
    assert len(test_rows) == 80 and len(train_rows) + len(val_rows) == 320 and 10 < len(val_rows) < 60
    assert set(val_rows) < set(np.flatnonzero(found.part == 0))


def test_small_users_split_as_recbole_splits_them():
    n_val, n_test = loader.per_user_counts(np.array([1, 2, 3, 5, 9, 10, 19, 20]), (0.1, 0.1))
    assert n_val.tolist() == [0, 0, 1, 1, 1, 1, 1, 2] and n_test.tolist() == n_val.tolist()


def test_a_ranking_file_keeps_small_users_in_training_and_says_what_it_kept(tmp_path):
    import train
    lines = [f"u{u} " + " ".join(f"i{(u * 7 + k) % 40}" for k in range(2 + u % 9)) for u in range(60)]
    path = write_text(tmp_path / "lists.txt", lines)
    cfg = train.resolve_config(["--task=ranking", f"--dataset={path}"])
    assert cfg["ranking_core"] == 1 and cfg["ranking_min_rating"] == float("-inf")  # a file's defaults
    import tasks
    data = tasks.ranking_interactions(cfg, loader.load(str(path)))
    counts = np.bincount(data.users)
    held = np.bincount(data.users[data.part > 0], minlength=data.n_users)
    assert (held[counts < 3] == 0).all() and (held[counts >= 3] == 2).all()
    assert any("users (fewer than 3 interactions) in training only" in line for line in data.described)


def test_ranking_data_too_small_to_hold_out_anything_is_one_line(tmp_path):
    import tasks
    import train
    path = write_text(tmp_path / "pairs.txt", [f"u{u} i{u % 5} i{(u + 1) % 5}" for u in range(20)])
    cfg = train.resolve_config(["--task=ranking", f"--dataset={path}"])
    with pytest.raises(loader.DataError, match="no user has the 3 interactions"):
        tasks.ranking_interactions(cfg, loader.load(str(path)))


def test_the_rating_task_refuses_data_without_ratings(tmp_path):
    import train
    path = write_text(tmp_path / "clicks.txt", ["1 2 3 4", "2 3 4 5 6", "3 1 5"])
    assert train.main([f"--dataset={path}", f"--runs_dir={tmp_path / 'runs'}", "--progress=False"]) == 2
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "the file is empty"),
    ("blank.csv", "\n\n", "the file is empty"),
    ("ragged.csv", "user,item,rating\n1,2,3\n1,3,4\n2,2,5,9\n3,3,1\n", "ragged.csv, line 4: expected 3 fields"),
    ("text.csv", "user,item,rating\n1,2,3\n1,3,four\n", "text.csv, line 3: the rating is not a finite number"),
    ("time.csv", "user,item,rating,time\n1,2,3,5\n1,3,4,soon\n", "time.csv, line 3: the timestamp is neither"),
    ("noid.csv", "user,item,rating\n1,2,3\n,3,4\n", "noid.csv, line 3: the user id is empty"),
    ("one.csv", "user,item,rating\n1,2,3\n1,3,4\n", "1 user(s) and 2 item(s)"),
    ("oneitem.csv", "user,item,rating\n1,2,3\n2,2,4\n", "2 user(s) and 1 item(s)"),
    ("binary.dat", "\x00\x01\x02PK", "not a format this tool reads"),
    ("nosep.txt", "abc\ndef\n", "finds no separator"),
])
def test_a_bad_file_is_one_line_naming_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(loader.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loader.load(str(path))
    assert not list(tmp_path.glob(".*.npz")), "no cache of a file that did not read"


def test_a_missing_path_and_a_damaged_archive_are_one_line(tmp_path):
    with pytest.raises(loader.DataError, match="neither a MovieLens name .* nor a file or folder"):
        loader.load(str(tmp_path / "nowhere.csv"))
    (tmp_path / "r.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(loader.DataError, match="damaged"):
        loader.load(str(tmp_path / "r.csv.gz"))
    (tmp_path / "two").mkdir()
    write_text(tmp_path / "two" / "a.csv", ["user,item", "1,2"])
    write_text(tmp_path / "two" / "b.csv", ["user,item", "1,2"])
    with pytest.raises(loader.DataError, match="holds several data files"):
        loader.load(str(tmp_path / "two"))


def test_bad_files_from_the_command_line_leave_nothing_behind(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    bad = write_text(tmp_path / "bad.csv", ["user,item,rating", "1,2,3", "1,2", "2,3,4"])
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--dataset={bad}", "--progress=False"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "bad.csv, line 3" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


# ----------------------------------------------------------------------------- the cache

def test_the_cache_is_keyed_by_the_file_and_by_the_columns(tmp_path):
    path = write_text(tmp_path / "r.csv", ["a,b,c", "1,2,3", "1,3,4", "2,2,5"])
    first = loader.load(str(path), columns="a,b,c")
    by_other = loader.load(str(path), columns="b,a,c")   # another reading of the same file
    assert first.user_ids.tolist() == [1, 2] and by_other.user_ids.tolist() == [2, 3]
    assert loader.load(str(path), columns="a,b,c").user_ids.tolist() == [1, 2]
    other = write_text(tmp_path / "copy" / "r.csv", ["a,b,c", "5,6,7", "8,7,8"])
    assert loader.load(str(other), columns="a,b,c").user_ids.tolist() == [5, 8]


# ----------------------------------------------------------------------------- items

def test_an_items_file_names_items_by_the_datas_own_ids(tmp_path):
    path = write_text(tmp_path / "books.csv", ['book_id,title,genres', '1,"Dune, the novel",Sci-Fi|Classic',
                                               '2,Emma,Romance'])
    names = formats.read_item_names(path)
    assert names["item"].tolist() == [1, 2] and names["title"] == ["Dune, the novel", "Emma"]
    assert names["genres"] == [["Sci-Fi", "Classic"], ["Romance"]]
    recbole = write_text(tmp_path / "x.item", ["item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq",
                                               "7\tToy Story\t1995\tAnimation Comedy"])
    found = loader.read_items("x", "", str(recbole))
    assert found == [{"item_id": 7, "title": "Toy Story", "year": 1995, "genres": ["Animation", "Comedy"]}]


@pytest.mark.skipif(not (SHARED_DATA / "amazon-beauty" / "Beauty.txt").is_file(),
                    reason="../shared/data/amazon-beauty is not here (optional benchmark data)")
def test_the_shared_amazon_set_reads_with_its_documented_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    found = loader.load(str(SHARED_DATA / "amazon-beauty"))
    assert (len(found), found.n_users, found.n_items) == (198_502, 22_363, 12_101)


# ----------------------------------------------------------------------------- the whole tool on a file

def test_a_file_with_string_ids_trains_resumes_and_answers_without_the_file(tmp_path):
    """One line per user with string ids, an items file naming them: a ranking run, resumed;
    recommend.py takes and prints the file's own ids and titles after the data file is gone."""
    import subprocess
    import sys

    import train
    from conftest import ROOT
    from recommend import Recommender
    rng = np.random.default_rng(0)
    lines = [f"user{u} " + " ".join(f"sku{i}" for i in rng.choice(30, 6 + u % 5, replace=False)) for u in range(80)]
    data = write_text(tmp_path / "data" / "baskets.txt", lines)
    names = write_text(tmp_path / "names.csv", ["product_id,name,category"] + [f"sku{i},Thing {i},cat{i % 3}" for i in range(30)])
    args = [f"--dataset={data}", f"--items={names}", "--task=ranking", "--epochs=2", "--eval_every=1", "--dim=4",
            "--batch_size=16", "--progress=False", "--lr_decay=0", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}", "--run_name=b"]
    assert train.main(args[:3] + ["--epochs=1"] + args[4:]) == 0
    assert train.main([f"--resume={tmp_path / 'runs' / 'b'}", "--epochs=2"]) == 0
    (tmp_path / "data" / "baskets.txt").unlink()
    run = Recommender.load(tmp_path / "runs" / "b")
    top = run.recommend("user3", n=5)
    assert top["item_id"].str.startswith("sku").all() and top["title"].str.startswith("Thing").all()
    assert not set(top["item_id"]) & set(lines[3].split()[1:])  # none of the user's own items
    assert run.similar("sku4", n=3)["item_id"].str.startswith("sku").all()
    done = subprocess.run([sys.executable, str(ROOT / "recommend.py"), str(tmp_path / "runs" / "b"), "--user=user3",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["item_id"].startswith("sku")
    unknown = subprocess.run([sys.executable, str(ROOT / "recommend.py"), str(tmp_path / "runs" / "b"), "--user=3"],
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "unknown user id '3'" in unknown.stderr and "'user0'" in unknown.stderr


def test_benchmark_and_tune_take_a_file(tmp_path):
    import subprocess
    import sys

    import tune
    from conftest import ROOT
    rng = np.random.default_rng(1)
    lines = [f"{u} " + " ".join(str(i) for i in rng.choice(40, 8, replace=False)) for u in range(100)]
    data = write_text(tmp_path / "lists.txt", lines)
    output = tmp_path / "bench.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--task=ranking", f"--dataset={data}",
                           "--only=pop,ease", f"--output={output}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    assert "## Ranking on `lists.txt`" in report and "| EASE (closed form) | 0." in report
    assert "one line per user" in report and "published by RecBole" not in report
    settings, _, _ = tune.parse([f"--dataset={data}", "--task=ranking"])
    assert settings["study"] == f"tune-{loader.dataset_label(str(data))}-ranking"
    assert settings["study"].startswith("tune-lists-")
