"""Ask a trained run for recommendations, and look at what its tastes learned.

    python recommend.py runs/<run> --user=42                 # top 10 items user 42 has not met
    python recommend.py runs/<run> --user=42 --n=20 --json   # the same as JSON, for other programs
    python recommend.py runs/<run> --user=42 --tastes        # each taste of user 42, with its items
    python recommend.py runs/<run> --similar=1               # nearest items to item 1 (cosine)
    python recommend.py runs/<run> --user=42 --plot=u42.svg  # the item map with user 42 on it
    python recommend.py runs/<run> --all --n=10 --out=top.parquet        # every user's top 10, to a file
    python recommend.py runs/<run> --history=new.csv --out=answers.csv   # users fitted to a file's histories
    python recommend.py runs/<run> --history_items=1193,661,914          # one new user, from their items

From Python, every answer is plain data (a pandas DataFrame, or lists of dicts):

    from recommend import Recommender
    run = Recommender.load("runs/<run>")
    run.recommend(42, n=10)      # DataFrame: rank, item_id, title, year, genres, score, taste, taste_weight
                                 # (score is called rating in rating runs: a predicted rating)
    run.recommend_columns(42)    # the same as {column: numpy array}, without importing pandas
    run.tastes(42)               # [{"taste": 1, "share": 0.61, "top_items": [...], "genres": [...],
                                 #   "rated_items": [...]}, ...]
    run.rated_tastes(42)         # DataFrame: item_id, title, taste, weight, for each item user 42 met
    run.similar(1)               # DataFrame: rank, item_id, title, year, genres, cosine
    run.recommend_all(n=10)      # DataFrame: user_id, rank, item_id, score (or rating)[, title], every user
    run.recommend_new([1193, 661], n=10)       # a new user from the items they met (fold-in)
    run.recommend_histories(frame, n=10)       # every user of a DataFrame user_id, item_id[, rating][, weight]

A run folder answers on its own: train.py leaves in it the best model, config.json, dataset.npz
(the raw ids of the model's rows and each user's rated or met items) and items.json (titles and
genres, when the dataset has a movie file or an --items file; otherwise items are named by id).
Items are called items, whatever the data: a movie of MovieLens, a product of a review set.
pandas is imported where a DataFrame is made, not with the module: a one-answer process (`--user`)
needs none, and importing it is 0.3 s of that process's 2 s.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import files
import loader
from files import RunError
from MFMixTaste import PRIOR_TERMS, MFMixTaste


class Recommender:
    def __init__(self, model, config, user_ids, item_ids, seen_indptr, seen_items, items):
        self.model, self.config = model.eval(), config
        self.user_ids, self.item_ids = user_ids, item_ids          # raw ids of the rows, sorted
        self.seen_indptr, self.seen_items = seen_indptr, seen_items  # CSR: user row -> item rows
        self.item_columns = items  # {item_id, title, year (int or None), genres: (n_items,) arrays} (files.item_columns)
        self._items = None         # the same as a DataFrame, made when first asked (items)
        self.rating_range = None  # (low, high) of a rating run's training ratings
        self.untrained = None     # (n_items,) bool: items no training row had (None: not recorded)
        self.prior_weights = {name: 0.0 for name in PRIOR_TERMS}  # the run's L2 prior (fold_in keeps it)
        self.has_titles = False   # whether the run named its items (items.json): answers then carry titles
        self.fold_in_steps = FOLD_IN_STEPS  # a fold-in's steps of Adam (recommend.py --fold_in_steps)
        # What a score means: a predicted rating for rating runs, a ranking score otherwise.
        self.score_name = "rating" if config.get("task", "rating") == "rating" else "score"

    @classmethod
    def load(cls, run_dir, quiet=False):
        """A finished run folder; quiet: no note when its items have no titles. A damaged file in
        it is a RunError that names the file."""
        config, arrays, items, best = files.read_run(run_dir, quiet)
        names_given = any((Path(run_dir) / name).is_file() for name in ("items.json", "movies.json"))
        user_ids, item_ids = arrays["user_ids"], arrays["item_ids"]
        model = MFMixTaste.from_config(config, len(user_ids), len(item_ids))
        try:
            model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
        except Exception as error:  # truncated or foreign file: torch raises many kinds
            raise RunError(f"{best} is damaged or not this run's model ({type(error).__name__})") from None
        # Frozen: nothing here trains the run's tables, and a fold-in's backward would otherwise
        # also compute the gradient of every item vector, a third of its time.
        model.requires_grad_(False)
        run = cls(model, config, user_ids, item_ids, arrays["seen_indptr"], arrays["seen_items"], items)
        run.untrained = ~arrays["trained_items"] if "trained_items" in arrays else None  # older runs: unknown
        # Predicted ratings are shown within the training ratings' range, as train.py evaluates
        # them (clip_predictions); run folders written before the range was kept show them raw.
        rating_range = arrays.get("rating_range", ())
        run.rating_range = tuple(float(v) for v in rating_range) if len(rating_range) == 2 else None
        # The prior the run trained with, which a fold-in keeps (older run folders: the knobs).
        weights = arrays.get("prior_weights", [config.get(f"prior_{name}", 0.0) for name in PRIOR_TERMS])
        run.prior_weights = dict(zip(PRIOR_TERMS, (float(w) for w in weights)))
        run.has_titles = names_given
        run.fold_in_steps = fold_in_steps_for(config, run.seen_indptr)
        return run

    @property
    def items(self):
        """DataFrame indexed by item row: item_id, title, year (int or None), genres."""
        if self._items is None:
            import pandas as pd
            self._items = pd.DataFrame(self.item_columns)
        return self._items

    # ------------------------------------------------------------------------- ids

    def user_row(self, user_id):
        return self._row(self.user_ids, user_id, "user")

    def item_row(self, item_id):
        return self._row(self.item_ids, item_id, "item")

    def _row(self, ids, raw, kind):
        """The row of a raw id: the data's own, a whole number or a str as the data has it (a
        str of digits also finds a whole-number id, as the command line gives it)."""
        if ids.dtype.kind in "iu" and (isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer, str))
                                       or (isinstance(raw, str) and not raw.strip().lstrip("-").isdigit())):
            raise RunError(f"a {kind} id of this run is a whole number, got {raw!r}")
        if ids.dtype.kind == "U" and not isinstance(raw, (str, int, np.integer)):
            raise RunError(f"a {kind} id of this run is a string, got {raw!r}")
        index, known = loader.positions(ids, raw)
        if not known[0]:
            if ids.dtype.kind in "iu":
                raise RunError(f"unknown {kind} id {raw}: this run's {len(ids):,} {kind}s have ids "
                               f"{ids[0]} to {ids[-1]} (not every id in between)")
            raise RunError(f"unknown {kind} id {raw!r}: this run's {len(ids):,} {kind}s have ids such as "
                           f"{', '.join(map(repr, ids[:3].tolist()))}")
        return int(index[0])

    def rated(self, user_row):
        """Item rows the user has rated (or met, for ranking runs)."""
        return self.seen_items[self.seen_indptr[user_row]:self.seen_indptr[user_row + 1]]

    # ------------------------------------------------------------------------- answers

    def recommend(self, user_id, n=10):
        """The n items with the highest scores that the user has not rated (or met), each with the
        taste that contributes most to its score and that taste's mixture weight."""
        import pandas as pd
        return pd.DataFrame(self.recommend_columns(user_id, n))

    def recommend_columns(self, user_id, n=10):
        """recommend's answer as {column: (n,) array}, without pandas."""
        row, n = self.user_row(user_id), _count(n)
        with torch.no_grad():
            scores = self.model.score_all(torch.tensor([row]))[0]                   # (n_items,)
            scores[torch.from_numpy(self.rated(row))] = -torch.inf
            self._drop_untrained(scores)
            top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum()))).indices
            weights, contributions = self._mixture(row, top)                        # (K, n) each
        best_taste = contributions.argmax(0)
        return self._item_columns_at(top.numpy(), **{
            self.score_name: self._shown(scores[top]).double().numpy().round(4),
            "taste": best_taste.numpy() + 1,
            "taste_weight": weights.gather(0, best_taste.unsqueeze(0))[0].double().numpy().round(3)})

    def tastes(self, user_id, n=5):
        """Each of the user's tastes, as the mixture uses it: its share (the mean of its mixture
        weight over the user's own items: how much of the user's weight it carries); the n
        items it would recommend, the unrated items on which it holds the largest mixture
        weight, ranked by the model's score (biases included), each with that score and weight;
        its dominant genres (the most frequent among its top 20 of those); and the user's own
        items on which it holds the largest weight (highest weight first)."""
        row, n = self.user_row(user_id), _count(n)
        rated = torch.from_numpy(self.rated(row))
        own = self.rated_tastes(user_id)
        with torch.no_grad():
            scores = self.model.score_all(torch.tensor([row]))[0]                    # (n_items,)
            scores[rated] = -torch.inf
            self._drop_untrained(scores)
            every = torch.arange(self.model.n_items)
            weights = self.model.mixture_weights(torch.full_like(every, row), every).T  # (K, n_items)
        dominant = weights.argmax(0)
        shares = weights[:, rated].mean(1) if len(rated) else None                 # (K,)
        answer = []
        for k in range(self.model.n_tastes):
            held = torch.where(dominant == k, scores, -torch.inf)
            top = torch.topk(held, min(max(n, 20), int(torch.isfinite(held).sum()))).indices
            genres = Counter(g for names in self.item_columns["genres"][top[:20].numpy()] for g in names)
            top_items = self._item_columns_at(top[:n].numpy(), **{
                self.score_name: self._shown(scores[top[:n]]).double().numpy().round(4),
                "weight": weights[k, top[:n]].double().numpy().round(3)})
            answer.append({"taste": k + 1, "share": None if shares is None else round(float(shares[k]), 3),
                           "top_items": _records(top_items),
                           "genres": [genre for genre, _ in genres.most_common(3)],
                           "rated_items": own[own["taste"] == k + 1].head(n).to_dict("records")})
        return answer

    def rated_tastes(self, user_id):
        """One row per item the user rated (or met): item_id, title, taste (1..K, the taste of the
        largest mixture weight on it) and weight (that weight); by taste, highest weight first."""
        import pandas as pd
        row = self.user_row(user_id)
        rated = self.rated(row)
        with torch.no_grad():
            weights = self.model.mixture_weights(torch.full((len(rated),), row), torch.from_numpy(rated))  # (m, K)
        best = weights.max(1)
        frame = pd.DataFrame({"item_id": self.item_ids[rated], "title": self.item_columns["title"][rated],
                              "taste": best.indices.numpy() + 1, "weight": best.values.double().numpy().round(3)})
        return frame.sort_values(["taste", "weight"], ascending=[True, False], kind="stable").reset_index(drop=True)

    def similar(self, item_id, n=10):
        """The n items whose embeddings are nearest by cosine to the item's."""
        row, n = self.item_row(item_id), _count(n)
        with torch.no_grad():
            vectors = torch.nn.functional.normalize(self.model.item_factors, dim=1)
            cosine = vectors @ vectors[row]
            cosine[row] = -torch.inf
            top = torch.topk(cosine, min(n, self.model.n_items - 1)).indices
        import pandas as pd
        return pd.DataFrame(self._item_columns_at(top.numpy(), cosine=cosine[top].double().numpy().round(4)))

    def recommend_all(self, n=10, block=1024):
        """Every user's top n unrated (unmet) items: DataFrame user_id, rank, item_id and score (rating,
        for rating runs), and title where the run names its items; blocks of users scored against
        all items at once. A user with fewer than n such items gets them all. iter_recommend_all
        gives the same frame in blocks, for a file of every user (bounded memory)."""
        import pandas as pd
        return pd.concat(list(self.iter_recommend_all(n, block)), ignore_index=True)

    def iter_recommend_all(self, n=10, block=1024):
        """recommend_all, one DataFrame for each block of users."""
        n = min(_count(n), len(self.item_ids))
        for start in range(0, len(self.user_ids), block):
            rows = np.arange(start, min(start + block, len(self.user_ids)))
            with torch.no_grad():
                scores = self.model.score_all(torch.from_numpy(rows))                    # (B, n_items)
            counts = np.diff(self.seen_indptr[start:rows[-1] + 2])
            seen = self.seen_items[self.seen_indptr[start]:self.seen_indptr[rows[-1] + 1]]
            yield self._top(scores, np.repeat(np.arange(len(rows)), counts), seen, self.user_ids[rows], n)

    def _top(self, scores, position, met, user_ids, n):
        """The top n of scores (B, n_items), each user's met items (met[position == b]) and the
        untrained items left out: DataFrame user_id, rank, item_id, score[, title]."""
        import pandas as pd
        scores[torch.from_numpy(position), torch.from_numpy(met)] = -torch.inf
        self._drop_untrained(scores)
        values, items = torch.topk(scores, n, dim=1)
        shown = torch.isfinite(values).numpy().ravel()  # -inf: met, past the user's last
        items = items.numpy().ravel()[shown]
        frame = pd.DataFrame({"user_id": np.repeat(user_ids, n)[shown],
                              "rank": np.tile(np.arange(1, n + 1), len(user_ids))[shown],
                              "item_id": self.item_ids[items],
                              self.score_name: self._shown(values).numpy().ravel()[shown]})
        if self.has_titles:
            frame["title"] = self.item_columns["title"][items]
        return frame

    # ------------------------------------------------------------------------- new users

    def recommend_new(self, items, ratings=None, weights=None, n=10):
        """The n items for a user this run never saw (or a trained user's new history), from the
        items they met: ids as the data has them, with their ratings for a rating run, and
        weights (a purchase worth more than a view) where given. The user's tastes, attention
        vectors and bias are fitted to that history with every item vector frozen (fold_in),
        then answered as a trained user is: met items never recommended. DataFrame: rank,
        item_id, score (rating)[, title]; items the run never saw are left out and counted in
        its attrs["unknown_items"]."""
        import pandas as pd
        history = pd.DataFrame({"user_id": 0, "item_id": pd.Series(list(items), dtype=object)})
        for name, values in (("rating", ratings), ("weight", weights)):
            if values is not None:
                history[name] = np.asarray(values, dtype=np.float64)
        answer = self.recommend_histories(history, n)
        return answer.drop(columns="user_id")

    def recommend_histories(self, histories, n=10, fallback=None, block=256):
        """recommend_new for every user of histories, a DataFrame user_id, item_id[, rating][,
        weight]: each user answered from that history alone (a trained user too). -> DataFrame
        user_id, rank, item_id, score (rating)[, title], users in their first order; attrs say
        how many rows named items the run never saw ("unknown_items"). A user none of whose
        items the run knows is a RunError naming them, unless fallback="popular": then they get
        the most popular items (attrs["popular_for"] counts them)."""
        import pandas as pd
        blocks = list(self.iter_histories(histories, n, fallback, block))
        answer = pd.concat(blocks, ignore_index=True)
        answer.attrs.update(blocks[0].attrs)
        return answer

    def iter_histories(self, histories, n=10, fallback=None, block=256):
        """recommend_histories, one DataFrame for each block of users (bounded memory); each
        block's attrs carry the whole history's counts."""
        n = min(_count(n), len(self.item_ids))
        users, position, items, values, weights, counts = self.read_histories(histories, fallback)
        starts = np.searchsorted(position, np.arange(0, len(users) + block, block))
        for b, start in enumerate(range(0, len(users), block)):
            chosen = slice(starts[b], starts[b + 1])
            block_users = users[start:start + block]
            here = position[chosen] - start
            if len(here) == 0:  # only users answered by popularity
                scores = self._popular().expand(len(block_users), -1).clone()
            else:
                rows, bias = self.fold_in(here, items[chosen], None if values is None else values[chosen],
                                          weights[chosen], len(block_users))
                with torch.no_grad():
                    scores = self.model.score_rows(rows, bias)                           # (B, n_items)
                alone = np.setdiff1d(np.arange(len(block_users)), here)  # no known item: popularity
                scores[torch.from_numpy(alone)] = self._popular()
            frame = self._top(scores, here, items[chosen], block_users, n)
            frame.attrs.update(counts)
            yield frame

    def read_histories(self, histories, fallback):
        """histories -> (the users' ids in first order (U,), and for the rows whose item the
        run knows, sorted by user: position (P,), item row (P,), rating (P,) or None, weight
        (P,), and the counts: unknown_items, popular_for). Unknown items are counted; a user left
        with none is refused or, with fallback="popular", kept with no row."""
        if fallback not in (None, "popular"):
            raise RunError(f"fallback={fallback!r}: the one fallback is 'popular'")
        if len(histories) == 0:
            raise RunError("the history is empty: no user to answer")
        missing = [c for c in ("user_id", "item_id") if c not in histories]
        if missing:
            raise RunError(f"a history needs the columns user_id and item_id; it has {', '.join(map(str, histories))}")
        if self.score_name == "rating" and "rating" not in histories:
            raise RunError("this is a rating run: a history gives each item's rating (a rating column), which "
                           "the user's tastes are fitted to")
        user_ids, position = np.unique(histories["user_id"].astype(str if histories["user_id"].dtype == object
                                                                       else histories["user_id"].dtype).to_numpy(),
                                       return_inverse=True)
        first = np.argsort(np.unique(position, return_index=True)[1], kind="stable")  # users in first order
        rank = np.empty(len(first), dtype=np.int64)
        rank[first] = np.arange(len(first))
        position = rank[position]
        user_ids = user_ids[first]
        item_rows, known = loader.positions(self.item_ids, _ids_like(histories["item_id"].to_numpy(), self.item_ids))
        weights = histories["weight"].to_numpy(np.float64) if "weight" in histories else np.ones(len(histories))
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise RunError("history weights must be numbers of at least 0")
        values = histories["rating"].to_numpy(np.float64) if self.score_name == "rating" else None
        if values is not None and not np.isfinite(values).all():
            raise RunError("history ratings must be numbers")
        known &= weights > 0
        lost = np.setdiff1d(np.arange(len(user_ids)), position[known])
        if len(lost) and fallback != "popular":
            raise RunError(f"{len(lost):,} user(s) have no item this run knows: "
                           + ", ".join(map(str, user_ids[lost][:5])) + (", ..." if len(lost) > 5 else "")
                           + "; --fallback=popular answers them with the most popular items")
        counts = {"unknown_items": int((~known).sum()), "popular_for": int(len(lost))}
        order = np.argsort(position[known], kind="stable")
        pick = lambda a: None if a is None else a[known][order]
        return user_ids, pick(position), pick(item_rows), pick(values), pick(weights), counts

    def _popular(self):
        """(n_items,) the items' training interactions, as scores: the popularity fallback."""
        return torch.from_numpy(np.bincount(self.seen_items, minlength=len(self.item_ids)).astype(np.float32))

    def fold_in(self, position, items, ratings, weights, n_users):
        """Users fitted to histories with every item vector frozen, under the run's own loss and
        prior: position (P,) the user of each row among n_users, items (P,) item rows, ratings
        (P,) (a rating run) or None, weights (P,). -> (user rows (n_users, 2, K, d), biases
        (n_users,)), as user_factors and user_bias hold a trained user.
        Each user starts from the trained user whose items overlap theirs most (cosine), so the
        K tastes start apart and near an answer; then fold_in_steps full steps of Adam on the
        sum over users of: ranking, each met item's -log softmax over every item, and the prior
        per pair; rating, each rating's squared error, the implicit term (each rated item's
        claim against a fixed draw of items, as the sampled negatives of training average to) and
        the prior per row or pair as the run's prior_per, a history shorter than
        FOLD_IN_LEAST_SHARE of the mean user's interactions held as one that long. Weights
        multiply each row's terms. The
        users do not interact: a user's answer does not depend on who else is in the batch,
        and the same run and history give the same answer."""
        model, weights = self.model, torch.from_numpy(weights).float()
        position_t, items_t = torch.from_numpy(position), torch.from_numpy(items)
        start_rows = torch.from_numpy(self._nearest_trained(position, items, n_users))
        with torch.no_grad():
            rows = model.user_factors[start_rows].clone().requires_grad_(True)       # (B, 2, K, d)
            # A ranking run's softmax does not see a user's bias (it shifts every score alike):
            # kept from the nearest user, since Adam would move it by its lr a step on rounding noise.
            bias = model.user_bias[start_rows].clone().requires_grad_(ratings is not None)  # (B,)
        per_user = torch.zeros(n_users).index_add_(0, position_t, weights)           # (B,) the rows' weight
        prior = self.prior_weights
        per_pair = self.config.get("prior_per", "pair") == "pair"
        # A short history is held by the prior as one of FOLD_IN_LEAST_SHARE of the mean trained
        # user's interactions would be: near the run's popular items, not one item's neighbours.
        least = FOLD_IN_LEAST_SHARE * len(self.seen_items) / max(len(self.user_ids), 1)
        scale = per_user.clamp(min=least) if per_pair else torch.ones(n_users)
        optimizer = torch.optim.Adam([rows, bias] if ratings is not None else [rows], lr=FOLD_IN_LR)
        # In float32: bfloat16 products (training's, where the hardware has them) are 1.5x faster
        # here, but their rounding depends on the batch, and Adam turns it into answers that
        # moved by 1% with the other users of the batch (float32: 1e-7).
        for _ in range(self.fold_in_steps):
            scores, mixture = model.score_rows(rows, bias, return_weights=True)      # (B, n_items), (B, K, n_items)
            met = scores[position_t, items_t]                                         # (P,)
            if ratings is None:
                data = -(weights * (torch.log_softmax(scores, dim=1)[position_t, items_t])).sum()
            else:
                data = (weights * (met - torch.from_numpy(ratings).float()).pow(2)).sum()
                data = data + self._implicit(rows, position_t, items_t, weights)
            taste_norms = rows[:, 0].pow(2).sum(-1)                                   # (B, K)
            if self.config.get("share_taste_prior", False) and per_pair:  # each pair's share, by its weights
                held = weights * (scale / per_user)[position_t]                        # (P,)
                shares = mixture.detach()[position_t, :, items_t] * held.unsqueeze(1)  # (P, K)
                tastes = (shares * taste_norms[position_t]).sum()
            else:
                tastes = (scale * taste_norms.sum(1)).sum()
            loss = data + prior["tastes"] * tastes + prior["attention"] * (scale * rows[:, 1].pow(2).sum((1, 2))).sum() \
                + prior["biases"] * (scale * bias.pow(2)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return rows.detach(), bias.detach()

    def _implicit(self, rows, position, items, weights):
        """The rating task's implicit term over histories: each rated item's claim t logsumexp_k
        (A_k . e_j / t) against the claims of FOLD_IN_IMPLICIT_ITEMS items (the same for every
        history: drawn once, seed 0; every item where the run has fewer), weighted as training
        weights it. Training draws its negatives uniformly at random; a fixed draw keeps a
        fold-in deterministic, and against every item the term took 30x the rest of a step
        (P x n_items margins)."""
        weight = float(self.config.get("implicit_weight", 0.0))
        if not weight or not self.config.get("implicit_negatives", 0):
            return rows.new_zeros(())
        t = float(self.config.get("implicit_temperature", 1.0))
        n_items = len(self.item_ids)
        against = torch.from_numpy(np.sort(np.random.default_rng(0).choice(
            n_items, min(n_items, FOLD_IN_IMPLICIT_ITEMS), replace=False)))               # (C,)
        attention = rows[:, 1]                                                             # (B, K, d)
        own = torch.einsum("pkd,pd->pk", attention[position], self.model.item_factors[items]) / t  # (P, K)
        others = torch.einsum("bkd,cd->bck", attention, self.model.item_factors[against]) / t    # (B, C, K)
        margins = t * (torch.logsumexp(own, -1).unsqueeze(1) - torch.logsumexp(others, -1)[position])  # (P, C)
        return weight * (weights * torch.nn.functional.softplus(-margins).mean(1)).sum()

    def _nearest_trained(self, position, items, n_users):
        """(n_users,) the trained user whose met items overlap each history's most (cosine of
        the item sets; a history that overlaps none: the trained user of the most items)."""
        from scipy.sparse import csr_matrix

        n_items = len(self.item_ids)
        history = csr_matrix((np.ones(len(items), dtype=np.float32), (position, items)), shape=(n_users, n_items))
        history.data[:] = 1.0  # an item met twice counts once
        trained = csr_matrix((np.ones(len(self.seen_items), dtype=np.float32), self.seen_items, self.seen_indptr),
                             shape=(len(self.user_ids), n_items))
        overlap = (history @ trained.T).toarray()                                    # (n_users, n_trained)
        sizes = np.diff(self.seen_indptr).astype(np.float32)
        cosine = overlap / np.sqrt(np.maximum(sizes, 1))[None, :]
        nearest = cosine.argmax(1)
        nearest[overlap.max(1) == 0] = int(sizes.argmax())
        return nearest.astype(np.int64)

    # ------------------------------------------------------------------------- helpers

    def _mixture(self, row, items):
        """(weights, contributions), (K, len(items)) each: the mixture weights of the user's
        tastes on each item, and weight_k * (U_k . e_j), what taste k adds to the score of item j."""
        items = torch.as_tensor(items)
        _, weights, taste_scores = self.model.pair_mixture(torch.full_like(items, row), items)  # (m, K) each
        return weights.T, (weights * taste_scores).T

    def _drop_untrained(self, scores):
        """Scores (..., n_items) of the items no training row had set to -inf, in place: the model
        never saw them chosen or rated, and their vectors hold nothing but the prior and the
        implicit term's negatives (a rating run predicted such films 4.25 stars)."""
        if self.untrained is not None:
            scores[..., torch.from_numpy(self.untrained)] = -torch.inf

    def _shown(self, scores):
        """Scores as shown: predicted ratings clipped to the training ratings' range."""
        return scores.clamp(*self.rating_range) if self.rating_range else scores

    def _item_columns_at(self, item_rows, **columns):
        """{rank, item_id, title, year, genres: arrays} of the items at item_rows, in that order,
        then the given columns (arrays alike): an answer made at once (a DataFrame's per-column
        inserts cost a third of an answer's 5 ms), a DataFrame where asked for."""
        return {"rank": np.arange(1, len(item_rows) + 1),
                **{name: values[item_rows] for name, values in self.item_columns.items()}, **columns}

    # ------------------------------------------------------------------------- pictures

    def write_pictures(self, folder):
        """taste_weights.svg and item_map.svg of this run into folder (as train.py draws them)."""
        users = np.repeat(np.arange(len(self.user_ids)), np.diff(self.seen_indptr))
        import pictures  # matplotlib: only for pictures
        pictures.run_pictures(Path(folder), self.model, (users, self.seen_items), list(self.item_columns["genres"]),
                              loader.dataset_name(self.config["dataset"]), self.untrained)

    def plot_map(self, path, user_id=None):
        """The item map coloured by each item's first genre; with user_id, the user's rated
        items and taste vectors (projected by the same PCA) marked on it."""
        import pictures
        coordinates, project = pictures.item_map(self.model.item_factors.detach().numpy())
        title = f"Item embeddings (PCA): {loader.dataset_name(self.config['dataset'])}, K={self.model.n_tastes}"
        rated = tastes = None
        if user_id is not None:
            row = self.user_row(user_id)
            rated = self.rated(row)
            # Directions of the tastes: a taste scores items by U_k . e_j, so its vector points
            # where its items lie; drawn as arrows from the centre, scaled to the map.
            tastes = project(self.model.tastes[row].detach().numpy()) - project(np.zeros((1, self.model.dim)))
            title += f", user {user_id}"
        pictures.movie_map(path, coordinates, list(self.item_columns["genres"]), title, rated, tastes,
                           f"user {user_id}", self.untrained)


# A fold-in's full steps of Adam, and their lr, chosen on ML-1M's ranking run: 1,000 of its users
# folded in from their training items as new users (each from its nearest other user), validation
# NDCG@10 at 20 / 40 / 80 steps (lr 0.05) 0.2367 / 0.2383 / 0.2388, trained-in 0.2394; 25 steps
# at lr 0.1 0.2368. 40 steps: 4.0 s for the 1,000 (docs/deploy.md). With the least share below,
# 25 steps at lr 0.08 kept ML-1M (0.2389 against 0.2397) but lost Amazon Beauty's (0.0578 / 0.0595);
# lr 0.1 at 40 steps lost Beauty's too (0.0593). On sparse product data more steps pay: Beauty's
# 1,000 validation users at 40 / 80 / 120 steps 0.0595 / 0.0614 / 0.0625 (trained-in 0.0609),
# while ML-1M at 40 steps is where its users' objectives settle (fitted until each moved by under
# 1e-5 a step: 0.2398 against 0.2397, in 1.5x the time). Stopping each user at such a tolerance
# instead of after a fixed count lost on both (ML-1M at 1e-4: 0.2366; Beauty at 1e-5, 200 steps at
# most: 0.0613, in 85% of 120 steps' time). FOLD_IN_STEPS_SPARSE serve a run whose users have
# FOLD_IN_SPARSE times fewer training interactions than the ranking defaults' prior_user_pairs
# (Beauty 15x, Sports 16x; ML-1M 1x). Tried later on users the run never saw (Beauty's 2,236
# held-out users of benchmark.py --fold_in, seed 0, folded in from 80% of their given items and
# scored on the rest), NDCG@10 at steps:lr 120:0.05 0.0572, 200:0.05 0.0576, 120:0.08 0.0559,
# 120:0.03 0.0577, 120:0.02 0.0571, 120:0.01 0.0561, 200:0.03 0.0579; the prior x0.5 or x2 0.0546;
# lr decayed to 0 (cosine) 0.0572. 200:0.03, run over three draws, moved the test figures by
# -0.2% / -0.3% / +0.3% (1 / 3 / all items) in 1.6x the time: kept at 120:0.05 (docs/deploy.md).
FOLD_IN_STEPS = 40
FOLD_IN_STEPS_SPARSE, FOLD_IN_SPARSE = 120, 4.0
FOLD_IN_LR = 0.05
# A rating fold-in's implicit term: each rated item against this many items (_implicit).
FOLD_IN_IMPLICIT_ITEMS = 512
# The prior's hold on a short history: as on a user of this share of the mean user's interactions.
# Chosen on the same validation users, from 1 / 3 / all of their training items, ML-1M: share 0
# (none) 0.0401 / 0.0540 / 0.2385, 0.5 0.0571 / 0.0685 / 0.2397 (popularity 0.0546 / 0.0552);
# Amazon Beauty: 0 0.0260 / 0.0408 / 0.0602, 0.5 0.0275 / 0.0445 / 0.0595, 1 0.0190 / 0.0481 /
# 0.0601 (trained-in 0.0609). A trained user never had so few: a fold-in from one item without
# it moved that user's tastes to the item's neighbours and lost to popularity.
FOLD_IN_LEAST_SHARE = 0.5


def fold_in_steps_for(config, seen_indptr):
    """A run's fold-in steps: FOLD_IN_STEPS_SPARSE where its users with any training interaction
    have FOLD_IN_SPARSE times fewer than its prior_user_pairs (the ranking defaults' 100), else
    FOLD_IN_STEPS (loader.sparsity, as the run's own d and prior weights were set)."""
    _, sparser = loader.sparsity(np.diff(seen_indptr), float(config.get("prior_user_pairs", 0) or 0))
    return FOLD_IN_STEPS_SPARSE if sparser >= FOLD_IN_SPARSE else FOLD_IN_STEPS


def _ids_like(raw, ids):
    """Raw ids read from a file (often str) in the type of the run's ids: int64 where the run's
    ids are integers and every raw id is one (those that are not stay unknown), else str."""
    if ids.dtype.kind in "iu":
        import pandas as pd
        converted = pd.to_numeric(pd.Series(raw), errors="coerce")
        whole = converted.notna() & (converted == np.floor(converted))
        out = np.where(whole, converted.fillna(-1), -(2 ** 62)).astype(np.int64)
        return out  # an id that is no whole number is a value no run has
    return np.asarray([str(v).strip() for v in raw])


def _count(n):
    """n, the number of items asked for, checked: a whole number, at least 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise RunError(f"n is the number of items to show, a whole number of at least 1; got {n!r}")
    return int(n)


def _title(item):
    """An item's title with its year (when the title does not already end with it) and its
    genres (when the dataset names any)."""
    year = item.get("year")
    text = item["title"] + (f" ({year})" if year is not None and f"({year})" not in item["title"] else "")
    return text + (f"  [{'|'.join(item['genres'])}]" if item["genres"] else "")


def _records(columns):
    """{column: array} -> a list of {column: plain Python value}, one per row (JSON-ready)."""
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*(columns[name].tolist() for name in names))]


def _text(records, score_name):
    lines = []
    for record in records:
        extra = (f"  {score_name} {record[score_name]:.3f}  taste {record['taste']} "
                 f"(weight {record['taste_weight']:.2f})" if score_name in record else
                 f"  cosine {record['cosine']:.3f}")
        lines.append(f"{record['rank']:>3}. {_title(record)}{extra}")
    return "\n".join(lines)


def command_line():
    """The command line's parser (main; tests check the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder, runs/<run_name>")
    parser.add_argument("--user", help="a user id, as the data has it (a number or a string)")
    parser.add_argument("--n", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--tastes", action="store_true", help="the user's tastes instead")
    parser.add_argument("--similar", metavar="ITEM_ID", help="nearest items to this one (its id, as the data has it)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--plot", metavar="FILE.svg", help="draw the item map with the user on it")
    parser.add_argument("--all", action="store_true", help="every user's top n (to --out, or printed as CSV)")
    parser.add_argument("--history", metavar="FILE", help="an interactions file (any format train.py reads): each of "
                        "its users fitted to their history and answered (fold-in: no retraining)")
    parser.add_argument("--history_items", metavar="ID,ID,...", help="one new user's items, fitted and answered")
    parser.add_argument("--columns", default="", help="--history: its columns, as train.py's --columns")
    parser.add_argument("--event_weights", default="", help="--history: weigh its rows by an event column, as "
                        "train.py's --event_weights (COLUMN:VALUE=W,...)")
    parser.add_argument("--weight_column", default="", help="--history: weigh its rows by a numeric column, as "
                        "train.py's --weight_column")
    parser.add_argument("--fallback", choices=["popular"], help="--history: a user none of whose items the run "
                        "knows gets the most popular items (else refused)")
    parser.add_argument("--fold_in_steps", type=int, default=None,
                        help=f"--history: steps of Adam fitting each user (default: the run's, {FOLD_IN_STEPS}, or "
                             f"{FOLD_IN_STEPS_SPARSE} on sparse data such as Amazon's)")
    parser.add_argument("--out", metavar="FILE", help="--all, --history: write the answers to FILE (.csv or "
                        ".parquet; columns user_id, rank, item_id, score or rating, title where the run has titles)")
    return parser


def main(argv):
    parser = command_line()
    args = parser.parse_args(argv)
    batch = args.all or args.history or args.history_items
    if args.user is None and args.similar is None and not batch:
        parser.error("give --user=<id>, --similar=<item id>, --all, --history=FILE or --history_items=ID,...")
    if args.n < 1 or (args.fold_in_steps is not None and args.fold_in_steps < 1):
        parser.error("--n and --fold_in_steps must be positive")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".parquet"):
        parser.error(f"--out={args.out}: a .csv or .parquet file")
    if batch:
        return answer_many(args)
    try:
        run = Recommender.load(args.run)
        if args.similar is not None:
            answer = run.similar(args.similar, args.n).to_dict("records")
        elif args.tastes:
            answer = run.tastes(args.user, args.n)
        else:  # as recommend's DataFrame, without importing pandas (the answer's process is 2 s)
            answer = _records(run.recommend_columns(args.user, args.n))
        if args.plot:
            try:
                run.plot_map(args.plot, args.user)
            except OSError as error:
                raise RunError(f"cannot write {args.plot}: {error.strerror or error}") from None
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer))
    elif args.similar is not None or not args.tastes:
        print(_text(answer, run.score_name))
    else:
        for taste in answer:
            share = "" if taste["share"] is None else f", {taste['share']:.0%} of the user's weight"
            genres = f"; genres: {', '.join(taste['genres'])}" if taste["genres"] else ""
            print(f"taste {taste['taste']}{share}{genres}")
            print("   would recommend (the unrated items it holds the most weight on, by the model's score):")
            print("\n".join(f"     {_title(m)}  {run.score_name} {m[run.score_name]:.3f}  (weight {m['weight']:.2f})"
                            for m in taste["top_items"]) or "     (none: the other tastes hold every unrated item)")
            if taste["rated_items"]:
                print("   the user's own items it holds the most weight on:")
                print("\n".join(f"     {m['title']}  (weight {m['weight']:.2f})" for m in taste["rated_items"]))
    if args.plot:
        print(f"map written to {args.plot}", file=sys.stderr)
    return 0


