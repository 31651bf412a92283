"""The ranking task: implicit feedback, the per-user split, the rank metrics and the evaluator."""

import json
import math

import numpy as np
import pytest
import torch

import loader
import tasks
import train
from bench import peers
from MFMixTaste import PRIOR_TERMS, MFMixTaste

K = 3
# Five users, six items; columns are items. -inf marks an item masked out (seen in training).
NEG = -math.inf
SCORES = torch.tensor([
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # A: relevant {5}: no hit in the top 3
    [0.9, 0.7, 0.1, 0.05, 0.8, 0.0],  # B: relevant {0,1,2,3}, more than k: top 3 = 0, 4, 1
    [0.5, 0.5, 0.5, 0.5, 0.1, 0.1],   # C: relevant {2}: a four-way tie, broken by item index
    [0.3, 0.2, 0.1, 0.0, 0.0, 0.0],   # D: no held-out items: left out of every average
    [NEG, 0.9, NEG, NEG, 0.2, NEG],   # E: relevant {4}; only two items unmasked, k = 3
])
RELEVANT = torch.zeros_like(SCORES, dtype=torch.bool)
for user, items in enumerate([[5], [0, 1, 2, 3], [2], [], [4]]):
    RELEVANT[user, items] = True


def dcg(ranks):
    return sum(1 / math.log2(r + 1) for r in ranks)


# Per user (A, B, C, E): ndcg, recall, mrr, hit, precision, worked out by hand.
EXPECTED = torch.tensor([
    [0, 0, 0, 0, 0],
    [dcg([1, 3]) / dcg([1, 2, 3]), 2 / 4, 1, 1, 2 / 3],
    [dcg([3]) / dcg([1]), 1, 1 / 3, 1, 1 / 3],
    [dcg([2]) / dcg([1]), 1, 1 / 2, 1, 1 / 3],
], dtype=torch.float64)


def test_rank_metrics_match_hand_computed_figures():
    values = tasks.rank_metrics(SCORES, RELEVANT, K)
    torch.testing.assert_close(values, EXPECTED)
    assert tasks.RANK_METRICS == ("ndcg", "recall", "mrr", "hit", "precision")


def test_ties_are_broken_by_item_index_and_masked_items_never_count():
    values, items = tasks.top_k_items(SCORES, K)
    assert items[2].tolist() == [0, 1, 2]
    assert items[1].tolist() == [0, 4, 1]
    finite = torch.isfinite(values)
    assert items[4][finite[4]].tolist() == [1, 4]  # the masked items never rank as items
    # Even a masked item marked relevant is no hit.
    relevant = RELEVANT.clone()
    relevant[4, 0] = True
    assert tasks.rank_metrics(SCORES, relevant, K)[3, 1] == 0.5  # recall: 1 of 2 relevant


def test_the_ignite_metric_averages_over_users_with_held_out_items_across_batches():
    metric = tasks.RankingMetrics(K)
    metric.reset()
    metric.update(tasks.rank_metrics(SCORES[:2], RELEVANT[:2], K))
    metric.update(tasks.rank_metrics(SCORES[2:], RELEVANT[2:], K))
    result = metric.compute()
    assert list(result) == [f"{m}@{K}" for m in tasks.RANK_METRICS]
    for column, name in enumerate(tasks.RANK_METRICS):
        assert abs(result[f"{name}@{K}"] - float(EXPECTED[:, column].mean())) < 1e-7


