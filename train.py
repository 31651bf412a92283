"""Train a mixture-of-tastes model on MovieLens: rating prediction or top-N ranking.

    python train.py                                     # rating: defaults below
    python train.py --task=ranking                      # ranking: implicit feedback, NDCG@10
    python train.py --dataset=ml-100k --epochs=5 --run_name=try
    python train.py --resume=runs/try --epochs=10       # continue a run where it stopped
    torchrun --nproc_per_node=2 train.py                # several processes (see README)

Every hyperparameter is a constant just below; any of them can be overridden as --key=value.
TensorBoard curves and checkpoints go to runs/<run_name>/, the final figures to
results/<run_name>/ (summary.json, metrics.csv, SVG plots). Exit status: 0 done (or nothing
left to do), 1 training diverged, 2 bad input (one line says what and where), 130 interrupted.
"""

import ast
import csv
import ctypes
import gc
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import ignite
import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.handlers import (
    Checkpoint,
    DiskSaver,
    EarlyStopping,
    ProgressBar,
    TerminateOnNan,
    global_step_from_engine,
)
from ignite.handlers.tensorboard_logger import TensorboardLogger
from ignite.metrics import Average, MeanAbsoluteError, MeanSquaredError, Metric, RootMeanSquaredError
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

import loader
from MFMixTaste import PRIOR_TERMS, MFMixTaste

# -----------------------------------------------------------------------------
task = "rating"            # "rating": predict explicit ratings (MSE); "ranking": rank all items per user (implicit)
# data
dataset = "ml-1m"          # MovieLens variant: ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-32m, ml-latest-small
data_dir = "data"          # folder holding <dataset>.zip or its extracted folder; downloads go here
download = True            # download from GroupLens when no local copy is found
test_fraction = 0.25       # rows held out for test, drawn as the replaced script did (seed 42, in file order)
val_fraction = 0.05        # share of the training rows held out for early stopping and model choice
split_seed = 42            # seed of the train/test and train/val splits (42 = the replaced script's split)
# ranking (task="ranking"): RecBole's ml-1m protocol, each user's interactions split train/val/test
ranking_min_rating = 3.0   # a rating >= this is a positive interaction (the value is then dropped)
ranking_core = 10          # users and items with fewer positives are removed, repeatedly until none is
loss = "softmax"           # ranking loss: softmax (all items), sampled_softmax, bpr, adaptive_hinge (Kula's)
n_negatives = 100          # uniform negatives per positive (sampled_softmax, bpr, adaptive_hinge takes the hardest)
top_k = 10                 # cut-off k of NDCG, Recall, MRR, Hit and Precision; validation NDCG@k picks the epoch
# model
dim = 32                   # latent dimension d of tastes, attention and item vectors
n_tastes = 2               # tastes per user, K (1 = biased matrix factorisation)
init_std = 0.01            # std of the factors at start (see MFMixTaste.__init__)
# L2 prior: loss = MSE + (1/n_train) * sum over rows of weight * |row|^2 (prior_per="row"), a
# Gaussian prior on each user's and item's vectors. A row's prior does not grow with its ratings,
# so a weight counts like that many ratings: a user's bias with n ratings shrinks by n / (n +
# weight), a lot at 10 ratings, hardly at 1000, and sparse sets are held back where dense ones
# are not. One setting serves ML-1M and sets a tenth its size (results/benchmark.md, "Defaults
# across data sizes"); the per-rating weighting ("pair") needed a weight per dataset.
prior_per = "row"          # "row": each row counted once per epoch; "pair": once per rating that uses it (SGD-MF's weighting)
prior_tastes = 5.0         # on the users' taste vectors U
prior_attention = 0.5      # on the attention vectors A: they only pick among the tastes (at 5 they stay at 0: one taste)
prior_items = 10.0         # on the item vectors e
prior_biases = 3.0         # on user and item biases
# optimisation
lr = 5e-3                  # Adam learning rate
batch_size = 0             # per step (the global batch): ratings; for ranking, users (softmax) or interactions;
                           # 0 = n_train / 64 up to 8192 (ML-1M: 8192, ML-100K: ~1100), see batch_size_for
epochs = 50                # most epochs to run
patience = 2               # early stopping: epochs without a better validation MSE (NDCG@k) before stopping
clip_predictions = True    # clamp evaluated predictions to the training set's rating range
eval_train = False         # training-set metrics from a full pass after each epoch (else, free, from the epoch's own batches)
eval_batch_size = 16384    # ratings per evaluation batch (temporaries under 32 MB, see keep_freed_memory); ranking: /16 users
# system
seed = 0                   # seeds initialisation and shuffling; the same seed gives the same run
device = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
threads = 0                # CPU threads for torch (0 = torch's default)
# logging and output
log_interval = 10          # log the training loss and prior terms every this many iterations
run_name = ""              # runs/<run_name>/ and results/<run_name>/ ("" = dataset, K and a timestamp)
runs_dir = "runs"          # TensorBoard events, checkpoints and config of each run
results_dir = "results"    # summary.json, metrics.csv and plots of each finished run
resume = ""                # a run folder (runs/<name>) to continue from its last checkpoint
progress = True            # show Ignite's progress bar
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# What --task=ranking changes in the defaults above (an explicit --key=value still wins): chosen
# on ML-1M's validation NDCG@10 (README, "Ranking").
RANKING_DEFAULTS = dict(test_fraction=0.1, val_fraction=0.1, split_seed=2020, dim=64, n_tastes=2,
                        prior_per="pair", prior_tastes=0.03, prior_attention=0.03,
                        prior_items=0.03, prior_biases=0.0, lr=0.01, batch_size=256, epochs=60,
                        patience=3)
LOSSES = ("softmax", "sampled_softmax", "bpr", "adaptive_hinge")
PRIOR_PER = ("row", "pair")

