"""Event types and strengths (--event_weights, --weight_column): read with the rows, a pair as
its strongest row, in the ranking loss per positive, and in a history's fold-in."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import formats
import loader
import tasks
import train
from conftest import ROOT


def event_log(path, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 60, n), rng.integers(0, 40, n)
    kinds = rng.choice(["view", "cart", "purchase"], n, p=[0.6, 0.25, 0.15])
    lines = ["customer,sku,event_type,quantity"] + [f"c{u},s{i},{k},{q}" for u, i, k, q in
                                                  zip(users, items, kinds, rng.integers(0, 4, n))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_event_weights_weigh_rows_drop_the_unlisted_and_a_pair_weighs_as_its_strongest_event(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,event\nu1,a,view\nu1,a,purchase\nu1,b,view\nu2,a,cart\nu2,c,return\nu3,b,view\n")
    found = loader.load(str(path), weights=formats.parse_weights("event:view=0.25,cart=0.5,purchase=1"))
    pairs = {(found.user_ids[u], found.item_ids[i]): w for u, i, w in zip(found.users, found.items, found.weights)}
    assert pairs == {("u1", "a"): 1.0, ("u1", "b"): 0.25, ("u2", "a"): 0.5, ("u3", "b"): 0.25}  # the return dropped
    assert any("1 of 6 rows weigh 0" in line for line in found.described)
    strength = tmp_path / "plays.csv"
    strength.write_text("user,artist,plays\nu1,a,3\nu1,b,0\nu2,a,10\nu2,b,1\n")
    played = loader.load(str(strength), weights=formats.parse_weights(weight_column="plays"))
    np.testing.assert_allclose(sorted(played.weights), sorted(np.log1p([3, 10, 1])), rtol=1e-6)


@pytest.mark.parametrize("given,message", [
    (("kind:view=1", ""), "has no column 'kind' to weigh rows by"),
    (("event:buy=1", ""), "has no value 'buy'; it has 'cart', 'view'"),
    (("event:view=-2", ""), "'view=-2' is not VALUE=W"),
    (("event", ""), "give --event_weights=COLUMN:VALUE=W"),
    (("", "event"), "must hold numbers of at least 0"),
    (("event:view=1", "n"), "not both"),
])
def test_bad_weights_are_one_line_that_says_what_the_file_has(tmp_path, given, message):
    path = tmp_path / "log.csv"
    path.write_text("user,item,event,n\nu1,a,view,1\nu2,b,cart,-1\n")
    with pytest.raises(loader.DataError, match=message.replace("(", r"\(")):
        loader.load(str(path), weights=formats.parse_weights(*given))


def weighted_task(task_class, path, *args):
    """A task of train.py's settings args on the file at path, read with its --event_weights; a
    small model for it, and the task's first training batch."""
    cfg = train.resolve_config([f"--dataset={path}", "--dim=4", *args])
    task = task_class(cfg, loader.load(str(path), weights=formats.parse_weights(cfg["event_weights"])), "cpu", 0, 1)
    model = __import__("MFMixTaste").MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2, init_std=0.5)
    return task, model, next(iter(task.batches))


def test_the_ranking_loss_weighs_each_positive(tmp_path):
    path = event_log(tmp_path / "log.csv")
    task, model, batch = weighted_task(tasks.RankingTask, path, "--task=ranking", "--batch_size=16",
                                       "--event_weights=event_type:view=0.2,cart=0.5,purchase=1")
    users, position, items, global_pairs, drawn, weights = batch
    assert drawn is None and len(weights) == len(items)
    assert np.isclose(weights.numpy(), 0.2).any() and np.isclose(weights.numpy(), 1.0).any()
    terms, *_ = task.loss(model, batch)
    log_p = torch.log_softmax(model(users), dim=1)[position, items]
    torch.testing.assert_close(terms["softmax"], -(weights * log_p).sum() / weights.sum())
    assert global_pairs == pytest.approx(float(weights.sum()))  # one process: the batch's own weight


def test_the_rating_loss_weighs_each_rating_and_its_implicit_claim(tmp_path):
    """Rating task: each training row's squared error and its implicit term count by its weight
    (the means by weight); validation and test stay plain MSE over their rows."""
    path = tmp_path / "rated.csv"
    rng = np.random.default_rng(1)
    n = 1500
    path.write_text("user,item,rating,event\n" + "".join(
        f"{u},{i},{r},{k}\n" for u, i, r, k in zip(rng.integers(0, 50, n), rng.integers(0, 30, n), rng.integers(1, 6, n),
                                                  rng.choice(["view", "purchase"], n))))
    task, model, batch = weighted_task(tasks.RatingTask, path, "--batch_size=64", "--implicit_negatives=3",
                                       "--event_weights=event:view=0.25,purchase=1")
    users, items, targets, global_batch, weights, negatives = batch
    assert set(np.round(weights.numpy(), 2)) == {0.25, 1.0} and negatives.shape == (len(users), 3)
    terms, *_ = task.loss(model, batch)
    predictions = model(users, items)
    torch.testing.assert_close(terms["mse"], (weights * (predictions - targets).pow(2)).sum() / weights.sum())
    t = task.implicit_temperature
    unweighted = model(users, items, return_prior=True, negatives=negatives, implicit_temperature=t)[2]
    weighted = model(users, items, return_prior=True, negatives=negatives, implicit_temperature=t, pair_weights=weights)[2]
    torch.testing.assert_close(terms["implicit"], weighted)
    assert not torch.isclose(weighted, unweighted)
    assert len(next(iter(task.eval_batches["test"]))) == 4  # (users, items, ratings, global_batch): no weights


def test_purchases_only_is_the_run_on_the_purchases(tmp_path):
    path = event_log(tmp_path / "log.csv")
    purchases = tmp_path / "purchases.csv"
    lines = path.read_text().splitlines()
    purchases.write_text("\n".join([lines[0]] + [line for line in lines[1:] if ",purchase," in line]) + "\n")
    common = ["--task=ranking", "--epochs=2", "--dim=4", "--progress=False", "--runs_dir=runs", "--results_dir=results"]
    for name, args in (("weighed", [f"--dataset={path}", "--event_weights=event_type:purchase=1"]),
                       ("filtered", [f"--dataset={purchases}"])):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *common, f"--run_name={name}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    read = [json.loads((tmp_path / "results" / name / "summary.json").read_text()) for name in ("weighed", "filtered")]
    assert read[0]["test_ndcg@10"] == pytest.approx(read[1]["test_ndcg@10"], abs=1e-6)
    assert read[0]["n_train"] == read[1]["n_train"]


def test_a_historys_event_weights_reach_its_fold_in(tmp_path):
    path = event_log(tmp_path / "log.csv")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--dataset={path}", "--task=ranking", "--epochs=2",
                           "--dim=4", "--progress=False", "--run_name=r", "--runs_dir=runs", "--results_dir=results",
                           "--event_weights=event_type:view=0.2,cart=0.5,purchase=1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import recommend
    history = recommend.read_history(str(path), event_weights="event_type:view=0.2,cart=0.5,purchase=1")
    assert np.isclose(history["weight"].min(), 0.2) and np.isclose(history["weight"].max(), 1.0)  # rows, not pairs
    answer = subprocess.run([sys.executable, str(ROOT / "recommend.py"), "runs/r", f"--history={path}",
                             "--event_weights=event_type:purchase=1", "--fallback=popular", "--n=3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert answer.stderr.startswith("answered") and len(answer.stdout.splitlines()) > 3