def test_the_core_filter_repeats_until_every_user_and_item_has_enough():
    # Item 9 has 2 positives (users 1, 2). Removing it leaves user 2 with one positive, and
    # removing user 2 leaves item 8 with one: only the block of users 0-1 x items 0-1 survives.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 9), (2, 9), (2, 8), (3, 8), (3, 7)]
    ratings = loader.encode(np.array([u for u, _ in pairs]), np.array([i for _, i in pairs]),
                            np.array([4.0] * len(pairs)))
    ratings.ratings[-1] = 2.0  # (3, 7) is not a positive
    rows, kept = loader.implicit_feedback(ratings, min_rating=3, core=2)
    users, items = ratings.user_ids[ratings.users[rows]], ratings.item_ids[ratings.items[rows]]
    assert sorted(zip(users.tolist(), items.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "8 with a rating >= 3" in kept and "4 in the 2-core" in kept
    with pytest.raises(loader.DataError, match="no interactions are left"):
        loader.implicit_feedback(ratings, min_rating=3, core=5)


def test_split_per_user_takes_the_floor_of_ten_percent_each_seeded():
    rng = np.random.default_rng(0)
    counts = {7: 10, 8: 19, 9: 25}
    users = np.repeat(list(counts), list(counts.values()))
    items = np.concatenate([rng.choice(100, n, replace=False) for n in counts.values()])
    ratings = loader.encode(users, items, np.ones(len(users)))
    everything = np.arange(len(users))
    data = loader.split_per_user(ratings, everything, seed=5)
    for index, raw in enumerate(data.user_ids):
        parts = np.bincount(data.part[data.users == index], minlength=3)
        n = counts[raw]
        assert parts.tolist() == [n - 2 * (n // 10), n // 10, n // 10]
    again = loader.split_per_user(ratings, everything, seed=5)
    other = loader.split_per_user(ratings, everything, seed=6)
    assert np.array_equal(data.part, again.part) and not np.array_equal(data.part, other.part)


def _ranking_task(tmp_path, **overrides):
    from conftest import mixture_ratings, write_ratings
    write_ratings(tmp_path / "ml-100k" / "u.data", *mixture_ratings(n_ratings=6000), sep="\t")
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking", "ranking_core": 10,
           "dim": 4, **overrides}
    ratings = loader.load("ml-100k", tmp_path)
    return tasks.RankingTask(cfg, ratings, "cpu", 0, 1)


def test_the_evaluator_masks_training_items_and_for_test_validation_items(tmp_path):
    task = _ranking_task(tmp_path)
    model = MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2)
    with torch.no_grad():  # training items score highest: unmasked, they would fill the top
        position, items = task.by_user["train"].pairs(torch.arange(task.n_users))
        model.item_bias.index_add_(0, items, torch.ones(len(items)))
    for split, masked in (("val", ("train",)), ("test", ("train", "val"))):
        users = next(iter(task.eval_batches[split]))
        scores, relevant = task.scores_and_relevant(model, users, split)
        for part in masked:
            position, items = task.by_user[part].pairs(users)
            assert torch.isneginf(scores[position, items]).all()
        _, top = tasks.top_k_items(scores, task.k)
        position, items = task.by_user["train"].pairs(users)
        seen = torch.zeros_like(relevant)
        seen[position, items] = True
        assert not seen.gather(1, top).any()
        position, items = task.by_user[split].pairs(users)
        assert relevant.sum() == len(items) and relevant[position, items].all()


def test_evaluation_streams_users_in_blocks_with_the_figures_of_one_dense_block(tmp_path):
    """Blocks of 3 users (a running sum of per-user metrics, never a users x items matrix) give
    what one block of every user gives, ties included: scores rounded to a few levels tie often."""
    small = _ranking_task(tmp_path, eval_batch_size=16 * 3)
    whole = _ranking_task(tmp_path, eval_batch_size=16 * 100_000)
    assert len(small.eval_batches["val"]) > 5 and len(whole.eval_batches["val"]) == 1
    model = MFMixTaste(small.n_users, small.n_items, dim=4, n_tastes=2, init_std=0.5)
    tied = peers.Scorer(lambda users: np.round(model.score_all(torch.from_numpy(users)).detach().numpy(), 1))
    for scorer in (model, tied):
        for split in ("val", "test"):
            streamed, dense = small.evaluate(scorer, split), whole.evaluate(scorer, split)
            assert streamed.keys() == dense.keys()
            for name in dense:
                assert abs(streamed[name] - dense[name]) < 1e-9, (split, name)
    scores, _ = whole.scores_and_relevant(tied, torch.arange(whole.n_users), "val")
    assert ((scores[:, :-1] == scores[:, 1:]) & torch.isfinite(scores[:, 1:])).any()  # they do tie


def test_validation_and_test_ranked_from_one_scoring_equal_each_ranked_alone(tmp_path):
    """The evaluator of both splits scores every item once and masks the validation items only
    for test: its figures are those of one evaluator per split, and of task.evaluate."""
    task = _ranking_task(tmp_path, eval_batch_size=16 * 7)
    model = MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2, init_std=0.5)
    (splits, both), = task.evaluators(model, ("val", "test"))
    assert splits == ("val", "test")
    both.run(task.eval_batches["val"])
    scored = []
    model.score_all = lambda users, score_all=model.score_all: scored.append(len(users)) or score_all(users)
    both.run(task.eval_batches["val"])
    assert sum(scored) == task.n_users  # every user's items scored once for the two splits
    for split in splits:
        alone = task.evaluator(model, (split,))
        alone.run(task.eval_batches[split])
        direct = task.evaluate(model, split)
        for name in direct:
            assert both.state.metrics[f"{split}_{name}"] == pytest.approx(alone.state.metrics[f"{split}_{name}"], abs=1e-12)
            assert both.state.metrics[f"{split}_{name}"] == pytest.approx(direct[name], abs=1e-12)
    assert both.state.metrics["val_ndcg@10"] != both.state.metrics["test_ndcg@10"]


@pytest.mark.parametrize("overrides,message", [
    ({"top_k": 10_000}, "--top_k=10000 is larger than the number of items"),
    ({"ranking_core": 500}, "no interactions are left"),
])
def test_bad_ranking_settings_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises((train.ConfigError, loader.DataError), match=message):
        _ranking_task(tmp_path, **overrides)


def run_ranking(tmp_path, data_dir, *overrides, check=True):
    from test_train import run_train
    return run_train(tmp_path, data_dir, "--task=ranking", "--dim=8", "--n_tastes=2",
                     "--batch_size=32", "--ranking_core=10", *overrides, check=check)


def test_a_ranking_run_logs_and_writes_the_rank_metrics(tmp_path, synthetic_ml100k):
    from test_train import read_csv
    done = run_ranking(tmp_path, synthetic_ml100k, "--epochs=3", "--patience=0", "--run_name=rk",
                       "--test_curve=True", "--eval_every=1")
    assert "test NDCG@10" in done.stdout and "Recall@10" in done.stdout
    summary = json.loads((tmp_path / "results" / "rk" / "summary.json").read_text())
    assert summary["task"] == "ranking" and summary["hyperparameters"]["lr"] == train.RANKING_DEFAULTS["lr"]
    for split in ("val", "test"):
        for name in tasks.RANK_METRICS:
            assert 0 <= summary[f"{split}_{name}@10"] <= 1
    rows = read_csv(tmp_path / "results" / "rk" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best = max(rows, key=lambda r: float(r["val_ndcg@10"]))
    assert summary["best_epoch"] == int(best["epoch"])
    assert abs(summary["test_ndcg@10"] - float(best["test_ndcg@10"])) < 1e-6
    assert "<svg" in (tmp_path / "results" / "rk" / "ndcg_at_10.svg").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "runs" / "rk")).Reload()
    assert [e.step for e in events.Scalars("val/ndcg_10")] == [1, 2, 3]  # tensorboardX writes @ as _
    assert "train_step/softmax" in events.Tags()["scalars"]