# What a resumed run may change; the rest is fixed by its checkpoint and saved config.
CHANGEABLE_ON_RESUME = {"resume", "epochs", "patience", "data_dir", "download", "device",
                        "threads", "log_interval", "progress", "eval_train", "eval_batch_size",
                        "results_dir"}


class ConfigError(Exception):
    """A bad command line or run folder: the message says which key or path."""


class TrainingError(Exception):
    """Training itself failed (the loss diverged): the message says when and what was kept."""


def parse_overrides(argv, defaults):
    """--key=value pairs -> {key: value}, typed like the default; unknown keys are errors."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments are --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown hyperparameter {key!r}; valid keys: {', '.join(defaults)}")
        overrides[key] = _typed(key, text, defaults[key])
    return overrides


def _typed(key, text, default):
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} takes True or False, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"--{key} takes a {type(default).__name__}, got {text!r}")
    return value


def check(cfg):
    """Values that would fail later, refused before anything runs."""
    positive = ("dim", "n_tastes", "epochs", "eval_batch_size", "log_interval", "lr")
    for key in positive:
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    for key in ("patience", "threads", "init_std", "batch_size") + tuple(f"prior_{name}" for name in PRIOR_TERMS):
        if cfg[key] < 0:
            raise ConfigError(f"--{key} must not be negative, got {cfg[key]}")
    if not 0 < cfg["test_fraction"] < 1 or not 0 < cfg["val_fraction"] < 1:
        raise ConfigError("--test_fraction and --val_fraction must lie strictly between 0 and 1")
    for key, valid in (("task", ("rating", "ranking")), ("loss", LOSSES), ("prior_per", PRIOR_PER)):
        if cfg[key] not in valid:
            raise ConfigError(f"--{key}={cfg[key]} is not one of {', '.join(valid)}")
    if cfg["top_k"] < 1 or cfg["n_negatives"] < 1 or cfg["ranking_core"] < 1:
        raise ConfigError("--top_k, --n_negatives and --ranking_core must be positive")
    if cfg["task"] == "ranking" and cfg["test_fraction"] + cfg["val_fraction"] >= 1:
        raise ConfigError("--test_fraction and --val_fraction leave nothing to train on")
    if cfg["device"] != "auto":
        try:
            torch.device(cfg["device"])
        except RuntimeError:
            raise ConfigError(f"--device={cfg['device']} is not a device: use auto, cpu, cuda or "
                              "cuda:<index>") from None


def resolve_config(argv):
    """Defaults, then the resumed run's saved config, then the command line."""
    overrides = parse_overrides(argv, DEFAULTS)
    cfg = dict(DEFAULTS)
    if overrides.get("resume"):
        run_dir = Path(overrides["resume"])
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ConfigError(f"--resume={run_dir}: no run there ({saved} is missing)")
        try:
            cfg.update({k: v for k, v in json.loads(saved.read_text()).items() if k in DEFAULTS})
        except (ValueError, AttributeError):
            raise ConfigError(f"--resume={run_dir}: {saved} is not a valid config file") from None
        fixed = sorted(k for k, v in overrides.items()
                       if k not in CHANGEABLE_ON_RESUME and v != cfg[k])
        if fixed:
            raise ConfigError(f"--resume={run_dir}: {', '.join(fixed)} cannot change when resuming "
                              "(the checkpoint fixes them); start a new run instead")
        cfg["run_name"], cfg["runs_dir"] = split_run_path(run_dir, cfg["run_name"])
    elif overrides.get("task", cfg["task"]) == "ranking":
        cfg.update(RANKING_DEFAULTS)
    cfg.update(overrides)
    check(cfg)
    return cfg


def split_run_path(run_dir, saved_name):
    """A run folder -> (run_name, runs_dir). The saved name may have several parts (exp/a): it is
    kept when the folder's path ends with it, so results go to results/exp/a as before; a folder
    moved or renamed since is named after its last part."""
    name_parts = Path(saved_name).parts
    if name_parts and run_dir.parts[-len(name_parts):] == name_parts:
        return saved_name, str(Path(*run_dir.parts[:-len(name_parts)] or ["."]))
    return run_dir.name, str(run_dir.parent)


def decide_run_name(cfg):
    """--run_name, else dataset, K and a timestamp, decided by rank 0 alone: each process
    reading its own clock could cross a second boundary and name a different run."""
    if cfg["run_name"]:
        return cfg["run_name"]
    name = f"{cfg['dataset']}-K{cfg['n_tastes']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return idist.broadcast(name, src=0) if idist.get_world_size() > 1 else name


SPLITS = ("train", "val", "test")
RANK_METRICS = ("ndcg", "recall", "mrr", "hit", "precision")


class History:
    """Per-epoch metrics and accumulated wall time, saved with the checkpoints so that a resumed
    run writes one complete metrics.csv."""

    def __init__(self):
        self.rows, self.wall_seconds = [], 0.0

    def state_dict(self):
        return {"rows": self.rows, "wall_seconds": self.wall_seconds}

    def load_state_dict(self, state):
        self.rows, self.wall_seconds = list(state["rows"]), float(state["wall_seconds"])


