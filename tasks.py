"""The two tasks that share the model: what differs between rating and ranking, behind one
interface that train.py's training() uses: the data and its batches, the loss of a batch, the
evaluators and their metrics, and which validation metric chooses the epoch.

    task = TASKS[cfg["task"]](cfg, ratings, device, rank, world_size)
    task.attach(trainer)                                                # its own handlers
    terms, squared_norms, share, extra = task.loss(model, batch)       # for batch in task.batches
    row = run_evaluators(task, task.evaluators(model, ("val", "test")))  # {"val_mse": ..., "test_mse": ...}

- rating: explicit ratings, squared error on the replaced script's 75/25 split (loader.split);
- ranking: implicit feedback on RecBole's ml-1m protocol, every item ranked for every user, the
  rank metrics at k as one Ignite Metric (RankingMetrics).
"""

import math
import time

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import MeanAbsoluteError, MeanSquaredError, Metric, MetricsLambda
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

import loader
from MFMixTaste import PRIOR_TERMS, native_bfloat16

SPLITS = ("train", "val", "test")
RANK_METRICS = ("ndcg", "recall", "mrr", "hit", "precision")


class RatingTask:
    """Explicit ratings: squared error on the replaced script's 75/25 split (loader.split)."""

    def __init__(self, cfg, ratings, device, rank, world_size):
        if not ratings.has_ratings:
            raise loader.DataError(f"{cfg['dataset']} has no rating column (implicit feedback: every row an "
                                   "interaction): use --task=ranking, or name its rating column with --columns")
        rows = loader.rating_split(ratings, cfg["test_fraction"], cfg["val_fraction"], cfg["split_seed"], cfg["split"])
        # The split as run folders keep it (split.parquet): (user, item) indices, times, parts.
        parts = np.concatenate([np.full(len(r), p, dtype=np.int8) for p, r in enumerate(rows)])
        every = np.concatenate(rows)
        self.split = (ratings.users[every], ratings.items[every],
                      None if ratings.timestamps is None else ratings.timestamps[every], parts)
        tensors = {name: ratings.tensors(r, device) for name, r in zip(SPLITS, rows)}
        # Each training rating's weight (--event_weights, --weight_column): its squared error and
        # its implicit claim count by it. Validation and test stay plain MSE over their ratings.
        self.weighted = ratings.weights is not None
        if self.weighted:
            tensors["train"] = (*tensors["train"], torch.from_numpy(ratings.weights[rows[0]]).float().to(device))
        train_ratings = ratings.ratings[rows[0]]
        self.n_users, self.n_items = ratings.n_users, ratings.n_items
        # Raw ids of the rows and every (user, item) the data has: recommend.py's "already rated".
        self.user_ids, self.item_ids = ratings.user_ids, ratings.item_ids
        self.seen = (ratings.users, ratings.items)
        self.global_mean = float(train_ratings.mean())
        self.rating_range = ((float(train_ratings.min()), float(train_ratings.max()))
                             if cfg["clip_predictions"] else None)
        self.counts = {f"n_{name}": len(r) for name, r in zip(SPLITS, rows)}
        self.trained_items = np.bincount(ratings.items[rows[0]], minlength=self.n_items) > 0  # (n_items,)
        self.lr_scale = 1.0  # train.py's lr as given (tasks.lr_scale is the ranking softmax's)
        self.lr_decay = cfg["lr_decay"]  # and its warm-down (tasks.warm_down_share)
        split = "the dataset's own parts" if ratings.part is not None else \
            f"{1 - cfg['test_fraction']:g}/{cfg['test_fraction']:g} by row (seed {cfg['split_seed']})" \
            if cfg["split"] == "random" else f"the latest {cfg['test_fraction']:g} by time to test" \
            if cfg["split"] == "time" else "each user's latest rating to test, the one before it to validation"
        self.described = ratings.described + [
            f"rating data: {len(ratings):,} ratings of {ratings.n_users:,} users and {ratings.n_items:,} items, "
            f"from {train_ratings.min():g} to {train_ratings.max():g}; split {split}: train {len(rows[0]):,}, "
            f"validation {len(rows[1]):,}, test {len(rows[2]):,}"]
        self.metric_names, self.choose_by, self.higher_is_better = ("mse", "rmse", "mae"), "mse", False
        self.choose_label, self.sign = "MSE", -1  # sign: Ignite's handlers keep the highest score
        self.free_train_metrics = not cfg["eval_train"]  # from the epoch's own batches
        # The loss: squared error, and the implicit term on which movies each user rated
        # (MFMixTaste's docstring) against implicit_negatives sampled movies per rating.
        self.term_weights, self.implicit_temperature = {"mse": 1.0}, cfg["implicit_temperature"]
        self.plots = [("train_mse.svg", "Training MSE", [("train_mse", "train")], "MSE"),
                      ("test_mse.svg", "Test MSE", [("test_mse", "test")], "MSE")]
        self.batch_size = batch_size_for(cfg, len(rows[0]), most_steps=AUTO_STEPS_MOST)
        common = dict(seed=cfg["seed"], rank=rank, world_size=world_size)
        self.implicit_share = cfg["implicit_share"]
        if cfg["implicit_weight"] and cfg["implicit_negatives"]:
            self.term_weights["implicit"] = cfg["implicit_weight"]
            self.batches = loader.NegativeBatches(tensors["train"], self.batch_size, self.n_items,
                                                  cfg["implicit_negatives"], **common)
        else:  # without the term: no negatives drawn, exactly the model without it
            self.batches = loader.BatchIterator(tensors["train"], self.batch_size, **common)
        user_pairs = np.bincount(ratings.users[rows[0]], minlength=self.n_users)             # (n_users,)
        self.prior_scale = prior_scale(cfg, user_pairs,
                                       np.bincount(ratings.items[rows[0]], minlength=self.n_items), device)
        self.dim = cfg["dim"]
        self.prior_weights = prior_weights(cfg, user_pairs, self.described, self.dim)
        # A split without rows (test_fraction or val_fraction 0: a fit on all the data) has none.
        self.eval_batches = {split: loader.BatchIterator(tensors[split], cfg["eval_batch_size"],
                                                         shuffle=False, rank=rank, world_size=world_size)
                             for split, r in zip(SPLITS, rows) if len(r)}
        self.device, self.world_size = device, world_size
        self.bfloat16 = False  # train.py's mixed_precision: the fused node runs in float32
        self.share_taste_prior = cfg["share_taste_prior"]

    def loss(self, model, batch):
        """-> ({term name: scalar}, (4,) prior squared norms, this rank's share of the global
        batch, and what the free training metrics read). train.py weighs the terms by
        term_weights."""
        users, items, targets, global_batch, *rest = batch
        weights = rest.pop(0) if self.weighted else None                          # (B,) or None
        negatives = rest[0] if rest else None                                     # (B, n) or None
        outputs = model(users, items, return_prior=True, prior_scale=self.prior_scale, negatives=negatives,
                        implicit_temperature=self.implicit_temperature,
                        share_taste_prior=self.share_taste_prior, pair_weights=weights)
        predictions, squared_norms = outputs[:2]
        # A rank's share of a short last batch can be empty: its loss is then 0, not NaN.
        squared_errors = (predictions - targets).pow(2)                           # (B,)
        terms = {"mse": squared_errors.sum() / max(len(targets), 1) if weights is None
                 else (weights @ squared_errors) / weights.sum().clamp(min=1e-12)}  # the mean by weight
        if negatives is not None:
            terms["implicit"] = outputs[2]
        share = len(targets) * self.world_size / global_batch
        return terms, squared_norms, share, {"predictions": predictions.detach(), "targets": targets}

    def attach(self, trainer):
        """The free training metrics, and the epochs that carry the implicit term: the first
        implicit_share of the run's epochs (rounded), read from the trainer's state when each
        epoch starts, so that a resumed run, or one given more epochs, follows its own length."""
        attach_rating_metrics(trainer, lambda out: (out["predictions"], out["targets"]), self.device, "train")
        if isinstance(self.batches, loader.NegativeBatches):
            @trainer.on(Events.EPOCH_STARTED)
            def draw_negatives(engine):
                self.batches.drawing = engine.state.epoch <= self.implicit_epochs(engine.state.max_epochs)

    def implicit_epochs(self, epochs):
        """How many epochs, from the first, of an epochs-long run carry the implicit term (None
        without the term)."""
        if not isinstance(self.batches, loader.NegativeBatches):
            return None
        return int(self.implicit_share * epochs + 0.5)

    def evaluators(self, model, splits):
        """[((split,), engine)] for each of splits: each split's ratings are their own rows."""
        return [((split,), self.evaluator(model, split)) for split in splits]

    def evaluator(self, model, split):
        """An engine over the split's ratings: engine.state.metrics["<split>_mse"], ..."""
        low, high = self.rating_range or (None, None)

        def evaluate_step(engine, batch):
            model.eval()
            users, items, ratings = batch[:3]
            with torch.no_grad():
                predictions = model(users, items)
            if low is not None:
                predictions = predictions.clamp(low, high)
            return predictions, ratings

        evaluator = Engine(evaluate_step)
        attach_rating_metrics(evaluator, lambda output: output, self.device, split)
        return evaluator

    def headline(self, final):
        return (f"test MSE {final['test_mse']:.4f} RMSE {final['test_rmse']:.4f} "
                f"MAE {final['test_mae']:.4f}")


