"""Time-ordered splits (--split=time, --split=last) for both tasks, and the split every run
folder leaves (split.parquet), on small files written here."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import loader
from conftest import ROOT


def timed_file(path, n=3000, n_users=80, n_items=60, seed=0, header="user,item,rating,time"):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(1, n_users + 1, n), rng.integers(1, n_items + 1, n)
    times = rng.permutation(n) * 10  # file order is not time order
    lines = [header] + [f"u{u},i{i},{1 + (u * i) % 5},{t}" for u, i, t in zip(users, items, times)]
    path.write_text("\n".join(lines) + "\n")
    return path


def train(tmp_path, *args):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--epochs=1", "--progress=False",
                           "--runs_dir=runs", "--results_dir=results", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return done


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_global_time_cut_puts_the_latest_interactions_in_test(tmp_path, task):
    data = timed_file(tmp_path / "log.csv")
    done = train(tmp_path, f"--dataset={data}", f"--task={task}", "--split=time", "--run_name=t")
    assert done.returncode == 0, done.stderr
    split = pd.read_parquet(tmp_path / "runs" / "t" / "split.parquet")
    assert list(split.columns) == ["user_id", "item_id", "timestamp", "part"]
    latest = split.groupby("part", observed=True)["timestamp"].agg(["min", "max"])
    assert latest.loc["train", "max"] < latest.loc["valid", "min"] <= latest.loc["valid", "max"] < latest.loc["test", "min"]
    fraction = 0.25 if task == "rating" else 0.1
    assert abs((split["part"] == "test").mean() - fraction) < 0.03


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_leave_one_out_by_time_tests_each_users_latest_interaction(tmp_path, task):
    data = timed_file(tmp_path / "log.csv")
    done = train(tmp_path, f"--dataset={data}", f"--task={task}", "--split=last", "--run_name=l")
    assert done.returncode == 0, done.stderr
    split = pd.read_parquet(tmp_path / "runs" / "l" / "split.parquet").sort_values("timestamp", kind="stable")
    last_two = split.groupby("user_id").tail(2)
    assert (last_two.groupby("user_id")["part"].apply(list) == pd.Series([["valid", "test"]] * split["user_id"].nunique(),
                                                                         index=sorted(split["user_id"].unique()))).all()
    assert (split.groupby("user_id")["part"].apply(lambda p: (p == "test").sum()) == 1).all()


def test_one_line_per_user_files_split_by_their_line_order(tmp_path):
    lines = [f"u{u} " + " ".join(f"i{(u * 7 + k) % 50}" for k in range(6 + u % 4)) for u in range(60)]
    data = tmp_path / "seq.txt"
    data.write_text("\n".join(lines) + "\n")
    ratings = loader.load(str(data))
    found = loader.split_per_user(ratings, np.arange(len(ratings)), (0.8, 0.1, 0.1), how="last")
    for u in range(60):
        mine = found.part[found.users == np.searchsorted(found.user_ids, f"u{u}")]
        assert mine[-1] == 2 and mine[-2] == 1 and (mine[:-2] == 0).all()  # the line's last item is the test


def test_late_users_and_new_items_are_dropped_from_validation_and_test_and_counted(tmp_path):
    rows = ["user,item,time"] + [f"u{k % 20},i{k % 15},{k}" for k in range(400)]
    rows += [f"late,i{k},{1000 + k}" for k in range(5)] + ["u1,brand-new,2000"]
    data = tmp_path / "log.csv"
    data.write_text("\n".join(rows) + "\n")
    ratings = loader.load(str(data))
    found = loader.split_per_user(ratings, np.arange(len(ratings)), (0.8, 0.1, 0.1), how="time")
    assert "late" not in set(found.user_ids) and "brand-new" not in set(found.item_ids)
    assert "validation and test interactions dropped" in found.described[0]


def test_time_splits_need_times_and_refuse_pre_split_folders(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("user,item\n" + "".join(f"u{k % 9},i{k % 7}\n" for k in range(100)))
    done = train(tmp_path, f"--dataset={plain}", "--task=ranking", "--split=time")
    assert done.returncode == 2 and "no time column" in done.stderr and "Traceback" not in done.stderr
    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / f"{name}.csv").write_text("user,item\n" + "".join(f"u{k % 9},i{k % 7}\n" for k in range(60)))
    done = train(tmp_path, f"--dataset={folder}", "--task=ranking", "--split=last")
    assert done.returncode == 2 and "pre-split dataset is used as given" in done.stderr
    done = train(tmp_path, f"--dataset={plain}", "--split=later")
    assert done.returncode == 2 and "--split=later is not one of random, time, last" in done.stderr


def test_a_random_split_is_written_too_and_reads_back_as_the_run_split_it(tmp_path):
    data = timed_file(tmp_path / "log.csv")
    done = train(tmp_path, f"--dataset={data}", "--run_name=r")
    assert done.returncode == 0, done.stderr
    split = pd.read_parquet(tmp_path / "runs" / "r" / "split.parquet")
    import json
    summary = json.loads((tmp_path / "results" / "r" / "summary.json").read_text())
    assert (split["part"] == "train").sum() == summary["n_train"] and (split["part"] == "test").sum() == summary["n_test"]


def test_the_benchmarks_peers_take_the_same_time_split_as_train_py(tmp_path):
    from bench import peers
    data = timed_file(tmp_path / "log.csv")
    ours = peers.ranking_task(str(data), "", "", split="last")
    users_of_three = (np.bincount(ours.split[0]) >= 3).sum()
    assert ours.counts["n_test"] == ours.counts["n_val"] == users_of_three
    assert peers.ranking_task(str(data), "", "").counts["n_test"] != users_of_three  # random: 10% per user
    shown = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--help"], capture_output=True, text=True,
                           timeout=300).stdout
    assert "--split {random,time,last}" in shown
