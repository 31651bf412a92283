"""Variants of the mixture's user side, tried on Amazon data (issue 28; docs/research/ranking-rounds.md, "Amazon:
the sixth round"): each is MFMixTaste with its users' rows (or its scores) built another way, and
trains as train.py's ranking run does, every knob of train.py's included:

    python benchmark.py --variant=taste_count --task=ranking --dataset=PATH   # MIND's K_u per user
    python benchmark.py --variant=item_bag --task=ranking --dataset=PATH      # users from their items
    python benchmark.py --variant=item_item --task=ranking --dataset=PATH     # EASE's term beside the tastes

None became a default: on Amazon Beauty none lifted the mixture above one taste or near EASE.
"""

import numpy as np
import torch
import torch.nn as nn

import loader
from MFMixTaste import MFMixTaste


class TasteCountUsers(MFMixTaste):
    """A taste count per user that grows with the user's history, MIND's dynamic interest number
    K_u = max(1, min(K, floor(log2 n_u))) for n_u training items: a user's tastes beyond K_u are
    their first taste again (with its attention vector). A user of K_u = 1 is then exactly that
    one taste; one of 1 < K_u < K (only with K > 2; issue 28's runs had K=2) keeps K_u distinct
    tastes, the copies adding weight to the first."""

    def __init__(self, n_users, n_items, training, **kwargs):
        super().__init__(n_users, n_items, **kwargs)
        counts = np.asarray(training.sum(1)).ravel()                              # (n_users,)
        taste_counts = np.floor(np.log2(np.maximum(counts, 1))).clip(1, self.n_tastes)
        self.register_buffer("taste_counts", torch.from_numpy(taste_counts).long())

    def user_rows(self, users):
        rows = super().user_rows(users)                                           # (B, 2, K, d)
        tastes = torch.arange(self.n_tastes, device=rows.device).unsqueeze(0)     # (1, K)
        source = torch.where(tastes < self.taste_counts[users].unsqueeze(1), tastes, 0)  # (B, K)
        return rows.gather(2, source.view(len(users), 1, self.n_tastes, 1).expand_as(rows))


class ItemBagUsers(MFMixTaste):
    """A user's K tastes and K attention vectors from the items they chose, as SVD++'s implicit
    term and Kula's sequence models build a user from their items: rows_i = n_i^-1/2 sum over
    the user's training items j of V_j, V (n_items, 2, K, d) a second table of item vectors,
    shared by every user who chose the item. No free per-user rows (with them, validation
    NDCG@10 on Amazon Beauty fell from 0.0488 to 0.0442). In training, each chosen item is
    dropped with probability DROPOUT (Mult-DAE's input dropout), so that a user's tastes are not
    asked to reproduce the very items they are made of."""

    DROPOUT = 0.5

    def __init__(self, n_users, n_items, training, **kwargs):
        super().__init__(n_users, n_items, **kwargs)
        self.user_factors.requires_grad_(False)  # unused: the rows come from the items
        self.item_inputs = nn.Parameter(torch.randn(n_items, 2 * self.n_tastes * self.dim) * kwargs.get("init_std", 0.01))
        self.register_buffer("indptr", torch.from_numpy(training.indptr).long())
        self.register_buffer("indices", torch.from_numpy(training.indices).long())

    def user_rows(self, users):
        lengths = self.indptr[1:] - self.indptr[:-1]                               # (n_users,)
        position, chosen = loader.user_pairs(users, lengths, self.indptr[:-1], self.indices)  # (P,) each
        weights = lengths[users].clamp(min=1).float().rsqrt()[position]            # (P,)
        offsets = torch.cumsum(lengths[users], 0) - lengths[users]                 # (B,): each bag's start
        if self.training:
            weights = weights * (torch.rand_like(weights) >= self.DROPOUT) / (1 - self.DROPOUT)
        rows = nn.functional.embedding_bag(chosen, self.item_inputs, offsets, mode="sum",
                                           per_sample_weights=weights)            # (B, 2Kd)
        return rows.view(len(users), 2, self.n_tastes, self.dim)


class ItemItemMixture(MFMixTaste):
    """The mixture's scores plus a fixed item-item term, scale * (X B)_ij, B EASE's weights at
    L2 (Steck 2019) on the training matrix X and scale learnt (starting at SCALE): EASE's
    memorised co-occurrence beside the tastes, which then learn what it leaves. Every user's
    EASE scores are held (n_users x n_items floats): a study for sets of Amazon's size."""

    L2, SCALE = 100.0, 10.0

    def __init__(self, n_users, n_items, training, **kwargs):
        from bench.peers import ease
        super().__init__(n_users, n_items, **kwargs)
        scores = np.asarray(training @ ease(training, self.L2), dtype=np.float32)
        self.register_buffer("item_item_scores", torch.from_numpy(scores), persistent=False)
        self.item_item_scale = nn.Parameter(torch.tensor(self.SCALE))

    def item_item(self, users):
        return self.item_item_scale * self.item_item_scores[users]                 # (B, n_items)

    def forward(self, users, items=None, return_prior=False, columns=None, **kwargs):
        if items is not None or columns is not None:  # train_variant allows the full softmax only
            raise ValueError("ItemItemMixture scores all items (the ranking task's full softmax) only")
        out = super().forward(users, None, return_prior, **kwargs)
        if not return_prior:
            return out + self.item_item(users)
        return (out[0] + self.item_item(users), *out[1:])

    def score_all(self, users):
        return super().score_all(users) + self.item_item(users)


VARIANTS = {"taste_count": TasteCountUsers, "item_bag": ItemBagUsers, "item_item": ItemItemMixture}


def train_variant(name, argv):
    """train.py's run (argv: its --key=value) with the model replaced by VARIANTS[name], built
    with the task's training matrix. -> train.main's exit status."""
    import train
    built_task, open_run = {}, train.open_run

    def opening(cfg, device):  # the task, kept for the model (train.py builds the model from sizes)
        if cfg["task"] != "ranking" or cfg["loss"] != "softmax":
            raise train.ConfigError(f"--variant={name} needs --task=ranking with its softmax loss (--loss=softmax)")
        run_dir, results, task = open_run(cfg, device)
        # taste_count and item_bag only build the users' rows, which the sampled softmax reads
        # too; item_item adds a term over every item.
        if task.softmax_items and name == "item_item":
            raise train.ConfigError(f"--variant={name} needs the softmax over every item: this one draws "
                                    f"{task.softmax_items:,} of the {task.n_items:,} items a step "
                                    f"(docs/scale.md); --softmax_items={task.n_items} keeps them all")
        built_task["task"] = task
        return run_dir, results, task

    class Variant(VARIANTS[name]):  # train.py builds its model with MFMixTaste.from_config(cfg, sizes)
        def __init__(self, n_users, n_items, **kwargs):
            super().__init__(n_users, n_items, built_task["task"].training_matrix(), **kwargs)

    train.open_run, train.MFMixTaste = opening, Variant
    try:
        return train.main(argv)
    finally:
        train.open_run, train.MFMixTaste = open_run, MFMixTaste