def keep_freed_memory():
    """Ask glibc to keep freed memory in the heap instead of returning it to the OS at once.

    Each step allocates and frees batch-sized temporaries of several MB. By default glibc
    hands those back to the kernel and the next step faults them in again, page by page:
    on ML-1M that was 24 s of system time in a 40 s run; with this, 1.8 s in a 25 s run.
    Only process-local allocator settings change; elsewhere than glibc it does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed: blocks < 32 MB from the heap
    mallopt(m_trim_threshold, 1 << 30)   # shrink the heap only past 1 GB of free top
    mallopt(m_top_pad, 64 << 20)         # grow it 64 MB at a time


def pick_device(name):
    if name == "auto" or (name == "cuda" and idist.get_world_size() > 1):
        return idist.device()  # cuda:<local rank> when CUDA is there, else cpu
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available on this machine")
    return device


# ----------------------------------------------------------------------------- the two tasks
# What differs between rating and ranking lives here, behind one interface that training() uses:
# data and batches, the loss of a batch, the evaluators and their metrics, and which validation
# metric chooses the epoch.

class RatingTask:
    """Explicit ratings: squared error on the replaced script's 75/25 split (loader.split)."""

    def __init__(self, cfg, ratings, device, rank, world_size):
        rows = loader.split(len(ratings), cfg["test_fraction"], cfg["val_fraction"], cfg["split_seed"])
        tensors = {name: ratings.tensors(r, device) for name, r in zip(SPLITS, rows)}
        train_ratings = ratings.ratings[rows[0]]
        self.n_users, self.n_items = ratings.n_users, ratings.n_items
        # Raw ids of the rows and every (user, item) the data has: recommend.py's "already rated".
        self.user_ids, self.item_ids = ratings.user_ids, ratings.item_ids
        self.seen = (ratings.users, ratings.items)
        self.global_mean = float(train_ratings.mean())
        self.rating_range = ((float(train_ratings.min()), float(train_ratings.max()))
                             if cfg["clip_predictions"] else None)
        self.counts = {f"n_{name}": len(r) for name, r in zip(SPLITS, rows)}
        self.metric_names, self.choose_by, self.higher_is_better = ("mse", "rmse", "mae"), "mse", False
        self.choose_label = "MSE"
        self.free_train_metrics = not cfg["eval_train"]  # from the epoch's own batches
        self.data_term_name = "mse"
        self.plots = [("train_mse.svg", "Training MSE", [("train_mse", "train")], "MSE"),
                      ("test_mse.svg", "Test MSE", [("test_mse", "test")], "MSE")]
        self.batch_size = batch_size_for(cfg, len(rows[0]))
        self.batches = loader.BatchIterator(tensors["train"], self.batch_size, seed=cfg["seed"],
                                            rank=rank, world_size=world_size)
        self.prior_scale = prior_scale(cfg, np.bincount(ratings.users[rows[0]], minlength=self.n_users),
                                       np.bincount(ratings.items[rows[0]], minlength=self.n_items), device)
        self.eval_batches = {split: loader.BatchIterator(tensors[split], cfg["eval_batch_size"],
                                                         shuffle=False, rank=rank, world_size=world_size)
                             for split in SPLITS}
        self.device, self.world_size = device, world_size

    def loss(self, model, batch):
        """-> (data term, (4,) prior squared norms, this rank's share of the global batch, and
        what the free training metrics read)."""
        users, items, targets, global_batch = batch
        predictions, squared_norms = model(users, items, return_prior=True,
                                           prior_scale=self.prior_scale)
        # A rank's share of a short last batch can be empty: its loss is then 0, not NaN.
        mse = (predictions - targets).pow(2).sum() / max(len(targets), 1)
        share = len(targets) * self.world_size / global_batch
        return mse, squared_norms, share, {"predictions": predictions.detach(), "targets": targets}

    def attach_train_metrics(self, trainer):
        attach_rating_metrics(trainer, lambda out: (out["predictions"], out["targets"]), self.device)

    def evaluator(self, model, split):
        low, high = self.rating_range or (None, None)

        def evaluate_step(engine, batch):
            model.eval()
            users, items, ratings, _ = batch
            with torch.no_grad():
                predictions = model(users, items)
            if low is not None:
                predictions = predictions.clamp(low, high)
            return predictions, ratings

        evaluator = Engine(evaluate_step)
        attach_rating_metrics(evaluator, lambda output: output, self.device)
        return evaluator

    def headline(self, final):
        return (f"test MSE {final['test_mse']:.4f} RMSE {final['test_rmse']:.4f} "
                f"MAE {final['test_mae']:.4f}")


def attach_rating_metrics(engine, output_transform, device):
    """MSE, RMSE and MAE of (predictions, targets) as engine.state.metrics[name]. Ignite's
    metrics reduce their sums across processes, so each rank feeds its share."""
    MeanSquaredError(output_transform, device=device).attach(engine, "mse")
    RootMeanSquaredError(output_transform, device=device).attach(engine, "rmse")
    MeanAbsoluteError(output_transform, device=device).attach(engine, "mae")


