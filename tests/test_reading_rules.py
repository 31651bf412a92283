"""The reading rules that awkward files broke (issue 45): each file is built here, and each test
failed before its rule was fixed."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import formats
import loader
from conftest import ROOT


def write(path, text, encoding="utf-8", newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def grid(n_users=12, n_items=9, per_user=5, seed=0):
    """(users, items, ratings) of distinct pairs, ids from 1."""
    rng = np.random.default_rng(seed)
    rows = [(u, i, int(rng.integers(1, 6))) for u in range(1, n_users + 1)
            for i in rng.choice(np.arange(1, n_items + 1), per_user, replace=False)]
    return rows


def test_a_pre_split_folder_with_one_non_integer_id_keeps_every_row(tmp_path):
    rows = grid(n_users=30, n_items=25, per_user=8)
    train, test = rows[::2], rows[1::2]
    write(tmp_path / "d" / "train.csv", "user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in train))
    write(tmp_path / "d" / "test.csv", "user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in test)
          + "guest,5,3\n")
    found = loader.load(str(tmp_path / "d"))
    known_test = [(u, i) for u, i, _ in test if u in {t[0] for t in train} and i in {t[1] for t in train}]
    assert (found.part == 2).sum() == len(known_test)  # only the guest's row is dropped
    assert (found.part == 0).sum() == len(train)
    assert list(found.user_ids) == sorted(found.user_ids)  # positions() binary-searches them
    got = {(found.user_ids[u], found.item_ids[i], p) for u, i, p in zip(found.users, found.items, found.part)}
    assert {(str(u), str(i), 2) for u, i in known_test} <= got
    assert loader.positions(found.user_ids, "10")[1][0]  # user 10 is found, as recommend.py looks it up


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_sub_second_times_are_whole_seconds(tmp_path, kind):
    rows = grid()
    if kind == "csv":
        path = write(tmp_path / "r.csv", "user,item,rating,time\n" + "".join(
            f"{u},{i},{r},2020-01-01T10:00:{k % 60:02d}.250\n" for k, (u, i, r) in enumerate(rows)))
    else:
        path = tmp_path / "r.parquet"
        times = np.datetime64("2020-01-01T10:00:00.250") + np.arange(len(rows)) * np.timedelta64(1, "s")
        pq.write_table(pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                                 "time": pa.array(times.astype("datetime64[ms]"))}), path)
    found = loader.load(str(path))
    start = int(np.datetime64("2020-01-01T10:00:00", "s").astype(np.int64))
    np.testing.assert_array_equal(found.timestamps, start + np.arange(len(rows)) % (60 if kind == "csv" else 10**9))


def test_spaces_around_ids_are_not_part_of_them(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,rating\n1, 10, 4\n2,10,3\n2, 11 ,5\n3,12,2\n")
    found = loader.load(str(path))
    assert found.item_ids.tolist() == [10, 11, 12] and found.user_ids.tolist() == [1, 2, 3]
    strings = write(tmp_path / "s" / "r.csv", "user,item\n a ,x\nb, x\nb,y \n")
    assert loader.load(str(strings)).item_ids.tolist() == ["x", "y"]


def test_a_headerless_file_of_users_items_and_dates_is_rows_not_one_line_per_user(tmp_path):
    path = write(tmp_path / "r.csv", "".join(f"u{k},i{k % 7},2020-01-{k % 28 + 1:02d}\n" for k in range(40)))
    found = loader.load(str(path))
    assert found.n_items == 7 and len(found) == 40 and found.has_ratings is False
    assert found.timestamps[0] == int(np.datetime64("2020-01-01", "s").astype(np.int64))


@pytest.mark.parametrize("header", [True, False])
def test_semicolons_with_decimal_commas_are_read_as_numbers(tmp_path, header):
    body = "1;10;4,5\n1;11;3,0\n2;10;2,5\n2;12;4\n3;11;1,5\n"
    path = write(tmp_path / "r.csv", ("user;item;rating\n" if header else "") + body)
    found = loader.load(str(path))
    assert found.item_ids.tolist() == [10, 11, 12]
    np.testing.assert_allclose(found.ratings, [4.5, 3.0, 2.5, 4.0, 1.5])


def test_a_file_replaced_with_its_size_and_mtime_kept_is_read_again(tmp_path):
    path = write(tmp_path / "r.csv", "user,item\n1,2\n1,3\n2,2\n")
    assert loader.load(str(path)).user_ids.tolist() == [1, 2]
    stat = path.stat()
    write(path, "user,item\n5,2\n5,3\n6,2\n")  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p, rsync -a and tar leave it
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert loader.load(str(path)).user_ids.tolist() == [5, 6]


def test_the_file_stamp_sees_a_change_in_the_content_alone(tmp_path):
    one = write(tmp_path / "a" / "r.csv", "user,item\n1,2\n" * 40000)
    other = write(tmp_path / "b" / "r.csv", "user,item\n1,2\n" * 39999 + "user,item\n9,2\n")
    assert one.stat().st_size == other.stat().st_size
    assert loader.file_stamp(one)[-1] != loader.file_stamp(other)[-1]  # the hash of the tail


def test_whitespace_separated_crlf_lines_with_trailing_spaces_read(tmp_path):
    rows = grid()
    path = write(tmp_path / "r.txt", "".join(f"{u} {i} {r} \n" for u, i, r in rows), newline="\r\n")
    found = loader.load(str(path))
    assert len(found) == len(rows) and found.ratings.tolist() == [float(r) for _, _, r in rows]


@pytest.mark.parametrize("per_user", [True, False])
def test_bytes_that_are_not_utf8_keep_distinct_ids_apart(tmp_path, per_user):
    text = ("caf\xe9 1 2 3\ncaf\xe8 2 3 4 5\nbar 1 4 5\n" if per_user
            else "user,item\n" + "".join(f"u{k},caf\xe9\nu{k},caf\xe8\n" for k in range(4)) + "u9,bar\n")
    found = loader.load(str(write(tmp_path / ("r.txt" if per_user else "r.csv"), text, encoding="latin-1")))
    ids = (found.user_ids if per_user else found.item_ids).tolist()
    assert "café" in ids and "cafè" in ids and len(ids) == 3
    assert "Latin-1" in found.described[0]


def test_non_utf8_bytes_past_the_sampled_head_are_read_the_same_way(tmp_path):
    head = "user,item\n" + "u1,plain\n" * 9000  # past the 64 KB sniffed
    found = loader.load(str(write(tmp_path / "r.csv", head + "u2,caf\xe9\nu3,cafe\n", encoding="latin-1")))
    assert sorted(found.item_ids.tolist()) == ["cafe", "café", "plain"]


def test_numeric_header_names_win_over_positions(tmp_path):
    rows = grid(n_users=20, n_items=30)
    path = write(tmp_path / "dump.csv", ",0,1,2\n" + "".join(f"{k},{u},{i},{r}\n" for k, (u, i, r) in enumerate(rows)))
    found = loader.load(str(path), columns="0,1,2")
    assert found.user_ids.tolist() == sorted({u for u, _, _ in rows})
    assert found.ratings.tolist() == [float(r) for _, _, r in rows]
    assert "the header's name '0', not a position" in found.described[0]
    with pytest.raises(loader.DataError, match=r"perhaps --columns=0,1\b"):
        loader.load(str(path))


def shop_log(path, item_column="product_sku", user_column="customer"):
    rng = np.random.default_rng(0)
    lines = [f"event_time,event_type,{item_column},price,{user_column},session"]
    for k in range(600):
        lines.append(f"12/{rng.integers(1, 28):02d}/1997 15:{rng.integers(0, 60):02d},"
                     f"{('view', 'cart', 'purchase')[rng.integers(3)]},SKU-{rng.integers(1, 60):05d},"
                     f"{rng.random() * 100:.2f},C{rng.integers(1, 80)},S{k // 3}")
    return write(path, "\n".join(lines) + "\n")


def test_common_spellings_of_customers_and_products_are_recognised(tmp_path):
    for user, item in [("customer", "product_sku"), ("client", "article_id"), ("account", "sku"),
                       ("customer_id", "product")]:
        found = loader.load(str(shop_log(tmp_path / user / "log.csv", item, user)))
        assert str(found.item_ids[0]).startswith("SKU-") and str(found.user_ids[0]).startswith("C")
        assert found.timestamps is not None  # event_time


def test_the_columns_hint_suggests_a_command_that_works(tmp_path):
    path = shop_log(tmp_path / "log.csv", "thing", "who")
    with pytest.raises(loader.DataError, match="perhaps --columns=") as raised:
        loader.load(str(path))
    suggested = str(raised.value).split("perhaps --columns=")[1].split()[0]
    assert suggested.split(",")[3:] == ["event_time"] and "event_type" not in suggested and "price" not in suggested
    found = loader.load(str(path), columns=suggested)
    assert {found.n_users, found.n_items} == {len(set(found.user_ids)), len(set(found.item_ids))}
    assert sorted(str(v)[:2] for v in (found.user_ids[0], found.item_ids[0])) == ["C1", "SK"]


def test_the_separator_is_the_one_that_splits_every_line_most(tmp_path):
    # A tab file whose titles hold one comma each still splits on tabs (more fields, same count).
    path = write(tmp_path / "r.tsv", "".join(f"{u}\t{i}\t{r}\tA, B\n" for u, i, r in grid()))
    layout = formats.sniff(path)
    assert layout.sep == "\t" and layout.n_fields == 4


def test_a_resumed_checkpoint_with_a_foreign_object_runs_nothing(tmp_path):
    import torch

    from conftest import mixture_ratings, write_ratings
    data = write_ratings(tmp_path / "r.dat", *mixture_ratings(n_ratings=1500))
    base = [sys.executable, str(ROOT / "train.py"), f"--dataset={data}", "--epochs=1", "--progress=False",
            "--run_name=shared", "--runs_dir=runs", "--results_dir=results"]
    assert subprocess.run(base, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    (checkpoint,) = (tmp_path / "runs" / "shared").glob("last_checkpoint_*.pt")
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "ran"
    state["history"]["extra"] = _Runs(f"touch {marker}")
    torch.save(state, checkpoint)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume=runs/shared", "--epochs=2",
                           "--progress=False"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nothing in it ran" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not marker.exists()


class _Runs:
    """A pickled object that runs a shell command when it is loaded."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_an_items_file_with_one_non_integer_id_leaves_the_runs_ids_integers(tmp_path):
    from conftest import mixture_ratings, write_ratings
    users, items, ratings = mixture_ratings(n_ratings=1500)
    data = write_ratings(tmp_path / "r.dat", users, items, ratings)
    names = write(tmp_path / "items.csv", "item_id,title\n" + "".join(f"{i},Item {i}\n" for i in sorted(set(items)))
                  + "extra-7,Not in the data\n")
    train = [sys.executable, str(ROOT / "train.py"), f"--dataset={data}", f"--items={names}", "--epochs=1",
             "--progress=False", "--run_name=named", "--runs_dir=runs", "--results_dir=results"]
    assert subprocess.run(train, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    done = subprocess.run([sys.executable, str(ROOT / "recommend.py"), "runs/named", f"--user={users[0]}",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert answers and all(isinstance(a["item_id"], int) for a in answers)
    assert all(a["title"] == f"Item {a['item_id']}" for a in answers)


def test_skip_bad_lines_drops_counts_and_names_the_lines_that_do_not_read(tmp_path):
    good = [f"{u},{i},{r},{1000 + k}" for k, (u, i, r) in enumerate(grid())]
    lines = ["user,item,rating,time", *good[:10], "1,2", "", "2,3,4,5,6", "3,3,x,7", ",4,4,8", "4,4,4,soon",
             *good[10:]]
    path = write(tmp_path / "r.csv", "\n".join(lines) + "\n")
    with pytest.raises(loader.DataError, match=r"line 12: expected 4 fields.*--skip_bad_lines"):
        loader.load(str(path))
    found = loader.load(str(path), skip_bad_lines=True)
    assert len(found) == len(good) and found.timestamps.tolist() == list(range(1000, 1000 + len(good)))
    said = found.described[-1]
    assert said.startswith("5 line(s) that could not be read were dropped")
    assert [int(n) for n in __import__("re").findall(r"line (\d+):", said)] == [12, 14, 15, 16, 17]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--dataset={path}", "--epochs=1",
                           "--skip_bad_lines=True", "--progress=False"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "5 line(s) that could not be read were dropped" in done.stdout