def run_evaluators(task, evaluators):
    """Run each (splits, engine) of task.evaluators over its splits' batches: {"<split>_<metric>":
    value, ..., "<splits>_seconds": the engine's time} (the history's columns)."""
    found = {}
    for splits, evaluator in evaluators:
        evaluator.run(task.eval_batches[splits[0]])
        found.update({f"{s}_{m}": evaluator.state.metrics[f"{s}_{m}"] for s in splits for m in task.metric_names})
        found["_".join(splits) + "_seconds"] = round(evaluator.state.times[Events.COMPLETED.name], 3)
    return found


def attach_rating_metrics(engine, output_transform, device, split):
    """MSE, RMSE and MAE of (predictions, targets) as engine.state.metrics["<split>_mse"], ...
    (named as the history's columns). Ignite's metrics reduce their sums across processes, so
    each rank feeds its share."""
    mse = MeanSquaredError(output_transform, device=device)
    mse.attach(engine, f"{split}_mse")
    MetricsLambda(math.sqrt, mse).attach(engine, f"{split}_rmse")  # from MSE's sums: no second pass
    MeanAbsoluteError(output_transform, device=device).attach(engine, f"{split}_mae")


def ranking_interactions(cfg, ratings):
    """The ranking task's data: ratings -> loader.Interactions, the positives (implicit_feedback)
    split within each user (split_per_user) as cfg asks. benchmark.py's shared accounts replace
    it in their own process, to train persons on the split of the accounts they pool into."""
    rows, kept = loader.implicit_feedback(ratings, cfg["ranking_min_rating"], cfg["ranking_core"])
    data = loader.split_per_user(ratings, rows, fractions=(1 - cfg["val_fraction"] - cfg["test_fraction"],
                                                           cfg["val_fraction"], cfg["test_fraction"]),
                                 seed=cfg["split_seed"], how=cfg["split"])
    data.described = ratings.described + [kept] + data.described
    return data