class RankingTask:
    """Implicit feedback, every item ranked for every user (RecBole's ml-1m protocol): ratings
    >= ranking_min_rating are positives, a ranking_core-core filter, each user's interactions
    split at random train/val/test, and the rank metrics at top_k over all items the user has
    not met in training (nor in validation, when ranking for the test set)."""

    def __init__(self, cfg, ratings, device, rank, world_size):
        data = loader.split_per_user(
            *loader.implicit_feedback(ratings, cfg["ranking_min_rating"], cfg["ranking_core"]),
            fractions=(1 - cfg["val_fraction"] - cfg["test_fraction"], cfg["val_fraction"],
                       cfg["test_fraction"]), seed=cfg["split_seed"])
        if cfg["top_k"] > data.n_items:
            raise ConfigError(f"--top_k={cfg['top_k']} is larger than the number of items "
                              f"({data.n_items}) left by the filter")
        self.n_users, self.n_items, self.global_mean = data.n_users, data.n_items, 0.0
        self.user_ids, self.item_ids = data.user_ids, data.item_ids
        # recommend.py's "already rated": every movie of the model the user rated, at any rating
        # (a movie rated 1 star is no recommendation), not only the positives it trained on.
        self.seen = loader.pairs_within(ratings, data.user_ids, data.item_ids)
        self.counts = {f"n_{name}": int((data.part == p).sum()) for p, name in enumerate(SPLITS)}
        self.k, self.loss_name = cfg["top_k"], cfg["loss"]
        self.metric_names = tuple(f"{m}@{self.k}" for m in RANK_METRICS)
        self.choose_by, self.higher_is_better = f"ndcg@{self.k}", True
        self.choose_label, self.rating_range = f"NDCG@{self.k}", None
        self.free_train_metrics = False  # rank metrics of the training items mean nothing
        self.data_term_name = cfg["loss"]
        ndcg = f"ndcg@{self.k}"
        self.plots = [(f"ndcg_at_{self.k}.svg", f"NDCG@{self.k}",
                       [(f"val_{ndcg}", "validation"), (f"test_{ndcg}", "test")], f"NDCG@{self.k}")]
        parts = {name: (torch.from_numpy(data.users[data.rows(p)]).to(device),
                        torch.from_numpy(data.items[data.rows(p)]).to(device))
                 for p, name in enumerate(SPLITS)}
        # Per-user item lists (CSR-like) of each part, to gather a block of users' items at once.
        self.by_user = {name: loader.UserBatches(*parts[name], data.n_users, 1, shuffle=False)
                        for name in SPLITS}
        if cfg["loss"] == "softmax":
            self.batch_size = batch_size_for(cfg, data.n_users)
            self.batches = loader.UserBatches(*parts["train"], data.n_users, self.batch_size,
                                              seed=cfg["seed"], rank=rank, world_size=world_size)
        else:
            users, items = parts["train"]
            self.batch_size = batch_size_for(cfg, len(users))
            self.batches = loader.NegativeBatches((users, items, torch.zeros(len(users))),
                                                  self.batch_size, data.n_items, cfg["n_negatives"],
                                                  seed=cfg["seed"], rank=rank, world_size=world_size)
        # The pairs each row has in an epoch's prior: a positive's user and item, and with sampled
        # losses the user once more per negative and each item as a negative (in expectation).
        train_users, train_items = data.users[data.rows(0)], data.items[data.rows(0)]
        per_positive = 1 if cfg["loss"] == "softmax" else 1 + cfg["n_negatives"]
        as_negative = 0 if cfg["loss"] == "softmax" else cfg["n_negatives"] * len(train_users) / data.n_items
        self.prior_scale = prior_scale(
            cfg, per_positive * np.bincount(train_users, minlength=data.n_users),
            np.bincount(train_items, minlength=data.n_items) + as_negative, device,
            pairs_per_example=per_positive)
        # Evaluation goes over blocks of users; each rank takes every world_size-th user.
        eval_users = max(1, cfg["eval_batch_size"] // 16)  # a block's scores: 1024 x n_items
        self.eval_batches = {split: UserBlocks(data.n_users, eval_users, rank, world_size, device)
                             for split in ("val", "test")}
        self.device, self.world_size = device, world_size
        self.data = data

    def loss(self, model, batch):
        if self.loss_name == "softmax":
            # Each user's training items against all items in one softmax (as Mult-VAE does),
            # and the prior of the batch's (user, item) pairs, as the rating task's, from counts.
            users, position, items, global_pairs = batch
            scores, squared_norms = model(
                users, return_prior=True,
                user_counts=torch.bincount(position, minlength=len(users)).float(),
                item_counts=torch.bincount(items, minlength=self.n_items).float(),
                prior_scale=self.prior_scale)                                   # (B, n_items)
            log_probabilities = torch.log_softmax(scores, dim=1)
            data_term = -log_probabilities[position, items].sum() / max(len(items), 1)
            return data_term, squared_norms, len(items) * self.world_size / global_pairs, {}
        # A positive and its sampled negatives in one forward: (B, 1 + n) scores; the prior
        # covers every row the batch uses, the negatives' too.
        users, items, negatives, global_batch = batch                             # negatives (B, n)
        scores, squared_norms = model(users, torch.cat([items.unsqueeze(1), negatives], dim=1),
                                      return_prior=True, prior_scale=self.prior_scale)
        positive, negative = scores[:, 0], scores[:, 1:]
        if self.loss_name == "sampled_softmax":
            terms = -torch.log_softmax(scores, dim=1)[:, 0]
        elif self.loss_name == "bpr":
            terms = -F.logsigmoid(positive.unsqueeze(1) - negative).mean(1)
        else:  # adaptive_hinge: the hardest of the n sampled negatives (Kula 2017)
            terms = torch.relu(1 - positive + negative.max(1).values)
        data_term = terms.sum() / max(len(terms), 1)
        return data_term, squared_norms, len(terms) * self.world_size / global_batch, {}

    def attach_train_metrics(self, trainer):
        pass

    def evaluator(self, model, split):
        """An engine over blocks of users, each step giving scores_and_relevant."""
        def evaluate_step(engine, users):
            model.eval()
            with torch.no_grad():
                return self.scores_and_relevant(model, users, split)

        evaluator = Engine(evaluate_step)
        RankingMetrics(self.k, device=self.device).attach(evaluator, "ranking")
        return evaluator

    def scores_and_relevant(self, model, users, split):
        """(scores, relevant), (B, n_items) each: the scores of all items for a block of users
        with their training items (and validation items, for test) at -inf, and the split's
        held-out items. `model` is anything with score_all (the baselines of benchmark.py too)."""
        scores = getattr(model, "module", model).score_all(users)                  # (B, n_items)
        for part in ("train",) if split == "val" else ("train", "val"):
            position, items = self.by_user[part].pairs(users)
            scores[position, items] = -torch.inf
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        position, items = self.by_user[split].pairs(users)
        relevant[position, items] = True
        return scores, relevant

    def headline(self, final):
        labels = {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR", "hit": "Hit", "precision": "Precision"}
        return "test " + ", ".join(f"{labels[name]}@{self.k} {final[f'test_{name}@{self.k}']:.4f}"
                                   for name in RANK_METRICS)


AUTO_BATCH_STEPS, AUTO_BATCH_MOST = 64, 8192


def batch_size_for(cfg, n_train):
    """The global batch: batch_size, or for batch_size=0 n_train / 64 up to 8192 (n_train:
    ratings, users or interactions, as batch_size counts). Early stopping and the epoch cap count
    epochs; with one fixed batch a set ten times smaller has ten times fewer steps per epoch (ML-
    100K: 9 of 8192 ratings), so its runs stop on a handful of steps' progress and need ten times
    the epochs. At least 64 steps make an epoch mean about the same progress on any set; 8192
    keeps the large sets' steps few and fast (measured in README, "Defaults across data sizes")."""
    if cfg["batch_size"]:
        return cfg["batch_size"]
    return max(1, min(AUTO_BATCH_MOST, math.ceil(n_train / AUTO_BATCH_STEPS)))


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
    how torch.topk orders equal values; rows without a tie pay only for topk."""
    values, items = torch.topk(scores, k, dim=1)
    kth = values[:, -1:]
    tied = ((scores == kth).sum(1) > (values == kth).sum(1)) | (values[:, 1:] == values[:, :-1]).any(1)
    if tied.any():
        sorted_values, order = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied], items[tied] = sorted_values[:, :k], order[:, :k]
    return values, items


def rank_metrics(scores, relevant, k):
    """Per-user NDCG, Recall, MRR, Hit and Precision at k (columns in RANK_METRICS order) for the
    rows with at least one relevant item. scores: (B, n_items), -inf for masked items, which
    never count as hits; relevant: (B, n_items) bool, the held-out items. Binary relevance;
    the ideal DCG is over min(#relevant, k) items."""
    keep = relevant.any(1)
    scores, relevant = scores[keep], relevant[keep]
    values, items = top_k_items(scores, k)
    hits = relevant.gather(1, items) & torch.isfinite(values)                    # (U, k)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=scores.device, dtype=torch.float64))
    n_relevant = relevant.sum(1)                                                  # (U,)
    ideal = torch.cumsum(discounts, 0)[n_relevant.clamp(max=k) - 1]
    n_hits = hits.sum(1).double()
    first_hit = torch.where(hits.any(1), 1.0 / (hits.double().argmax(1) + 1), 0.0)
    return torch.stack([(hits.double() * discounts).sum(1) / ideal, n_hits / n_relevant,
                        first_hit, (n_hits > 0).double(), n_hits / k], dim=1)


class RankingMetrics(Metric):
    """The rank metrics at k of (scores, relevant) batches, averaged over users with held-out
    items; compute() returns {"ndcg@k": ..., "recall@k": ..., ...}, which Ignite also spreads
    into engine.state.metrics. The sums are all-reduced across processes."""

    def __init__(self, k, output_transform=lambda x: x, device="cpu"):
        self.k = k
        super().__init__(output_transform, device=device)

    @reinit__is_reduced
    def reset(self):
        self._sums = torch.zeros(len(RANK_METRICS), dtype=torch.float64, device=self._device)
        self._users = torch.zeros((), dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output):
        scores, relevant = output
        values = rank_metrics(scores, relevant, self.k)
        self._sums += values.sum(0).to(self._device)
        self._users += len(values)

    @sync_all_reduce("_sums", "_users")
    def compute(self):
        if self._users == 0:
            raise NotComputableError("RankingMetrics needs at least one user with held-out items")
        return {f"{name}@{self.k}": float(total / self._users)
                for name, total in zip(RANK_METRICS, self._sums)}


TASKS = {"rating": RatingTask, "ranking": RankingTask}


# ----------------------------------------------------------------------------- the run

def training(local_rank, cfg, attach=None):
    """One process's run, in stages: folders, data, model, trainer, evaluation and model choice,
    checkpoints and resume, training, then the final figures of the best model. attach, if
    given, is called as attach(trainer, validation_evaluator, task) once both exist (tune.py
    hangs Optuna's pruning handler there)."""
    started = time.perf_counter()
    keep_freed_memory()
    rank, world_size = idist.get_rank(), idist.get_world_size()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])

    # --- folders, looked at first and made once the data and settings have passed their checks,
    # so that bad input leaves nothing behind
    cfg["run_name"] = decide_run_name(cfg)
    run_dir = Path(cfg["runs_dir"]) / cfg["run_name"]
    results = Path(cfg["results_dir"]) / cfg["run_name"]
    if not cfg["resume"]:
        check_new_run_folder(run_dir, results)

    # --- data: rank 0 downloads and parses (and fills the cache) while the others wait for it.
    with idist.one_rank_first():
        ratings = loader.load(cfg["dataset"], cfg["data_dir"], cfg["download"],
                              progress=cfg["progress"] and rank == 0)
    task = TASKS[cfg["task"]](cfg, ratings, device, rank, world_size)

    idist.barrier()  # every rank has looked before rank 0 touches the folder
    if rank == 0:
        if not last_checkpoints(run_dir):
            for path in unstarted_run_files(run_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for folder in (run_dir, results):  # found unwritable now, not after the training
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigError(f"cannot create {folder}: {error.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise ConfigError(f"{folder} is not writable")

    # --- model
    torch.manual_seed(cfg["seed"])  # same initial model on every rank
    model = MFMixTaste(task.n_users, task.n_items, dim=cfg["dim"], n_tastes=cfg["n_tastes"],
                       global_mean=task.global_mean, init_std=cfg["init_std"])
    model = idist.auto_model(model)  # moves to the device; DistributedDataParallel if world > 1
    # Adam for the whole model: the fused kernel updates the dense tables in one pass per step
    # (on CPU as on GPU); with batches of 8192 ratings, a dense update costs less than the
    # bookkeeping of sparse ones (SparseAdam measured 1.3x slower per epoch on ML-1M).
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=True))
    prior_weights = torch.tensor([cfg[f"prior_{name}"] for name in PRIOR_TERMS], device=device)

    # --- trainer
    def train_step(engine, batch):
        model.train()
        data_term, squared_norms, share, extra = task.loss(model, batch)
        prior_by_term = squared_norms * prior_weights                   # (4,), as in PRIOR_TERMS
        loss = data_term + prior_by_term.sum()
        optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages gradients over ranks; weighting each rank's loss by
        # its share of the global batch makes the update that of the whole batch.
        (loss * share).backward()
        optimizer.step()
        return {"loss": loss.detach(), "data": data_term.detach(), "prior": prior_by_term.detach(),
                **extra}

    trainer = Engine(train_step)
    trainer.logger.addFilter(QUIET_ENGINE_EXCEPTIONS)  # the evaluators share this logger
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(lambda out: out["loss"]))
    # TerminateOnNan stops mid-epoch, but Ignite still fires EPOCH_COMPLETED: the handlers of
    # that event below skip a diverged epoch, so no NaN model is evaluated or saved.
    epoch_completed = Events.EPOCH_COMPLETED(event_filter=lambda engine, _: not diverged(engine))
    Average(output_transform=lambda out: out["loss"], device=device).attach(trainer, "loss")
    task.attach_train_metrics(trainer)

    # --- evaluation after each epoch, and the choice of the model by validation alone
    evaluated = [s for s in SPLITS if s in task.eval_batches and not (s == "train" and task.free_train_metrics)]
    evaluators = {split: task.evaluator(model, split) for split in evaluated}
    history = History()

    @trainer.on(epoch_completed)
    def evaluate(engine):
        # Ignite's own timing of the epoch's steps, read before the evaluation below adds to it.
        row = {"epoch": engine.state.epoch, "train_loss": engine.state.metrics["loss"],
               "epoch_seconds": round(engine.state.times[Events.EPOCH_COMPLETED.name], 3)}
        if task.free_train_metrics:
            row.update({f"train_{m}": engine.state.metrics[m] for m in task.metric_names})
        for split, evaluator in evaluators.items():
            evaluator.run(task.eval_batches[split])
            row.update({f"{split}_{m}": evaluator.state.metrics[m] for m in task.metric_names})
        history.rows.append(row)

    # Model choice and early stopping look at the validation metric only, never at the test set.
    sign = 1 if task.higher_is_better else -1  # Ignite's handlers keep the highest score

    def validation_score(_):
        return sign * evaluators["val"].state.metrics[task.choose_by]

    score_name = ("" if task.higher_is_better else "neg_") + "val_" + task.choose_by.replace("@", "_at_")
    best_checkpoint = Checkpoint(
        {"model": model}, DiskSaver(run_dir, require_empty=False), filename_prefix="best",
        score_function=validation_score, score_name=score_name, n_saved=1,
        global_step_transform=global_step_from_engine(trainer))
    evaluators["val"].add_event_handler(Events.COMPLETED, best_checkpoint)
    stopper = EarlyStopping(cfg["patience"], validation_score, trainer) if cfg["patience"] else None
    if stopper:
        evaluators["val"].add_event_handler(Events.COMPLETED, stopper)
    if attach:
        attach(trainer, evaluators["val"], task)

    # --- checkpoints and resume
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "batches": task.batches,
               "history": history, "best_checkpoint": best_checkpoint}
    if stopper:
        to_save["early_stopping"] = stopper
    # Named by epoch (last_checkpoint_<epoch>.pt): resume takes the highest epoch, whatever
    # the files' times say.
    last_checkpoint = Checkpoint(to_save, DiskSaver(run_dir, require_empty=False),
                                 filename_prefix="last", n_saved=1,
                                 global_step_transform=global_step_from_engine(trainer))

    @trainer.on(epoch_completed)
    def save_last(engine):
        history.wall_seconds = wall_before + time.perf_counter() - started
        last_checkpoint(engine)
        if rank == 0:  # the one checkpoint of an earlier invocation, now superseded
            for path in last_checkpoints(run_dir)[:-1]:
                path.unlink(missing_ok=True)

    if cfg["resume"]:
        saved = last_checkpoints(run_dir)
        if saved:
            state = read_checkpoint(saved[-1])
            # A knob added on resume (patience 0 -> 2) has no saved state: it starts fresh.
            Checkpoint.load_objects({k: v for k, v in to_save.items() if k in state}, state)
        elif rank == 0:
            print(f"{run_dir} has no checkpoint yet (it stopped in its first epoch): starting it "
                  "from epoch 1")
    wall_before = history.wall_seconds  # of earlier invocations, when resuming

    left = epochs_left(trainer, stopper, cfg, task.choose_label)
    # Rank 0 decides for all: only its disk surely holds the results folder.
    finished = idist.broadcast(int(left is not None and (results / "summary.json").is_file()), src=0)
    if finished:
        if rank == 0:
            print(f"nothing to do: {run_dir} {left}; its results are in {results}/")
        return

    # --- training
    tb_logger = None
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tb_logger = attach_tensorboard(run_dir, trainer, evaluators, optimizer, task, cfg)
        if cfg["progress"] and left is None:
            ProgressBar(persist=False).attach(
                trainer, output_transform=lambda out: {"loss": out["loss"]})

    if left is None:
        trainer.run(task.batches, max_epochs=cfg["epochs"])
    if diverged(trainer):
        if tb_logger:
            tb_logger.close()
        kept = (f"the checkpoint of epoch {trainer.state.epoch - 1} is kept in {run_dir}"
                if last_checkpoints(run_dir) else f"no epoch finished, {run_dir} holds no checkpoint")
        raise TrainingError(f"training diverged: the loss became {float(trainer.state.output['loss'])} "
                            f"in epoch {trainer.state.epoch} (iteration {trainer.state.iteration}); "
                            f"nothing of that epoch was saved and {kept}. Lower --lr or raise the "
                            "prior weights, and start a new run.")

    # --- final figures: the best-by-validation model on every split. Rank 0 reads it and sends
    # it to the others, so every rank evaluates the same model even without a shared disk.
    if rank == 0:
        Checkpoint.load_objects({"model": model}, read_checkpoint(best_checkpoint.last_checkpoint))
    if world_size > 1:
        for tensor in model.state_dict().values():
            idist.broadcast(tensor, src=0)
    final = {}
    for split in ("test", "val", "train"):  # test first: the figures summary.json leads with
        if split in task.eval_batches:
            evaluator = task.evaluator(model, split)
            evaluator.run(task.eval_batches[split])
            final.update({f"{split}_{m}": evaluator.state.metrics[m] for m in task.metric_names})
    choose = f"val_{task.choose_by}"
    best_epoch = max(history.rows, key=lambda r: sign * r[choose])["epoch"]
    if rank == 0:
        summary = {**final,
                   "best_epoch": best_epoch, "epochs_run": trainer.state.epoch,
                   "wall_seconds": round(wall_before + time.perf_counter() - started, 2),
                   "task": cfg["task"], "dataset": cfg["dataset"], "n_users": task.n_users,
                   "n_items": task.n_items, **task.counts, "batch_size_used": task.batch_size,
                   "world_size": world_size, "backend": idist.backend() or "none",
                   "device": str(device), "torch": torch.__version__,
                   "ignite": ignite.__version__, "hyperparameters": cfg}
        # summary.json is written last: a run interrupted before it is resumable (its final
        # stage runs again), one that has it is finished and answers recommend.py.
        save_run_data(run_dir, task, cfg)
        show_tastes(run_dir, results, tb_logger)
        tb_logger.writer.add_hparams(
            {k: v for k, v in cfg.items() if k not in ("resume",)},
            {f"hparam/{k}": v for k, v in final.items()}, name="hparams")
        tb_logger.close()
        write_results(results, summary, history.rows, task)
        print(f"{task.headline(final)} (best epoch {best_epoch} of {trainer.state.epoch}, "
              f"val {task.choose_by} {final[choose]:.4f}); results in {results}/")
    # Let every rank leave together, before run_released (main) releases the model and engines
    # and Parallel destroys the process group.
    idist.barrier()