@pytest.mark.parametrize("loss", ["sampled_softmax", "bpr", "adaptive_hinge"])
def test_the_sampled_losses_train(tmp_path, synthetic_ml100k, loss):
    from test_train import read_csv
    run_ranking(tmp_path, synthetic_ml100k, "--epochs=4", "--patience=0", f"--loss={loss}",
                "--n_negatives=5", "--batch_size=256", "--lr=0.02", "--run_name=s")
    rows = read_csv(tmp_path / "results" / "s" / "metrics.csv")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # By default each evaluation ranks test beside validation, from the same scores (one timing),
    # and the chosen epoch's (here the only evaluated one) test figures are the summary's.
    assert rows[-1]["val_ndcg@10"] and float(rows[-1]["val_test_seconds"]) > 0 and "val_seconds" not in rows[-1]
    summary = json.loads((tmp_path / "results" / "s" / "summary.json").read_text())
    assert 0 < summary["test_ndcg@10"] == pytest.approx(float(rows[-1]["test_ndcg@10"]), abs=1e-9)


@pytest.mark.parametrize("sampled", ["--softmax_items=0", "--softmax_items=40"])
def test_a_ranking_run_resumes_to_the_same_model(tmp_path, synthetic_ml100k, sampled):
    from test_train import read_csv
    # A constant lr: a run stopped at --epochs=1 and resumed with --epochs=3 re-plans a decaying
    # lr over the longer run (tests/test_train.py resumes a decaying lr after an interruption).
    # Every epoch evaluated: with eval_every=3, the stopped run's last epoch (1) is evaluated too.
    # A sampled softmax's draws come from the saved generator: the resumed run draws the same.
    run_ranking(tmp_path, synthetic_ml100k, "--epochs=3", "--patience=0", "--run_name=straight", "--lr_decay=0",
                "--eval_every=1", sampled)
    run_ranking(tmp_path, synthetic_ml100k, "--epochs=1", "--patience=0", "--run_name=split", "--lr_decay=0",
                "--eval_every=1", sampled)
    run_ranking(tmp_path, synthetic_ml100k, f"--resume={tmp_path / 'runs' / 'split'}", "--epochs=3")
    straight = read_csv(tmp_path / "results" / "straight" / "metrics.csv")
    split = read_csv(tmp_path / "results" / "split" / "metrics.csv")
    assert [r["val_ndcg@10"] for r in straight] == [r["val_ndcg@10"] for r in split]


def test_bfloat16_training_products_are_recorded_and_stay_close_to_float32(tmp_path, synthetic_ml100k):
    """mixed_precision=bfloat16 trains the softmax loss with its matrix products in bfloat16:
    summary.json says so, the weights stay float32, and the figures stay near float32's (the
    same data, seed and steps); off is float32 throughout."""
    figures = {}
    for mode in ("bfloat16", "off"):
        run_ranking(tmp_path, synthetic_ml100k, "--epochs=3", "--patience=0", f"--run_name={mode}",
                    f"--mixed_precision={mode}")
        summary = json.loads((tmp_path / "results" / mode / "summary.json").read_text())
        assert summary["training_products"] == ("bfloat16" if mode == "bfloat16" else "float32")
        figures[mode] = summary["val_ndcg@10"]
        [best] = (tmp_path / "runs" / mode).glob("best_model_*.pt")
        assert all(t.dtype == torch.float32 for t in torch.load(best).values() if t.is_floating_point())
    assert figures["bfloat16"] != figures["off"] and abs(figures["bfloat16"] - figures["off"]) < 0.05


def test_a_shared_taste_prior_holds_each_taste_by_the_pairs_it_serves():
    """share_taste_prior with positives=(position, items): the tastes' term is sum over pairs and tastes of the pair's
    mixture weight times |U_ik|^2, over the pairs (by hand below); the other terms are unchanged;
    the weights are constants (the term sends no gradient to the attention vectors); with K=1
    it equals the full per-pair prior."""
    torch.manual_seed(0)
    users = torch.tensor([3, 7, 1])
    position, items = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([4, 9, 2, 0, 4, 11])
    counts = dict(user_counts=torch.bincount(position, minlength=3).float(),
                  item_counts=torch.bincount(items, minlength=12).float())
    model = MFMixTaste(10, 12, dim=5, n_tastes=3, init_std=0.7)
    _, full = model(users, return_prior=True, **counts)
    _, shared = model(users, return_prior=True, share_taste_prior=True, positives=(position, items), **counts)
    weights = model.mixture_weights(users[position], items)                        # (P, K)
    by_hand = (weights * model.tastes[users[position]].pow(2).sum(-1)).sum() / len(items)
    torch.testing.assert_close(shared[0], by_hand)
    torch.testing.assert_close(shared[1:], full[1:])
    assert shared[0] < full[0]  # each pair holds its tastes by shares summing to one, not by K
    model.zero_grad()
    shared[0].backward()
    assert model.user_factors.grad[:, 1].abs().sum() == 0 and model.user_factors.grad[:, 0].abs().sum() > 0
    one = MFMixTaste(10, 12, dim=5, n_tastes=1, init_std=0.7)
    torch.testing.assert_close(one(users, return_prior=True, share_taste_prior=True, positives=(position, items),
                                   **counts)[1],
                               one(users, return_prior=True, **counts)[1])