class RankingTask:
    """Implicit feedback, every item ranked for every user (RecBole's ml-1m protocol): ratings
    >= ranking_min_rating are positives, a ranking_core-core filter, each user's interactions
    split at random train/val/test, and the rank metrics at top_k over all items the user has
    not met in training (nor in validation, when ranking for the test set)."""

    def __init__(self, cfg, ratings, device, rank, world_size):
        data = ranking_interactions(cfg, ratings)
        if cfg["top_k"] > data.n_items:
            raise loader.DataError(f"--top_k={cfg['top_k']} is larger than the number of items "
                              f"({data.n_items}) left by the filter")
        self.n_users, self.n_items, self.global_mean = data.n_users, data.n_items, 0.0
        self.described = data.described
        self.user_ids, self.item_ids = data.user_ids, data.item_ids
        # Indices kept to the run's end as int32 (ML-25M: 24.5M rows each; in int64 0.5 GiB more).
        index = np.int32 if max(data.n_users, data.n_items) < 2 ** 31 else np.int64
        self.split = (data.users.astype(index), data.items.astype(index), data.timestamps, data.part)  # split.parquet's rows
        # recommend.py's "already rated": every movie of the model the user rated, at any rating
        # (a movie rated 1 star is no recommendation), not only the positives it trained on.
        self.seen = tuple(pairs.astype(index) for pairs in loader.pairs_within(ratings, data.user_ids, data.item_ids))
        self.counts = {f"n_{name}": int((data.part == p).sum()) for p, name in enumerate(SPLITS)}
        self.k, self.loss_name = cfg["top_k"], cfg["loss"]
        self.metric_names = tuple(f"{m}@{self.k}" for m in RANK_METRICS)
        self.choose_by, self.higher_is_better = f"ndcg@{self.k}", True
        self.choose_label, self.sign, self.rating_range = f"NDCG@{self.k}", 1, None
        self.free_train_metrics = False  # rank metrics of the training items mean nothing
        self.term_weights = {cfg["loss"]: 1.0}
        ndcg = f"ndcg@{self.k}"
        self.plots = [(f"ndcg_at_{self.k}.svg", f"NDCG@{self.k}",
                       [(f"val_{ndcg}", "validation"), (f"test_{ndcg}", "test")], f"NDCG@{self.k}")]
        parts = {name: (torch.from_numpy(data.users[data.rows(p)]).to(device),
                        torch.from_numpy(data.items[data.rows(p)]).to(device))
                 for p, name in enumerate(SPLITS)}
        # Each training interaction's weight (--event_weights, --weight_column), None: all 1.
        train_weights = None if data.weights is None else torch.from_numpy(data.weights[data.rows(0)]).float().to(device)
        self.weighted = train_weights is not None
        # Per-user item lists (CSR-like) of each part, to gather a block of users' items at once.
        self.by_user = {name: loader.UserBatches(*parts[name], data.n_users, 1, shuffle=False)
                        for name in SPLITS}
        train_users, train_items = data.users[data.rows(0)], data.items[data.rows(0)]
        item_positives = np.bincount(train_items, minlength=data.n_items)       # (n_items,)
        self.softmax_items = softmax_items(cfg, data.n_items) if cfg["loss"] == "softmax" else None
        if cfg["loss"] == "softmax":
            most = RANKING_BATCH_SCORES // (self.softmax_items or data.n_items)
            probabilities = None
            if self.softmax_items:
                # The positives are scored pair by pair (about 150 bytes of indices and products
                # a pair): the users a step are bounded by them too.
                most = min(most, int(RANKING_BATCH_PAIRS // max(len(train_users) / data.n_users, 1)))
                # Half the draws by popularity, half uniform: a popular item carries more of a
                # user's normaliser (less variance than uniform draws), and a rare one still gets
                # pushed down (ML-1M, 1024 draws, validation NDCG@10: half 0.2283, uniform
                # 0.2227, 0.8 by popularity 0.2279; all by popularity, before the positives were
                # counted exactly, 0.1292 against half's 0.2170: rare items were never pushed down).
                probabilities = torch.from_numpy(0.5 * item_positives / max(item_positives.sum(), 1)
                                                 + 0.5 / data.n_items).float()
                self.log_draws = (probabilities * self.softmax_items).log().to(device)      # (n_items,)
            self.batch_size = softmax_batch_size(cfg, data.n_users, most)
            self.batches = loader.UserBatches(*parts["train"], data.n_users, self.batch_size,
                                              seed=cfg["seed"], rank=rank, world_size=world_size,
                                              columns=self.softmax_items or 0, probabilities=probabilities,
                                              weights=train_weights, grouped=self.by_user["train"])
        else:
            users, items = parts["train"]
            self.batch_size = cfg["batch_size"] or SAMPLED_BATCH
            # The rows' third tensor, unused by these losses as a target, carries their weights.
            self.batches = loader.NegativeBatches((users, items, torch.ones(len(users)) if train_weights is None
                                                   else train_weights),
                                                  self.batch_size, data.n_items, cfg["n_negatives"],
                                                  seed=cfg["seed"], rank=rank, world_size=world_size)
        # The pairs each row has in an epoch's prior: a positive's user and item, and with sampled
        # losses the user once more per negative and each item as a negative (in expectation).
        self.trained_items = item_positives > 0
        if self.softmax_items:
            self.described.append(f"ranking loss: a softmax over {self.softmax_items:,} of the {data.n_items:,} "
                                  f"items a step (drawn, half by popularity), {self.batch_size:,} users a step")
        per_positive = 1 if cfg["loss"] == "softmax" else 1 + cfg["n_negatives"]
        as_negative = 0 if cfg["loss"] == "softmax" else cfg["n_negatives"] * len(train_users) / data.n_items
        user_positives = np.bincount(train_users, minlength=data.n_users)                  # (n_users,)
        self.prior_scale = prior_scale(cfg, per_positive * user_positives, item_positives + as_negative, device,
                                       pairs_per_example=per_positive)
        self.dim = dim_for(cfg, user_positives, self.described)
        self.prior_weights = prior_weights(cfg, user_positives, self.described, self.dim)
        # The steps an epoch are the batches' own count, as the lr schedule takes them (train.py).
        self.lr_scale = (lr_scale(cfg, len(self.batches), self.batch_size, self.described)
                         if cfg["loss"] == "softmax" else 1.0)
        self.lr_decay = warm_down_share(cfg, self.lr_scale, self.described)
        # Evaluation goes over blocks of users; each rank takes every world_size-th user.
        eval_users = max(1, cfg["eval_batch_size"] // 16)  # a block's scores: 1024 x n_items
        self.eval_batches = {split: UserBlocks(data.n_users, eval_users, rank, world_size, device)
                             for split in ("val", "test") if self.counts[f"n_{split}"]}  # none: a fraction of 0
        self.device, self.world_size = device, world_size
        self.n_interactions = len(data)
        self.bfloat16 = bfloat16_products(cfg, torch.device(device), described=self.described,
                                          shape=None if self.softmax_items else
                                          (self.batch_size * 2 * cfg["n_tastes"], self.dim, self.n_items))
        self.share_taste_prior = cfg["share_taste_prior"]

    def loss(self, model, batch):
        if self.loss_name == "softmax":
            # Each user's training items against all items in one softmax (as Mult-VAE does),
            # and the prior of the batch's (user, item) pairs, as the rating task's, from counts.
            users, position, items, global_pairs, *rest = batch
            drawn = [rest[0]] if rest and rest[0] is not None else []
            weights = rest[1] if len(rest) > 1 else None                              # (P,) or None: all 1
            # A sampled softmax scores each drawn item once, weighted by its draws (sampled_log_softmax).
            columns, draws = padded_columns(*torch.unique(drawn[0], return_counts=True)) if drawn else (None, None)
            outputs = model(
                users, return_prior=True,
                user_counts=torch.bincount(position, minlength=len(users)).float(),
                item_counts=torch.bincount(items, minlength=self.n_items).float(),
                prior_scale=self.prior_scale, share_taste_prior=self.share_taste_prior,
                positives=(position, items), columns=columns)                 # (B, n_items or C)
            scores, squared_norms = outputs[:2]
            if drawn:
                log_p = sampled_log_softmax(scores, outputs[2], position, items, columns, draws, self.log_draws)
            else:
                log_p = torch.log_softmax(scores, dim=1)[position, items]
            # Each positive counts by its weight (a purchase more than a view): the mean over the
            # batch's weight, and this rank's share of the global batch by weight too.
            total = len(items) if weights is None else float(weights.sum())
            data_term = -(log_p.sum() if weights is None else (weights * log_p).sum()) / max(total, 1e-12)
            return {self.loss_name: data_term}, squared_norms, total * self.world_size / global_pairs, {}
        # A positive and its sampled negatives in one forward: (B, 1 + n) scores; the prior
        # covers every row the batch uses, the negatives' too.
        users, items, weights, global_batch, negatives = batch                    # negatives (B, n)
        scores, squared_norms = model(users, torch.cat([items.unsqueeze(1), negatives], dim=1),
                                      return_prior=True, prior_scale=self.prior_scale,
                                      share_taste_prior=self.share_taste_prior)
        positive, negative = scores[:, 0], scores[:, 1:]
        if self.loss_name == "sampled_softmax":
            terms = -torch.log_softmax(scores, dim=1)[:, 0]
        elif self.loss_name == "bpr":
            terms = -F.logsigmoid(positive.unsqueeze(1) - negative).mean(1)
        else:  # adaptive_hinge: the hardest of the n sampled negatives (Kula 2017)
            terms = torch.relu(1 - positive + negative.max(1).values)
        if not self.weighted:
            data_term = terms.sum() / max(len(terms), 1)
            return {self.loss_name: data_term}, squared_norms, len(terms) * self.world_size / global_batch, {}
        # Weighted rows: the mean by weight (the share of the global batch stays by rows).
        data_term = (weights * terms).sum() / weights.sum().clamp(min=1e-12)
        return {self.loss_name: data_term}, squared_norms, len(terms) * self.world_size / global_batch, {}

    def attach(self, trainer):
        """Nothing: the ranking task's training metrics are its evaluations."""

    def implicit_epochs(self, epochs):
        """None: the ranking task's losses do not change with the run's length."""

    def evaluators(self, model, splits):
        """[(splits, engine)]: one engine for all of splits, since the validation and the test
        ranking share their scores (every item for every user; the test one also drops the
        validation items): scoring once for both took an evaluation at ML-25M's shape from
        2 x 190 s to about 200 s."""
        return [(tuple(splits), self.evaluator(model, tuple(splits)))] if splits else []

    def evaluator(self, model, splits):
        """An engine over blocks of users, each step ranking every item once for all of splits
        (("val",), ("test",) or both): engine.state.metrics["<split>_ndcg@k"], ..."""
        def evaluate_step(engine, users):
            model.eval()
            with torch.no_grad():
                return self.ranked(model, users, splits)

        evaluator = Engine(evaluate_step)
        for split in splits:
            RankingMetrics(self.k, lambda out, split=split: out[split], self.device, f"{split}_").attach(evaluator, split)
        return evaluator

    def ranked(self, model, users, splits):
        """{split: (U, len(RANK_METRICS)) rank metrics of the block's users with held-out items
        there}, from one scoring of all items: validation ranks without the training items, test
        without the validation items too, masked in that order on the same block."""
        scores = getattr(model, "module", model).score_all(users)                  # (B, n_items)
        masked, ranked = set(), {}
        for split in sorted(splits, key=SPLITS.index):                             # val before test
            self.mask_known(scores, users, split, masked)
            ranked[split] = rank_metrics(scores, self.relevant(scores, users, split), self.k)
        return ranked

    def mask_known(self, scores, users, split, masked=None):
        """Set to -inf in scores (B, n_items) the items the block's users met before split: in
        training, and for test in validation too; masked: the parts already masked (updated)."""
        masked = set() if masked is None else masked
        for part in ("train",) if split == "val" else ("train", "val"):
            if part not in masked:
                position, items = self.by_user[part].pairs(users)
                scores[position, items] = -torch.inf
                masked.add(part)

    def relevant(self, scores, users, split):
        """(B, n_items) bool: the block's held-out items of split."""
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        position, items = self.by_user[split].pairs(users)
        relevant[position, items] = True
        return relevant

    def scores_and_relevant(self, model, users, split):
        """(scores, relevant), (B, n_items) each: the scores of all items for a block of users
        with their training items (and validation items, for test) at -inf, and the split's
        held-out items. `model` is anything with score_all (the baselines of benchmark.py too)."""
        scores = getattr(model, "module", model).score_all(users)                  # (B, n_items)
        self.mask_known(scores, users, split)
        return scores, self.relevant(scores, users, split)

    # What benchmark.py's baselines (anything with score_all) are measured with, the model's own
    # masking and metrics, on one process.

    def evaluate(self, model, split):
        """{"ndcg@k": ..., ...} of a model on "val" or "test" (training items masked)."""
        metric = RankingMetrics(self.k)
        metric.reset()
        for users in self.eval_batches[split]:
            metric.update(self.ranked(model, users, (split,))[split])
        return metric.compute()

    def per_user(self, model, split):
        """(n_users, len(RANK_METRICS)) float64: each user's rank metrics on the split, in user
        order; NaN for a user without held-out items there (too few interactions to split)."""
        found = torch.full((self.n_users, len(RANK_METRICS)), float("nan"), dtype=torch.float64)
        for users in self.eval_batches[split]:
            scores, relevant = self.scores_and_relevant(model, users, split)
            found[users[relevant.any(1)].cpu()] = rank_metrics(scores, relevant, self.k).cpu()
        return found

    def training_matrix(self):
        """The training interactions as a users x items scipy CSR matrix of ones."""
        from scipy.sparse import csr_matrix
        position, items = self.by_user["train"].pairs(torch.arange(self.n_users))
        return csr_matrix((np.ones(len(items), dtype=np.float32), (position.numpy(), items.numpy())),
                          shape=(self.n_users, self.n_items))

    def headline(self, final):
        labels = {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR", "hit": "Hit", "precision": "Precision"}
        return "test " + ", ".join(f"{labels[name]}@{self.k} {final[f'test_{name}@{self.k}']:.4f}"
                                   for name in RANK_METRICS)


AUTO_BATCH_STEPS, AUTO_BATCH_MOST, AUTO_STEPS_MOST = 64, 8192, 256
# The softmax ranking loss's batch_size=0: 256 users a step (ML-1M's tuned batch: 24 steps an
# epoch), the lr scaled down where that makes more steps (tasks.lr_scale). A fixed 256 at a fixed
# lr gave Amazon Beauty 88 steps an epoch: Adam at lr 0.03 moved every item vector 3.7 times as
# far an epoch as on ML-1M, the training loss climbed for 5 epochs and the mixture ended a quarter
# below one taste (docs/research/ranking-rounds.md, "Amazon"). Where 256 users would make more than
# AUTO_STEPS_MOST steps an epoch (ML-25M: 635), and with lr_steps=0, the batch grows instead to
# keep 24 steps an epoch (ML-25M: 6,773 users): every step updates the whole tables (dense Adam),
# which at that size costs more than the step's scores (batch_size_for). Each step's (users x
# items) scores are at most 2**25 (128 MiB in float32).
RANKING_BATCH_LEAST, RANKING_BATCH_STEPS, RANKING_BATCH_SCORES = 256, 24, 2 ** 25
SAMPLED_BATCH = 256  # the sampled losses' batch_size=0: the interactions a step they were measured at
# softmax_items=0: every item in each step's softmax up to SOFTMAX_ALL_UP_TO items (ML-1M's 3,123),
# above it SOFTMAX_SAMPLE items drawn a step, at most half the catalogue (Amazon Beauty's 12,101
# items: a third, the epoch 2.0x faster; Sports' 18,357: 2.5x; ML-25M's 59,047: 14x fewer scores
# a step). On the Amazon sets the sample ranks as the full softmax did (validation NDCG@10, means
# of three seeds: Beauty 0.0603 against 0.0604, Sports 0.0422 against 0.0424; docs/ranking.md,
# the ninth round); on ML-1M a third of the items drawn cost 3% (docs/scale.md), so it keeps
# them all. The sampled steps' users are also bounded by their positives, RANKING_BATCH_PAIRS a
# step; bounded by the positives' (P, 2K, d) floats of an earlier version (ML-25M: 1,727 users,
# 95 steps at the full lr), the training loss climbed from 10.5 to 16.0 over the first three
# epochs, as Amazon Beauty's did at 88 steps.
SOFTMAX_ALL_UP_TO, SOFTMAX_SAMPLE, RANKING_BATCH_PAIRS = 2 ** 13, 4096, 2 ** 21
PAD_COLUMNS_TO = 512  # a sampled step's columns, padded (padded_columns)


def softmax_items(cfg, n_items):
    """The items a step's softmax is sampled over (softmax_items), or None for all of them."""
    wanted = cfg["softmax_items"] or (SOFTMAX_SAMPLE if n_items > SOFTMAX_ALL_UP_TO else n_items)
    return None if wanted >= n_items else wanted


def padded_columns(columns, draws, multiple=PAD_COLUMNS_TO):
    """A step's distinct drawn items (U,) and their draw counts, padded to a multiple of
    `multiple` columns by repeating the first item with no draws: a padding column's weight in
    the normaliser is log 0 = -inf, so the log-probabilities are those of the U columns
    (tests/test_ranking.py). Why: U differs from step to step (the distinct items of the
    draws), so every (users x U) tensor of the step had its own size, and glibc's heap
    (runs.keep_freed_memory keeps every block in it) never reused the holes they left: 2,700
    more free chunks an epoch and 0.9 GiB more resident memory, to 11.4 GiB at the run's end. In
    few sizes the step's blocks fit the holes of the steps before: the heap stays near 5.6 GiB."""
    pad = -len(columns) % multiple
    return torch.cat([columns, columns[:1].expand(pad)]), torch.cat([draws, draws.new_zeros(pad)])


def sampled_log_softmax(scores, positive_scores, position, items, columns, draws, log_draws):
    """Each positive's log-probability under the softmax over all items, its normaliser made of
    the user's own positives, exactly, and the other items estimated from C draws with
    replacement by probabilities q (logQ correction: their sum of exp(s_j) is estimated by
    (1/C) sum over the draws of exp(s_c) / q_c). The user's positives carry most of a trained
    model's normaliser: estimated from draws, the rare ones among them would be missed or
    overweighted (on ML-1M, 1024 draws: validation NDCG@10 0.2170 against the full softmax's
    0.2357).
    scores: (B, U) the users' scores of the U distinct drawn items, columns (U,), draws (U,) how
    often each was drawn, in any order; positive_scores, position, items (P,): the positive
    pairs; log_draws (n_items,) log(C q). With every item drawn once at q = 1/n this is
    log_softmax exactly (tests/test_ranking.py)."""
    batch = len(scores)
    # The user's own positives, exactly: a logsumexp per user over its pairs.
    top = scores.new_full((batch,), -torch.inf).scatter_reduce(0, position, positive_scores.detach(), "amax")
    own = scores.new_zeros(batch).index_add(0, position, torch.exp(positive_scores - top[position]))
    log_own = own.log() + top                                                      # (B,)
    # The drawn items that are not the user's positives, each weighted count / (C q).
    in_order, order = torch.sort(columns, stable=True)  # a repeated item: its first column, the drawn one
    found = torch.searchsorted(in_order, items).clamp(max=len(columns) - 1)        # (P,)
    drawn_positive, hit = in_order[found] == items, order[found]                  # (P,): the positive's column
    weighted = scores + (draws.log() - log_draws[columns])                         # (B, U)
    weighted = weighted.index_put((position[drawn_positive], hit[drawn_positive]),
                                  weighted.new_tensor(-torch.inf))
    log_normaliser = torch.logaddexp(log_own, torch.logsumexp(weighted, dim=1))    # (B,)
    return positive_scores - log_normaliser[position]                             # (P,)


# "auto" trains in bfloat16 on a CPU only where the step's matrix product runs at least this many
# times faster in it than in float32, measured (bfloat16_speedup): native bfloat16 instructions
# alone do not say it. On an AMD EPYC with AVX512-BF16 the products took a fifth of their float32
# time; on an Intel Xeon with AVX512-BF16 (its AMX hidden by the hypervisor) 1.7x their float32
# time, whose products MKL runs at full AVX-512 speed: there bfloat16 made ML-1M's whole run 16%
# slower and its peak memory 55% larger (docs/speed.md).
BFLOAT16_SPEEDUP = 1.25


def bfloat16_products(cfg, device, shape=None, described=None):
    """Whether the ranking task's training forward runs under bfloat16 autocast (train.py's
    mixed_precision). Its full-softmax step is matrix products, every user of the batch against
    every item (ML-1M: 1024 x 160 by 160 x 3123, forward and backward). Where bfloat16 is emulated
    it is slower than float32, so "auto" asks the hardware of the run's own device: a GPU by its
    compute capability, a CPU by its instructions and, given the step's shape (rows, d, columns),
    by timing its product both ways (BFLOAT16_SPEEDUP). shape None: a sampled softmax's step,
    whose memory rather than its products bounds the run: bfloat16, which halves its largest
    tensors, is kept wherever native (ML-25M's shape on the Intel Xeon: float32's steps 13%
    faster in isolation, 4% in the whole run, its peak over the 6 GB bound; docs/scale.md).
    described: a list the measured choice is said in. Rank 0 alone measures (the others wait at
    the broadcast, so no two timings share the cores) and every process takes its figure: all
    train alike."""
    if cfg["mixed_precision"] != "auto":
        return cfg["mixed_precision"] == "bfloat16"
    if cfg["loss"] != "softmax":  # the sampled losses run through the fused node, in float32
        return False
    if not native_bfloat16(device):
        return False
    if torch.device(device).type != "cpu" or shape is None:
        return True
    speedup = bfloat16_speedup(*shape) if idist.get_rank() == 0 else 0.0
    speedup = idist.broadcast(torch.tensor(speedup, dtype=torch.float64), src=0).item()
    chosen = speedup >= BFLOAT16_SPEEDUP
    if described is not None:
        described.append(f"training products in {'bfloat16' if chosen else 'float32'}: bfloat16's ran "
                         f"{speedup:.2f}x float32's speed on this CPU (auto takes it from {BFLOAT16_SPEEDUP}x)")
    return chosen


def bfloat16_speedup(rows, dim, columns, repeats=5):
    """float32's time over bfloat16's for a (rows, dim) by (dim, columns) matrix product on this
    CPU: the best of repeats of each, alternated so that a moment of the machine's drift weighs
    on both; rows and columns capped (1024, 4096) to keep the measurement near 0.1 s. The
    operands come from a generator of their own: the run's seeded draws are not touched."""
    generator = torch.Generator().manual_seed(0)
    left = torch.rand(min(rows, 1024), dim, generator=generator)
    right = torch.rand(min(columns, 4096), dim, generator=generator)
    operands = {dtype: (left.to(dtype), right.T.contiguous().to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, math.inf)
    for repeat in range(repeats + 1):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            if repeat:  # the first of each builds its kernel
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def batch_size_for(cfg, n_train, steps=AUTO_BATCH_STEPS, most=AUTO_BATCH_MOST, least=1, most_steps=None):
    """The global batch: batch_size, or for batch_size=0 n_train / steps within [least, most]
    (n_train: ratings, users or interactions, as batch_size counts). Early stopping and the epoch cap count
    epochs; with one fixed batch a set ten times smaller has ten times fewer steps per epoch (ML-
    100K: 9 of 8192 ratings), so its runs stop on a handful of steps' progress and need ten times
    the epochs. At least 64 steps make an epoch mean about the same progress on any set; 8192
    keeps the large sets' steps few and fast (measured in docs/rating.md, "Defaults that hold").
    most_steps, if given, lifts the batch past most where an epoch would take more steps: every
    step updates the whole embedding tables (dense Adam), so at ML-25M's size 2,132 steps of
    8,192 ratings spent 23 of an epoch's 69 s in the optimiser; 256 steps of 68,206 took the
    epoch to 25 s, at a better one-epoch validation MSE (0.8485 against 0.8601; docs/scale.md).
    ML-1M (87 steps) and every set under 2.1M training ratings keep the rule above."""
    if cfg["batch_size"]:
        return cfg["batch_size"]
    batch = max(1, min(most, max(least, math.ceil(n_train / steps))))
    return max(batch, math.ceil(n_train / most_steps)) if most_steps else batch


def softmax_batch_size(cfg, n_users, most):
    """The softmax loss's users a step (batch_size, or for 0 the rule of RANKING_BATCH_LEAST's
    comment): 256 where that makes at most AUTO_STEPS_MOST steps an epoch (the lr then scaled by
    lr_scale), else, or with lr_steps=0, as many as keep 24 steps an epoch; never more than most
    (the scores' and positives' bounds of a step)."""
    least = max(1, min(most, RANKING_BATCH_LEAST))
    if cfg["lr_steps"] and math.ceil(n_users / least) <= AUTO_STEPS_MOST:
        return cfg["batch_size"] or least
    return batch_size_for(cfg, n_users, RANKING_BATCH_STEPS, max(1, most), RANKING_BATCH_LEAST)


def prior_scale(cfg, user_pairs, item_pairs, device, pairs_per_example=1):
    """MFMixTaste's prior_scale from the pairs each user and item has in an epoch (numpy
    arrays): one over them for prior_per="row", so each row's prior counts once per epoch, or
    None for prior_per="pair". The model averages the prior over the pairs a batch scores, and
    the data term is a mean over examples; with sampled losses an example scores
    pairs_per_example pairs (a positive and its negatives), and the scale carries that factor
    back, so that a weight counts like that many examples for every loss."""
    if cfg["prior_per"] == "pair":
        return None
    return tuple(torch.from_numpy(pairs_per_example / np.maximum(pairs, 1)).float().to(device)
                 for pairs in (user_pairs, item_pairs))


def lr_scale(cfg, steps, batch, described):
    """The factor on lr for the softmax loss: lr_steps / the steps of an epoch, where that is
    under 1. Adam moves every item vector about lr a step whatever its gradient (every item is
    in every step's softmax), so an epoch of more steps moves them further: Amazon Beauty at 256
    users a step has 88 steps an epoch against ML-1M's 24, and at ML-1M's lr its training loss
    climbed for five epochs. Growing the batch to keep 24 steps (lr_steps=0, the earlier rule)
    cures that; keeping 256 users a step and scaling the lr cures it better (validation NDCG@10,
    means of three seeds: Beauty +3%, Sports +5%; docs/research/ranking-rounds.md, eighth round). ML-1M (24
    steps) keeps lr as it is."""
    if not cfg["lr_steps"] or steps <= cfg["lr_steps"]:
        return 1.0
    scale = cfg["lr_steps"] / steps
    described.append(f"lr x{scale:.3f} ({cfg['lr'] * scale:.3g}): {steps:,} steps an epoch of {batch:,} users, "
                     f"lr is set for {cfg['lr_steps']} (lr_steps)")
    return scale


def warm_down_share(cfg, scale, described):
    """The share of the run, at its end, over which lr falls (train.py's lr_decay where lr is
    not scaled). Where lr_scale scales lr down for an epoch of more steps than lr_steps, the peak
    is held for as many steps as on data of lr_steps steps an epoch, (1 - lr_decay) x epochs x
    lr_steps (108 at the defaults), not for as many epochs: the warm-down takes the rest. Amazon
    Beauty (88 steps an epoch) falls over the last 92% of its run, Sports (140) over 95%; ML-1M
    (24) keeps 70%. Measured (docs/research/ranking-rounds.md, eleventh round): a warm-down over the whole run
    gave Beauty +0.7% validation NDCG@10 (three seeds) and Sports +1.9%, and cost ML-1M 0.6%;
    this rule gives each its own."""
    if not cfg["lr_decay"] or scale >= 1.0:
        return cfg["lr_decay"]
    share = 1 - (1 - cfg["lr_decay"]) * scale
    held = (1 - cfg["lr_decay"]) * cfg["epochs"] * cfg["lr_steps"]
    described.append(f"lr falls over the last {share:.1%} of the run, its peak held {held:.0f} steps: as at "
                     f"lr_decay {cfg['lr_decay']:g} over {cfg['epochs']} epochs of {cfg['lr_steps']} steps (lr_steps)")
    return share


# dim=0 (the ranking defaults): d from the data. DIM_FOR_RICH_USERS where users have
# prior_user_pairs interactions or more (ML-1M: 160, its figures and its speed), growing with the
# fourth root of how many times sparser the users are, at most DIM_GROWTH_MOST times, in steps of
# DIM_STEP: Amazon Beauty (6.7 a user: x15) and Sports (6.2: x16) d=320.
DIM_FOR_RICH_USERS, DIM_GROWTH_MOST, DIM_STEP = 160, 2.0, 32


def dim_for(cfg, user_pairs, described):
    """d of the model: cfg's dim, or with dim=0 the rule above. On sparse product data the
    user-side priors are many times ML-1M's (prior_weights), and it is there that a larger d
    paid: Amazon Beauty at d=320 +4% validation NDCG@10 over d=160, d=640 no better (means of
    seeds, docs/research/ranking-rounds.md, tenth round), while ML-1M at d=320 gains 1% for twice its time.
    A sampled step (above SOFTMAX_ALL_UP_TO items) pays for it: Beauty's epoch at d=320 costs
    what d=160's full softmax did."""
    if cfg["dim"]:
        return cfg["dim"]
    mean, factor = loader.sparsity(user_pairs, cfg["prior_user_pairs"])
    growth = min(DIM_GROWTH_MOST, factor ** 0.25)
    dim = max(DIM_STEP, DIM_STEP * round(DIM_FOR_RICH_USERS * growth / DIM_STEP))
    described.append(f"d={dim}: {mean:.1f} training interactions a user, d={DIM_FOR_RICH_USERS} is set for "
                     f"{cfg['prior_user_pairs']:g} or more (dim=0: tasks.dim_for)")
    return dim


def prior_weights(cfg, user_pairs, described, dim):
    """The L2 prior's weight of each term of MFMixTaste.PRIOR_TERMS (a dict), from the prior_*
    knobs. With prior_per="pair" a user's whole prior grows with their training interactions
    (user_pairs, (n_users,)), so a weight chosen on ML-1M (112 a user) holds a user of Amazon
    Beauty (6.7) 17 times more loosely: there the best weights of the user side were about 16
    times ML-1M's at d=160, K=1 and K=2 alike (docs/research/ranking-rounds.md, seventh round). So the tastes'
    and attention's weights are scaled by f = prior_user_pairs / the mean interactions of a user
    with any, where that is over 1: a set as rich as the one the weights were chosen on keeps
    them exactly. Above d=160 (the model's dim) less of that excess is wanted: the scale is
    1 + (f - 1) sqrt(160 / d). On Beauty the best factor was x16 at d=160, x11 at d=320 (against
    x15: +1.3% validation NDCG@10 on two seeds) and x8 at d=640; on ML-1M (f = 1) d=320 wanted
    its weights as they are (x0.71 lost 2%). The item side is left as measured (one weight)."""
    weights = {name: cfg[f"prior_{name}"] for name in PRIOR_TERMS}
    if cfg["prior_per"] != "pair" or not cfg["prior_user_pairs"]:
        return weights
    mean, sparser = loader.sparsity(user_pairs, cfg["prior_user_pairs"])
    scale = 1 + (sparser - 1) * math.sqrt(DIM_FOR_RICH_USERS / max(dim, DIM_FOR_RICH_USERS))
    if scale > 1:
        weights["tastes"] *= scale
        weights["attention"] *= scale
        described.append(f"prior on tastes and attention x{scale:.2f} ({weights['tastes']:.3g}, "
                         f"{weights['attention']:.3g}): {mean:.1f} training interactions a user, "
                         f"the weights are set for {cfg['prior_user_pairs']:g} (prior_user_pairs)"
                         + (f" at d={DIM_FOR_RICH_USERS}, this is d={dim}" if dim > DIM_FOR_RICH_USERS else ""))
    return weights


class UserBlocks:
    """Every user once, in order, in blocks; rank r of world_size takes every world_size-th."""

    def __init__(self, n_users, block, rank=0, world_size=1, device="cpu"):
        self.users = torch.arange(rank, n_users, world_size, device=device)
        self.block = block

    def __len__(self):
        return max(1, -(-len(self.users) // self.block))

    def __iter__(self):
        for start in range(0, max(len(self.users), 1), self.block):
            yield self.users[start:start + self.block]


def top_k_items(scores, k):
    """(values, items) of the k highest scores per row, (B, k) each, best first. Ties are
    broken by item index, lower first (as a stable sort would), so results never depend on
    how torch.topk orders equal values; rows without a tie pay only for topk. A tie across the
    cut shows as the (k+1)-th value equal to the k-th: one topk of k+1 finds it, where counting
    the scores equal to the k-th read the whole (B, n_items) block again (4x the topk's time)."""
    values, items = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
    tied = (values[:, 1:] == values[:, :-1]).any(1)  # within the k, or the k-th and the (k+1)-th
    values, items = values[:, :k], items[:, :k]
    if tied.any():
        sorted_values, order = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied], items[tied] = sorted_values[:, :k], order[:, :k]
    return values, items


def rank_metrics(scores, relevant, k):
    """Per-user NDCG, Recall, MRR, Hit and Precision at k (columns in RANK_METRICS order) for the
    rows with at least one relevant item. scores: (B, n_items), -inf for masked items, which
    never count as hits; relevant: (B, n_items) bool, the held-out items. Binary relevance;
    the ideal DCG is over min(#relevant, k) items."""
    keep = relevant.any(1)  # the rows kept after the top k, not before: no copy of the (B, n_items) blocks
    values, items = top_k_items(scores, k)
    hits = (relevant.gather(1, items) & torch.isfinite(values))[keep]            # (U, k)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores.device, dtype=torch.float64))
    n_relevant = relevant.sum(1)[keep]                                            # (U,)
    ideal = torch.cumsum(discounts, 0)[n_relevant.clamp(max=k) - 1]
    n_hits = hits.sum(1).double()
    first_hit = torch.where(hits.any(1), 1.0 / (hits.double().argmax(1) + 1), 0.0)
    return torch.stack([(hits.double() * discounts).sum(1) / ideal, n_hits / n_relevant,
                        first_hit, (n_hits > 0).double(), n_hits / k], dim=1)


class RankingMetrics(Metric):
    """The rank metrics at k averaged over users with held-out items, from batches of per-user
    rows (U, len(RANK_METRICS)) of rank_metrics; compute() returns {"<prefix>ndcg@k": ...,
    "<prefix>recall@k": ...}, which Ignite also spreads into engine.state.metrics. The sums are
    all-reduced across processes."""

    def __init__(self, k, output_transform=lambda x: x, device="cpu", prefix=""):
        self.k, self.prefix = k, prefix
        super().__init__(output_transform, device=device)

    @reinit__is_reduced
    def reset(self):
        self._sums = torch.zeros(len(RANK_METRICS), dtype=torch.float64, device=self._device)
        self._users = torch.zeros((), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, values):
        self._sums += values.sum(0).to(self._device)
        self._users += len(values)

    @sync_all_reduce("_sums", "_users")
    def compute(self):
        if self._users == 0:
            raise NotComputableError("RankingMetrics needs at least one user with held-out items")
        return {f"{self.prefix}{name}@{self.k}": float(total / self._users)
                for name, total in zip(RANK_METRICS, self._sums)}


TASKS = {"rating": RatingTask, "ranking": RankingTask}
LOSSES = ("softmax", "sampled_softmax", "bpr", "adaptive_hinge")  # of the ranking task