class _QuietEngineExceptions(logging.Filter):
    """Drops Ignite's "Engine run is terminating due to exception: ..." notices. Every exception
    that ends a run reaches main(), which reports it once (a line, or a traceback for a bug); the
    notice said it again, once per engine it passed through (Ctrl-C in an evaluation, a tune.py
    trial pruned from the validation evaluator inside the trainer)."""

    def filter(self, record):
        return "terminating due to exception" not in record.getMessage()


QUIET_ENGINE_EXCEPTIONS = _QuietEngineExceptions()


def diverged(trainer):
    """Whether the last training step's loss is NaN or infinite (TerminateOnNan then stopped)."""
    output = trainer.state.output
    return output is not None and not math.isfinite(float(output["loss"]))


def epochs_left(trainer, stopper, cfg, metric_label):
    """None when a (resumed) trainer has epochs to run, else why it has none, in words."""
    done = trainer.state.epoch
    if done >= cfg["epochs"]:
        return (f"has trained {done} epochs and --epochs={cfg['epochs']}: pass a larger "
                "--epochs to train further")
    if stopper and done and stopper.counter >= stopper.patience:
        return (f"stopped early after epoch {done} (no better validation {metric_label} in "
                f"{stopper.patience} epochs): pass a larger --patience to train further")
    return None