def test_under_bfloat16_autocast_the_scores_are_close_and_the_prior_exact():
    torch.manual_seed(0)
    model = MFMixTaste(50, 40, dim=16, n_tastes=3, init_std=0.5)
    users = torch.arange(0, 50, 3)
    user_counts, item_counts = torch.rand(len(users)) * 400, torch.rand(40) * 900
    exact_scores, exact_norms = model(users, return_prior=True, user_counts=user_counts, item_counts=item_counts)
    with torch.autocast("cpu", torch.bfloat16):
        scores, norms = model(users, return_prior=True, user_counts=user_counts, item_counts=item_counts)
    assert scores.dtype == torch.float32 and norms.dtype == torch.float32
    torch.testing.assert_close(norms, exact_norms)                      # no product cast to bfloat16
    assert (scores - exact_scores).abs().max() < 0.05 * exact_scores.abs().max()
    assert not torch.equal(scores, exact_scores)                        # the products did run in bfloat16


@pytest.mark.parametrize("override,message", [
    ("--top_k=100000", "--top_k=100000 is larger than the number of items"),
    ("--mixed_precision=bfloat16 --loss=bpr", "--mixed_precision=bfloat16 serves the ranking task's softmax loss"),
    ("--mixed_precision=fp8", "--mixed_precision=fp8 is not one of auto, bfloat16, off"),
    ("--loss=hinge", "--loss=hinge is not one of softmax, sampled_softmax, bpr, adaptive_hinge"),
    ("--task=rank", "--task=rank is not one of rating, ranking"),
    ("--ranking_core=1000", "no interactions are left"),
])
def test_bad_ranking_input_from_the_command_line(tmp_path, synthetic_ml100k, override, message):
    result = run_ranking(tmp_path, synthetic_ml100k, "--epochs=1", *override.split(), check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax", "bpr", "adaptive_hinge"])
def test_a_row_prior_weight_counts_like_that_many_examples_for_every_loss(tmp_path, loss):
    """Over an epoch, each batch's prior weighted by its examples (the count its data term is a
    mean over) sums to the rows' squared norms: the same for every loss. With sampled losses a
    batch scores 1 + n_negatives pairs per example; the prior must not be that much weaker."""
    # The taste prior counted in full for every taste (shared by mixture weight, the tastes' term
    # is not the rows' squared norms: test_a_shared_taste_prior_... covers it).
    task = _ranking_task(tmp_path, loss=loss, n_negatives=9, prior_per="row", batch_size=64,
                         share_taste_prior=False)
    model = MFMixTaste(task.n_users, task.n_items, dim=4, n_tastes=2, init_std=1.0)
    total = 0.0
    for batch in task.batches:
        _, norms, _, _ = task.loss(model, batch)
        examples = len(batch[2]) if loss == "softmax" else len(batch[0])
        total += examples * float(norms[0].detach())  # the tastes' term
    expected = float(model.tastes.detach().pow(2).sum((1, 2)).sum())  # every user trains
    assert total == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("capability,hip,native", [((7, 0), None, False), ((7, 5), None, False), ((8, 0), None, True),
                                                    ((9, 0), None, True), ((9, 0), "6.2", False)])
def test_auto_mixed_precision_asks_the_runs_own_gpu_for_native_bfloat16(monkeypatch, capability, hip, native):
    """V100 (7.0) and T4 (7.5) emulate bfloat16, which torch.cuda.is_bf16_supported() counts as
    support: "auto" keeps float32 there, asks the run's own device (cuda:1 here, not the current
    one), and keeps float32 on ROCm, where torch says yes for every GPU."""
    import torch

    import tasks
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    cfg = {"mixed_precision": "auto", "loss": "softmax"}
    assert tasks.bfloat16_products(cfg, torch.device("cuda:1")) is native
    assert asked in ([], [torch.device("cuda:1")])


@pytest.mark.parametrize("speedup,chosen", [(0.57, False), (1.2, False), (1.3, True), (5.0, True)])
def test_auto_mixed_precision_on_a_cpu_takes_bfloat16_only_where_it_measured_faster(monkeypatch, speedup, chosen):
    """A CPU with native bfloat16 instructions can still run float32's products faster (an Intel
    Xeon whose AMX is hidden: bfloat16 at 0.57x): "auto" times the step's product both ways and
    takes bfloat16 only from BFLOAT16_SPEEDUP on, and says what it measured."""
    monkeypatch.setattr(tasks, "native_bfloat16", lambda device: True)
    shapes = []
    monkeypatch.setattr(tasks, "bfloat16_speedup", lambda *shape: shapes.append(shape) or speedup)
    described = []
    cfg = {"mixed_precision": "auto", "loss": "softmax"}
    assert tasks.bfloat16_products(cfg, torch.device("cpu"), shape=(1024, 160, 3123), described=described) is chosen
    assert shapes == [(1024, 160, 3123)]
    assert described == [f"training products in {'bfloat16' if chosen else 'float32'}: bfloat16's ran "
                         f"{speedup:.2f}x float32's speed on this CPU (auto takes it from 1.25x)"]
    # An explicit choice, or a loss that is not the softmax, measures nothing; nor does a sampled
    # softmax's step (no shape given), bound by its memory: bfloat16 wherever native.
    assert tasks.bfloat16_products({**cfg, "mixed_precision": "off"}, torch.device("cpu")) is False
    assert tasks.bfloat16_products({**cfg, "loss": "bpr"}, torch.device("cpu")) is False
    assert tasks.bfloat16_products(cfg, torch.device("cpu")) is True
    assert len(shapes) == 1


def test_a_resumed_run_trains_in_the_precision_auto_chose_when_it_began(tmp_path, synthetic_ml100k, monkeypatch):
    """auto's choice on a CPU is a measurement, which another moment (or machine) could answer
    otherwise: config.json keeps what was chosen, and --resume trains on in it."""
    monkeypatch.setattr(tasks, "native_bfloat16", lambda device: True)
    args = ["--task=ranking", "--dataset=ml-100k", f"--data_dir={synthetic_ml100k}", "--download=False",
            "--progress=False", "--dim=8", "--batch_size=32", "--ranking_core=10", "--patience=0",
            "--lr_decay=0", "--eval_every=1", "--run_name=auto", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}"]
    monkeypatch.setattr(tasks, "bfloat16_speedup", lambda *shape: 3.0)
    assert train.main(args + ["--epochs=1"]) == 0
    run_dir = tmp_path / "runs" / "auto"
    assert json.loads((run_dir / "config.json").read_text())["mixed_precision"] == "bfloat16"
    monkeypatch.setattr(tasks, "bfloat16_speedup", lambda *shape: 0.5)  # now float32 measures faster
    assert train.main([f"--resume={run_dir}", "--epochs=2"]) == 0
    summary = json.loads((tmp_path / "results" / "auto" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["training_products"] == "bfloat16"


def test_timing_bfloat16_leaves_the_runs_seeded_draws_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    speedup = tasks.bfloat16_speedup(64, 8, 100, repeats=1)
    assert torch.equal(torch.rand(4), expected) and speedup > 0


def test_the_softmax_loss_batch_keeps_an_epoch_to_24_steps_within_its_memory_bound(tmp_path):
    def users_per_step(n_users, n_items, **cfg):
        return tasks.batch_size_for({"batch_size": 0, **cfg}, n_users, tasks.RANKING_BATCH_STEPS,
                                    max(1, tasks.RANKING_BATCH_SCORES // n_items), tasks.RANKING_BATCH_LEAST)
    assert users_per_step(6033, 3123) == 256            # ML-1M: the batch its defaults were tuned at
    assert users_per_step(943, 1682) == 256             # smaller sets: the same batch, fewer steps
    assert users_per_step(22363, 12101) == 932          # Amazon Beauty: 24 steps an epoch
    assert users_per_step(162541, 59047) == 2 ** 25 // 59047  # ML-25M: the scores' bound
    assert users_per_step(22363, 12101, batch_size=100) == 100  # an explicit batch wins
    task = _ranking_task(tmp_path, batch_size=0)
    assert task.batch_size == 256 and train.RANKING_DEFAULTS["batch_size"] == 0
    assert _ranking_task(tmp_path, batch_size=0, loss="bpr").batch_size == 256  # sampled: as measured


def _softmax_forward(model, users, position, items, **kwargs):
    counts = dict(user_counts=torch.bincount(position, minlength=len(users)).float(),
                  item_counts=torch.bincount(items, minlength=model.n_items).float())
    return model(users, return_prior=True, positives=(position, items), share_taste_prior=True, **counts, **kwargs)


def test_a_softmax_sampled_over_every_item_once_is_the_full_softmax_gradients_included():
    torch.manual_seed(0)
    model = MFMixTaste(7, 9, dim=4, n_tastes=3, init_std=0.5)
    users, position, items = torch.tensor([0, 3, 5]), torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 8, 0, 4, 5])
    full, full_norms = _softmax_forward(model, users, position, items)
    (-torch.log_softmax(full, 1)[position, items].sum() + full_norms.sum()).backward()
    full_gradients = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    every = torch.arange(9).flip(0)  # in any order: the columns are the drawn items, scores in their order
    sampled, norms, positive = _softmax_forward(model, users, position, items, columns=every)
    assert torch.allclose(sampled, full[:, every]) and torch.allclose(norms, full_norms)
    assert torch.allclose(positive, full[position, items])
    log_draws = torch.zeros(9)  # each item drawn once: C q = 9 * (1/9)
    log_probabilities = tasks.sampled_log_softmax(sampled, positive, position, items, every, torch.ones(9),
                                                  log_draws)
    assert torch.allclose(log_probabilities, torch.log_softmax(full, 1)[position, items])
    (-log_probabilities.sum() + norms.sum()).backward()
    for p, expected in zip(model.parameters(), full_gradients):
        assert torch.allclose(p.grad, expected, atol=1e-6)
    # Some items drawn, some positives among them (item 8 for user 0, item 4 for user 2) and some
    # not: each user's normaliser is its own positives plus the drawn non-positives, each weighted
    # by its draws over C q, written out user by user.
    with torch.no_grad():
        drawn, draws, log_draws = torch.tensor([8, 2, 4]), torch.tensor([2.0, 1.0, 3.0]), torch.randn(9)
        got = tasks.sampled_log_softmax(full[:, drawn], full[position, items], position, items, drawn, draws, log_draws)
        for pair, (user, item) in enumerate(zip(position.tolist(), items.tolist())):
            own = [full[user, j] for u, j in zip(position.tolist(), items.tolist()) if u == user]
            mine = set(j for u, j in zip(position.tolist(), items.tolist()) if u == user)
            rest = [full[user, j] + draws[c].log() - log_draws[j] for c, j in enumerate(drawn.tolist()) if j not in mine]
            assert torch.isclose(got[pair], full[user, item] - torch.logsumexp(torch.stack(own + rest), 0))


def test_the_training_batches_share_the_evaluations_grouping_and_yield_what_a_sort_of_their_own_does(tmp_path):
    task = _ranking_task(tmp_path, softmax_items=30, batch_size=50)
    assert task.batches.items_sorted is task.by_user["train"].items_sorted  # one copy of the training pairs
    users, items, _, part = task.split
    train = part == 0
    alone = loader.UserBatches(torch.from_numpy(users[train].astype(np.int64)), torch.from_numpy(items[train].astype(np.int64)),
                               task.n_users, 50, columns=30, probabilities=torch.ones(task.n_items) / task.n_items)
    for shared, own in zip(task.batches, alone):
        assert all(torch.equal(a, b) for a, b in zip(shared[:3], own[:3])) and shared[3] == own[3]
    assert task.split[0].dtype == task.seen[0].dtype == np.int32  # indices kept to the run's end in half the bytes


def test_padded_columns_give_the_log_probabilities_of_the_drawn_ones():
    generator = torch.Generator().manual_seed(3)
    n_items = 40
    drawn = torch.randint(0, n_items, (25,), generator=generator)
    columns, draws = torch.unique(drawn, return_counts=True)
    padded, padded_draws = tasks.padded_columns(columns, draws, multiple=16)
    assert len(padded) % 16 == 0 and len(padded) > len(columns)
    assert torch.equal(padded[:len(columns)], columns) and int(padded_draws[len(columns):].sum()) == 0
    # User 0 has the first column's item among its positives: the padding repeats that item, and
    # the positive must still be masked in its drawn column, not in a padding one.
    position = torch.tensor([0, 0, 1, 1, 1])
    items = torch.tensor([int(columns[0]), int(columns[2]), 1, 7, int(columns[-1])])
    full = torch.randn(2, n_items, generator=generator, requires_grad=True)       # every item's score
    log_draws = torch.full((n_items,), math.log(25 / n_items))

    def log_p(cols, counts):
        return tasks.sampled_log_softmax(full[:, cols], full[position, items], position, items, cols, counts, log_draws)
    drawn_only, with_padding = log_p(columns, draws), log_p(padded, padded_draws)
    assert torch.allclose(drawn_only, with_padding)
    gradient, = torch.autograd.grad(drawn_only.sum(), full)
    padded_gradient, = torch.autograd.grad(with_padding.sum(), full)
    assert torch.allclose(gradient, padded_gradient)
    # The padding first: a padding column is masked instead, and the positive counted twice.
    assert not torch.allclose(log_p(padded.flip(0), padded_draws.flip(0)), drawn_only)


def test_the_sampled_normaliser_is_corrected_for_the_draw_probabilities():
    """Draws from a skewed q, with log(C q) subtracted, estimate log sum_j exp(s_j) over all items;
    uncorrected, the popular items' overdraw would bias it."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 50, generator=generator)                         # (users, all items)
    q = torch.rand(50, generator=generator) ** 2 + 0.05
    q /= q.sum()
    drawn = torch.multinomial(q, 200_000, replacement=True, generator=generator)
    exact = torch.logsumexp(scores, 1)
    estimate = torch.logsumexp(scores[:, drawn] - (q[drawn] * len(drawn)).log(), 1)
    assert torch.allclose(estimate, exact, atol=0.02)
    uncorrected = torch.logsumexp(scores[:, drawn], 1) - math.log(len(drawn)) + math.log(50)
    assert not torch.allclose(uncorrected, exact, atol=0.02)


def test_the_rule_samples_the_softmax_only_above_its_catalogue_size(tmp_path):
    cfg = {"softmax_items": 0}
    assert tasks.softmax_items(cfg, 3706) is None and tasks.softmax_items(cfg, tasks.SOFTMAX_ALL_UP_TO) is None
    assert tasks.softmax_items(cfg, 59047) == tasks.SOFTMAX_SAMPLE
    # Amazon Beauty's 12,101 items: a third drawn; just above the threshold, at most half.
    assert tasks.softmax_items(cfg, 12101) == tasks.softmax_items(cfg, tasks.SOFTMAX_ALL_UP_TO + 1) == 4096
    assert tasks.SOFTMAX_SAMPLE <= (tasks.SOFTMAX_ALL_UP_TO + 1) / 2
    assert tasks.softmax_items({"softmax_items": 500}, 3706) == 500
    assert tasks.softmax_items({"softmax_items": 5000}, 3706) is None  # at least the catalogue: all of it
    task = _ranking_task(tmp_path, softmax_items=30)
    users, position, items, global_pairs, columns = next(iter(task.batches))
    assert columns.shape == (30,) and int(columns.max()) < task.n_items
    assert any("softmax over 30 of" in line for line in task.described)
    assert len(next(iter(_ranking_task(tmp_path).batches))) == 4  # every item: no draws


def test_the_rating_batch_keeps_an_epoch_within_256_steps_on_large_sets():
    def ratings_per_step(n_train, **cfg):
        return tasks.batch_size_for({"batch_size": 0, **cfg}, n_train, most_steps=tasks.AUTO_STEPS_MOST)
    assert ratings_per_step(712_672) == 8192              # ML-1M's training rows: the batch it was tuned at
    assert ratings_per_step(70_000) == 1094               # small sets: 64 steps an epoch
    assert ratings_per_step(2_097_152) == 8192            # up to 256 steps of 8192: unchanged
    assert ratings_per_step(17_460_674) == 68_206         # ML-25M's shape: 256 steps an epoch
    assert ratings_per_step(17_460_674, batch_size=8192) == 8192  # an explicit batch wins


def test_sparse_users_scale_the_user_side_priors_by_the_interactions_they_lack():
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    chosen = {name: cfg[f"prior_{name}"] for name in PRIOR_TERMS}
    described = []
    sparse = tasks.prior_weights(cfg, np.array([4, 6, 0, 5]), described, 160)  # 5 a user with any
    assert sparse["tastes"] == pytest.approx(chosen["tastes"] * 20)
    assert sparse["attention"] == pytest.approx(chosen["attention"] * 20)
    assert (sparse["items"], sparse["biases"]) == (chosen["items"], chosen["biases"])
    assert len(described) == 1 and "x20.00" in described[0] and "5.0 training interactions" in described[0]
    described = []
    assert tasks.prior_weights(cfg, np.array([112, 90, 130]), described, 160) == chosen  # as rich as ML-1M
    assert described == []
    for off in ({"prior_user_pairs": 0}, {"prior_per": "row"}):
        assert tasks.prior_weights({**cfg, **off}, np.array([4, 6]), [], 160) == chosen


def test_above_d160_the_sparse_users_priors_grow_less():
    """scale = 1 + (f - 1) sqrt(160 / d): f=20 gives x20 at d=160 and below, x14.4 at d=320,
    x10.5 at d=640; a set as rich as ML-1M (f = 1) keeps its weights at any d."""
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    five = np.array([4, 6, 0, 5])
    def tastes(users, dim):
        return tasks.prior_weights(cfg, users, [], dim)["tastes"] / cfg["prior_tastes"]
    assert tastes(five, 32) == pytest.approx(20) and tastes(five, 160) == pytest.approx(20)
    assert tastes(five, 320) == pytest.approx(1 + 19 / math.sqrt(2))
    assert tastes(five, 640) == pytest.approx(1 + 19 / 2)
    assert tasks.prior_weights(cfg, np.array([112, 90, 130]), [], 640)["tastes"] == cfg["prior_tastes"]
    described = []
    tasks.prior_weights(cfg, five, described, 320)
    assert "x14.44" in described[0] and "at d=160, this is d=320" in described[0]


def test_the_scaled_priors_train_as_the_same_weights_given_by_hand(tmp_path, synthetic_ml100k):
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking", "dataset": "ml-100k",
           "ranking_core": 10, "dim": 8, "batch_size": 32}
    weights = tasks.RankingTask(cfg, loader.load("ml-100k", synthetic_ml100k, allow_download=False),
                                "cpu", 0, 1).prior_weights
    assert weights["tastes"] > cfg["prior_tastes"]  # the synthetic users are sparser than 100
    common = ("--epochs=2", "--patience=0", "--eval_every=1")
    ruled = run_ranking(tmp_path, synthetic_ml100k, *common, "--run_name=rule")
    assert "prior on tastes and attention x" in ruled.stdout + ruled.stderr
    run_ranking(tmp_path, synthetic_ml100k, *common, "--run_name=hand", "--prior_user_pairs=0",
                f"--prior_tastes={weights['tastes']!r}", f"--prior_attention={weights['attention']!r}")
    summaries = [json.loads((tmp_path / "results" / name / "summary.json").read_text()) for name in ("rule", "hand")]
    for key in ("val_ndcg@10", "test_ndcg@10", "best_epoch"):
        assert summaries[0][key] == summaries[1][key]
    assert summaries[0]["prior_weights_used"] == summaries[1]["prior_weights_used"] == weights
    assert summaries[0]["hyperparameters"]["prior_tastes"] == cfg["prior_tastes"]  # the knob as given


def test_a_negative_prior_user_pairs_is_one_clear_error(tmp_path, synthetic_ml100k):
    done = run_ranking(tmp_path, synthetic_ml100k, "--prior_user_pairs=-1", check=False)
    assert done.returncode == 2 and "--prior_user_pairs must not be negative" in done.stderr


def test_an_epoch_of_more_steps_than_lr_steps_scales_the_softmax_lr_down():
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    described = []
    assert tasks.lr_scale(cfg, 88, 256, described) == pytest.approx(24 / 88)  # Amazon Beauty's 22,363 users
    assert len(described) == 1 and "88 steps an epoch of 256 users" in described[0]
    described = []
    assert tasks.lr_scale(cfg, 24, 256, described) == 1.0 and described == []  # ML-1M's 6,033: as tuned
    assert tasks.lr_scale(cfg, 3, 256, []) == 1.0  # fewer steps: never scaled up
    assert tasks.lr_scale({**cfg, "lr_steps": 0}, 88, 256, []) == 1.0


def test_where_lr_is_scaled_its_peak_is_held_for_the_steps_of_unscaled_data_and_the_warm_down_takes_the_rest():
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    described = []
    beauty = tasks.warm_down_share(cfg, 24 / 88, described)  # Amazon Beauty: 88 steps an epoch
    assert beauty == pytest.approx(1 - 0.3 * 24 / 88) and "lr falls over the last 91.8%" in described[0]
    held_steps = (1 - beauty) * cfg["epochs"] * 88
    assert held_steps == pytest.approx((1 - cfg["lr_decay"]) * cfg["epochs"] * cfg["lr_steps"])  # ML-1M's 108
    described = []
    assert tasks.warm_down_share(cfg, 1.0, described) == cfg["lr_decay"] and described == []  # ML-1M: as tuned
    assert tasks.warm_down_share({**cfg, "lr_decay": 0.0}, 24 / 88, []) == 0.0  # a constant lr stays constant
    assert tasks.warm_down_share({**cfg, "lr_decay": 1.0}, 24 / 88, []) == 1.0


def test_the_softmax_batch_is_256_users_and_an_explicit_smaller_one_scales_the_lr(tmp_path):
    task = _ranking_task(tmp_path, batch_size=0)
    assert task.batch_size == 256 and task.lr_scale == 1.0  # the 120 users: one step
    small = _ranking_task(tmp_path, batch_size=4)  # an explicit batch: more steps, a smaller lr
    steps = -(-small.n_users // 4)
    assert steps > 24 and small.lr_scale == pytest.approx(24 / steps)
    assert small.lr_decay == pytest.approx(1 - 0.3 * 24 / steps) and task.lr_decay == 0.7
    assert _ranking_task(tmp_path, batch_size=4, lr_steps=0).lr_scale == 1.0
    assert _ranking_task(tmp_path, batch_size=4, loss="bpr").lr_scale == 1.0  # the sampled losses: lr as given


def test_the_softmax_batch_is_256_users_up_to_256_steps_an_epoch_then_24_steps():
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    most = tasks.RANKING_BATCH_SCORES // tasks.SOFTMAX_SAMPLE
    assert tasks.softmax_batch_size(cfg, 6033, most) == 256           # ML-1M: 24 steps, as tuned
    assert tasks.softmax_batch_size(cfg, 22363, most) == 256          # Amazon Beauty, sampled: 88 steps
    assert tasks.softmax_batch_size(cfg, 256 * 256, most) == 256      # 256 steps: still 256 users
    assert tasks.softmax_batch_size(cfg, 162541, most) == 6773        # ML-25M's shape: 24 steps, as measured
    assert tasks.softmax_batch_size(cfg, 162541, 1000) == 1000        # never past the step's bound
    assert tasks.softmax_batch_size({**cfg, "lr_steps": 0}, 22363, most) == 932  # the earlier rule
    assert tasks.softmax_batch_size({**cfg, "batch_size": 64}, 162541, most) == 64  # an explicit batch wins


def test_the_scaled_lr_and_its_warm_down_train_as_the_same_given_by_hand(tmp_path, synthetic_ml100k):
    common = ("--epochs=2", "--patience=0", "--eval_every=1", "--batch_size=4")
    ruled = run_ranking(tmp_path, synthetic_ml100k, *common, "--run_name=rule")
    assert "lr is set for 24 (lr_steps)" in ruled.stdout + ruled.stderr
    summary = json.loads((tmp_path / "results" / "rule" / "summary.json").read_text())
    assert summary["lr_used"] < summary["hyperparameters"]["lr"]
    assert summary["lr_decay_used"] > summary["hyperparameters"]["lr_decay"]
    run_ranking(tmp_path, synthetic_ml100k, *common, "--run_name=hand", "--lr_steps=0", f"--lr={summary['lr_used']!r}",
                f"--lr_decay={summary['lr_decay_used']!r}")
    hand = json.loads((tmp_path / "results" / "hand" / "summary.json").read_text())
    for key in ("val_ndcg@10", "test_ndcg@10", "best_epoch", "lr_used", "lr_decay_used"):
        assert summary[key] == hand[key]


def test_a_negative_lr_steps_is_one_clear_error(tmp_path, synthetic_ml100k):
    done = run_ranking(tmp_path, synthetic_ml100k, "--lr_steps=-1", check=False)
    assert done.returncode == 2 and "--lr_steps must not be negative" in done.stderr


def test_dim_zero_grows_d_with_the_users_sparsity_up_to_twice_ml1ms():
    cfg = {**train.DEFAULTS, **train.RANKING_DEFAULTS, "task": "ranking"}
    assert cfg["dim"] == 0                                                   # the ranking defaults' rule
    def dim(mean, **knobs):
        return tasks.dim_for({**cfg, **knobs}, np.full(50, mean), [])
    assert dim(112) == dim(100) == 160                       # as rich as ML-1M: its d, its figures
    assert dim(6.7) == dim(6.2) == 320                       # Amazon Beauty, Sports
    assert dim(1) == 320                                     # at most twice
    assert dim(25) == 224                                    # 4 times sparser: 160 x 4^(1/4) = 226, in steps of 32
    assert dim(6.7, dim=64) == 64 and dim(6.7, prior_user_pairs=0) == 160
    described = []
    tasks.dim_for(cfg, np.array([4, 6, 0, 5]), described)
    assert described and "d=320" in described[0] and "5.0 training interactions" in described[0]


def test_the_d_from_the_data_is_the_runs_own_on_resume_and_in_recommend(tmp_path):
    """A sparse file at dim=0: the run trains d=320, its config says so, a resumed run keeps it
    (the rule is not applied to it again) and recommend.py rebuilds the same model."""
    from recommend import Recommender
    rng = np.random.default_rng(0)
    lines = [f"u{u} " + " ".join(f"i{i}" for i in rng.choice(40, 5 + u % 3, replace=False)) for u in range(60)]
    data = tmp_path / "baskets.txt"
    data.write_text("\n".join(lines) + "\n")
    args = [f"--dataset={data}", "--task=ranking", "--n_tastes=1", "--batch_size=16", "--eval_every=1",
            "--lr_decay=0", "--progress=False", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}", "--run_name=d"]
    assert train.main(args + ["--epochs=1"]) == 0
    config = json.loads((tmp_path / "runs" / "d" / "config.json").read_text())
    assert config["dim"] == 320
    assert train.main([f"--resume={tmp_path / 'runs' / 'd'}", "--epochs=2"]) == 0
    summary = json.loads((tmp_path / "results" / "d" / "summary.json").read_text())
    assert summary["hyperparameters"]["dim"] == 320 and summary["epochs_run"] == 2
    run = Recommender.load(tmp_path / "runs" / "d")
    assert run.model.item_factors.shape == (40, 320)


def test_dim_zero_is_the_ranking_tasks_alone(tmp_path, synthetic_ml100k):
    from test_train import run_train
    done = run_train(tmp_path, synthetic_ml100k, "--dim=0", check=False)
    assert done.returncode == 2 and "--dim must be positive (0, from the data, serves the ranking task)" in done.stderr