def answer_many(args):
    """--all, --history, --history_items: the answers streamed block by block to --out (written
    under a temporary name and renamed: whole or absent) or printed; one line on stderr says
    how many users, how long, and what was left out. Exit 0, or 2 with one line."""
    import time

    import pandas as pd

    started = time.perf_counter()
    try:
        run = Recommender.load(args.run, quiet=True)
        run.fold_in_steps = args.fold_in_steps or run.fold_in_steps
        if args.all:
            blocks, what = run.iter_recommend_all(args.n), f"{len(run.user_ids):,} users of the run"
        else:
            history = read_history(args.history, args.columns, args.event_weights, args.weight_column) \
                if args.history else pd.DataFrame(
                {"user_id": "new", "item_id": [i.strip() for i in args.history_items.split(",") if i.strip()]})
            blocks = run.iter_histories(history, args.n, args.fallback)
            what = f"{history['user_id'].nunique():,} users of {args.history or '--history_items'}"
        users, counts = write_answers(blocks, args.out, args.json)
    except (RunError, loader.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    notes = ([f"{counts['unknown_items']:,} history rows name items the run never saw (left out)"]
             if counts.get("unknown_items") else []) + \
        ([f"{counts['popular_for']:,} users with no known item got the most popular items"] if counts.get("popular_for") else [])
    print(f"answered {users:,} of {what} in {time.perf_counter() - started:.1f} s"
          + (f"; written to {args.out}" if args.out else "") + "".join(f"; {note}" for note in notes), file=sys.stderr)
    return 0


def read_history(path, columns="", event_weights="", weight_column=""):
    """An interactions file as train.py reads it (formats.read_interactions: any format, its
    column rules, --columns, the rows' weights) -> DataFrame user_id, item_id[, rating][, weight]."""
    import pandas as pd

    import formats

    if not Path(path).is_file():
        raise RunError(f"--history={path}: no such file")
    found = formats.read_interactions(path, columns, weights=formats.parse_weights(event_weights, weight_column))
    frame = pd.DataFrame({"user_id": found.user_ids[found.users], "item_id": found.item_ids[found.items]})
    if found.ratings is not None:
        frame["rating"] = found.ratings
    if found.weights is not None:
        frame["weight"] = found.weights
    return frame


def write_answers(blocks, out, as_json=False):
    """Each block (a DataFrame) appended to out (.csv or .parquet), else printed (CSV, or JSON
    lines with --json). -> (how many users were answered, the blocks' attrs: a history's counts)."""
    import os

    users, counts = 0, {}
    temporary = out and Path(out).with_name(f".{Path(out).name}.{os.getpid()}{files.TEMPORARY}")
    writer = None
    try:
        for k, frame in enumerate(blocks):
            users += frame["user_id"].nunique()
            counts = frame.attrs
            if out is None:
                if as_json:
                    sys.stdout.write(frame.to_json(orient="records", lines=True))
                else:
                    frame.to_csv(sys.stdout, index=False, header=k == 0)
            elif Path(out).suffix.lower() == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(temporary, table.schema)
                writer.write_table(table)
            else:
                frame.to_csv(temporary, index=False, header=k == 0, mode="w" if k == 0 else "a")
        if writer is not None:
            writer.close()
        if out is not None:
            os.replace(temporary, out)
    except OSError as error:
        raise RunError(f"cannot write {out} ({error.strerror or error})") from None
    finally:
        if temporary:
            Path(temporary).unlink(missing_ok=True)
    return users, counts


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