def last_checkpoints(run_dir):
    """The run's last_checkpoint_<epoch>.pt files, oldest epoch first."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("last_checkpoint_*.pt")
             if (m := re.fullmatch(r"last_checkpoint_(\d+)\.pt", path.name))]
    return [path for _, path in sorted(found)]


def read_checkpoint(path):
    """A checkpoint's objects, on the CPU: Checkpoint.load_objects then copies each into its
    place on the device (model parameters and optimiser state), while the shuffling generator's
    state must stay a CPU tensor. A damaged file is named in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, bad pickle, wrong file: torch raises many kinds
        raise ConfigError(f"{path} is damaged or not a checkpoint ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'}); "
                          "restore it from a copy, or delete the run folder and start again") from None


def unstarted_run_files(run_dir):
    """What a run that never finished an epoch (Ctrl-C, or NaN in epoch 1) left in its folder:
    its config and first events. A new run, or a resume, clears them and starts in that folder."""
    if not run_dir.is_dir() or last_checkpoints(run_dir):
        return []
    return [path for path in run_dir.iterdir()
            if path.name in ("config.json", "hparams")
            or path.name.startswith(("events.out.tfevents.", "best_"))]


def check_new_run_folder(run_dir, results):
    """A new run may use an absent or empty folder, or one that an unstarted run left; never one
    that holds a run (it would be overwritten) or files that are not a run's, and never a results
    folder that holds files (another run's figures, from another --runs_dir)."""
    if last_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume={run_dir} "
                          "or pick another --run_name")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder: pick another --run_name")
    ours = set(unstarted_run_files(run_dir))
    others = sorted(p.name for p in run_dir.iterdir() if p not in ours) if run_dir.is_dir() else []
    if others:
        raise ConfigError(f"{run_dir} holds files that are not a run's ({', '.join(others[:3])}): "
                          "pick another --run_name")
    if results.is_dir() and any(results.iterdir()):
        raise ConfigError(f"{results} already holds the results of a run: pick another --run_name "
                          "or --results_dir")


def attach_tensorboard(run_dir, trainer, evaluators, optimizer, task, cfg):
    """tensorboardX through Ignite's TensorboardLogger: loss, data term and each prior term every
    log_interval iterations, the metrics of every split each epoch, the hyperparameters."""
    tb_logger = TensorboardLogger(log_dir=str(run_dir))

    def scalars(out):
        values = {"loss": float(out["loss"]), task.data_term_name: float(out["data"])}
        values.update({f"prior_{n}": float(v) for n, v in zip(PRIOR_TERMS, out["prior"])})
        return values

    tb_logger.attach_output_handler(trainer, Events.ITERATION_COMPLETED(every=cfg["log_interval"]),
                                    tag="train_step", output_transform=scalars)
    tb_logger.attach_opt_params_handler(trainer, Events.EPOCH_STARTED, optimizer)
    if task.free_train_metrics:
        tb_logger.attach_output_handler(trainer, Events.EPOCH_COMPLETED, tag="train",
                                        metric_names=list(task.metric_names))
    for split, evaluator in evaluators.items():
        tb_logger.attach_output_handler(evaluator, Events.COMPLETED, tag=split,
                                        metric_names=list(task.metric_names),
                                        global_step_transform=global_step_from_engine(trainer))
    tb_logger.writer.add_text("config", "    " + json.dumps(cfg, indent=2).replace("\n", "\n    "))
    return tb_logger


def save_run_data(run_dir, task, cfg):
    """What inference needs beside the model and config.json, so that a finished run folder
    answers on its own (recommend.py): the raw user and movie ids of the model's rows, each
    user's rated (or, for ranking, interacted) movies, and the movies' titles and genres when the
    dataset has a movie file. Kept in runs/ only: MovieLens may not be redistributed."""
    order = np.lexsort((task.seen[1], task.seen[0]))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(task.seen[0], minlength=task.n_users))])
    arrays = io.BytesIO()
    np.savez(arrays, user_ids=task.user_ids, item_ids=task.item_ids, seen_indptr=indptr,
             seen_items=task.seen[1][order], rating_range=np.array(task.rating_range or (), dtype=np.float64))
    write_atomically(run_dir / "dataset.npz", arrays.getvalue())
    try:
        movies = loader.load_movies(cfg["dataset"], cfg["data_dir"])
    except loader.DataError:  # the data folder moved since the run started: ids stand for titles
        movies = None
    if movies is not None:
        rows = movies.reindex(task.item_ids)
        items = [{"movie_id": int(i), "title": t if isinstance(t, str) else str(i),
                  "year": None if y is None or y != y else int(y),
                  "genres": g if isinstance(g, list) else []}
                 for i, t, y, g in zip(task.item_ids, rows["title"], rows["year"], rows["genres"])]
        write_atomically(run_dir / "movies.json", json.dumps(items))


def write_atomically(path, content):
    """Write content (str or bytes) to a temporary file beside path and rename it over path: an
    interruption leaves the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            temporary.write_text(content)
        else:
            temporary.write_bytes(content)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def show_tastes(run_dir, results, tb_logger):
    """Pictures of what the finished run learned, through recommend.py's reader of run folders:
    results/<run>/taste_weights.svg and item_map.svg, and the item embeddings with titles and
    genres in TensorBoard's projector."""
    from recommend import Recommender
    run = Recommender.load(run_dir, quiet=True)
    run.write_pictures(results)
    metadata = [[title, "|".join(genres) or "-"] for title, genres in zip(run.movies["title"], run.movies["genres"])]
    # One projector entry per run: a run finished again (resumed for more epochs, or after an
    # interrupted end) replaces the entry instead of adding a second one beside it.
    shutil.rmtree(run_dir / "00000" / "item_embeddings", ignore_errors=True)
    (run_dir / "projector_config.pbtxt").unlink(missing_ok=True)
    tb_logger.writer.add_embedding(run.model.item_factors.detach(), metadata=metadata,
                                   metadata_header=["title", "genres"], tag="item_embeddings")


def write_results(folder, summary, rows, task):
    """metrics.csv (one row per epoch), the task's SVG plots, and summary.json last: its presence
    says the run is finished."""
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in rows for k in row)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(folder / "metrics.csv", table.getvalue())
    import matplotlib  # imported here: only the end of a run needs it
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    epochs_axis = [r["epoch"] for r in rows]
    for filename, title, curves, ylabel in task.plots:
        curves = [(column, label) for column, label in curves if any(column in r for r in rows)]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for column, label in curves:
            ax.plot(epochs_axis, [r.get(column, np.nan) for r in rows], marker="o", markersize=3,
                    label=label)
        ax.axvline(summary["best_epoch"], color="grey", linestyle=":", label="best epoch (val)")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{title}: {summary['dataset']}, "
               f"K={summary['hyperparameters']['n_tastes']}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / filename)
        plt.close(fig)
    write_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")


def main(argv):
    try:
        cfg = resolve_config(argv)
    except (ConfigError, loader.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    backend = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
    with idist.Parallel(backend=backend) as parallel:
        # Ignite's launcher announces "Run '<function training at 0x...>' in 1 processes" at INFO.
        logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)
        error = run_released(parallel, cfg)
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        print("interrupted: the checkpoint of the last finished epoch is kept; continue with "
              "--resume=<run folder>", file=sys.stderr)
        return 130
    print(f"error: {error}", file=sys.stderr)
    return 1 if isinstance(error, TrainingError) else 2


def run_released(parallel, cfg):
    """Run training() and release everything it built before Parallel's exit destroys the
    process group; returns the expected error (bad input, divergence, Ctrl-C) or None.

    The engines, their handlers and the DistributedDataParallel model form reference cycles
    that outlive training(), and an error's traceback holds its frames. Left to the collector
    at interpreter exit, they drop the last references to gloo's process group and to tensors
    its worker threads hold while Python finalizes; a worker that then needs the GIL is killed
    and the rank aborts ("terminate called without an active exception", exit code -6).
    Dropping the traceback and collecting here ends them while everything is still alive."""
    try:
        parallel.run(training, cfg)
        return None
    except (ConfigError, loader.DataError, TrainingError, KeyboardInterrupt, OSError) as error:
        # OSError: a full disk or a folder gone read-only while writing checkpoints or results
        # (checkpoints are written to a temporary file and renamed: the previous one stays).
        error.__traceback__ = error.__context__ = error.__cause__ = None
        return error
    finally:
        gc.collect()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
