"""Ask a trained run for recommendations, and look at what its tastes learned.

    python recommend.py runs/<run> --user=42                 # top 10 items user 42 has not met
    python recommend.py runs/<run> --user=42 --n=20 --json   # the same as JSON, for other programs
    python recommend.py runs/<run> --user=42 --tastes        # each taste of user 42, with its items
    python recommend.py runs/<run> --similar=1               # nearest items to item 1 (cosine)
    python recommend.py runs/<run> --user=42 --plot=u42.svg  # the item map with user 42 on it

From Python, every answer is plain data (a pandas DataFrame, or lists of dicts):

    from recommend import Recommender
    run = Recommender.load("runs/<run>")
    run.recommend(42, n=10)      # DataFrame: rank, item_id, title, year, genres, score, taste, taste_weight
                                 # (score is called rating in rating runs: a predicted rating)
    run.tastes(42)               # [{"taste": 1, "share": 0.61, "top_items": [...], "genres": [...],
                                 #   "rated_items": [...]}, ...]
    run.rated_tastes(42)         # DataFrame: item_id, title, taste, weight, for each item user 42 met
    run.similar(1)               # DataFrame: rank, item_id, title, year, genres, cosine
    run.recommend_all(n=10)      # DataFrame: user_id, rank, item_id, score (or rating), every user

A run folder answers on its own: train.py leaves in it the best model, config.json, dataset.npz
(the raw ids of the model's rows and each user's rated or met items) and items.json (titles and
genres, when the dataset has a movie file or an --items file; otherwise items are named by id).
Items are called items, whatever the data: a movie of MovieLens, a product of a review set.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import files
import loader
from files import RunError
from MFMixTaste import MFMixTaste


class Recommender:
    def __init__(self, model, config, user_ids, item_ids, seen_indptr, seen_items, items):
        self.model, self.config = model.eval(), config
        self.user_ids, self.item_ids = user_ids, item_ids          # raw ids of the rows, sorted
        self.seen_indptr, self.seen_items = seen_indptr, seen_items  # CSR: user row -> item rows
        self.items = items  # DataFrame indexed by item row: item_id, title, year (int or None), genres
        self.rating_range = None  # (low, high) of a rating run's training ratings
        self.untrained = None     # (n_items,) bool: items no training row had (None: not recorded)
        # What a score means: a predicted rating for rating runs, a ranking score otherwise.
        self.score_name = "rating" if config.get("task", "rating") == "rating" else "score"

    @classmethod
    def load(cls, run_dir, quiet=False):
        """A finished run folder; quiet: no note when its items have no titles. A damaged file in
        it is a RunError that names the file."""
        config, arrays, items, best = files.read_run(run_dir, quiet)
        user_ids, item_ids = arrays["user_ids"], arrays["item_ids"]
        model = MFMixTaste.from_config(config, len(user_ids), len(item_ids))
        try:
            model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
        except Exception as error:  # truncated or foreign file: torch raises many kinds
            raise RunError(f"{best} is damaged or not this run's model ({type(error).__name__})") from None
        run = cls(model, config, user_ids, item_ids, arrays["seen_indptr"], arrays["seen_items"], items)
        run.untrained = ~arrays["trained_items"] if "trained_items" in arrays else None  # older runs: unknown
        # Predicted ratings are shown within the training ratings' range, as train.py evaluates
        # them (clip_predictions); run folders written before the range was kept show them raw.
        rating_range = arrays.get("rating_range", ())
        run.rating_range = tuple(float(v) for v in rating_range) if len(rating_range) == 2 else None
        return run

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
        row, n = self.user_row(user_id), _count(n)
        with torch.no_grad():
            scores = self.model.score_all(torch.tensor([row]))[0]                   # (n_items,)
            scores[torch.from_numpy(self.rated(row))] = -torch.inf
            self._drop_untrained(scores)
            top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum()))).indices
            weights, contributions = self._mixture(row, top)                        # (K, n) each
        best_taste = contributions.argmax(0)
        frame = self._item_frame(top.numpy())
        frame[self.score_name] = self._shown(scores[top]).double().numpy().round(4)
        frame["taste"] = best_taste.numpy() + 1
        frame["taste_weight"] = weights.gather(0, best_taste.unsqueeze(0))[0].double().numpy().round(3)
        return frame

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
            genres = pd.Series([g for names in self.items["genres"].iloc[top[:20].numpy()] for g in names])
            top_items = self._item_frame(top[:n].numpy())
            top_items[self.score_name] = self._shown(scores[top[:n]]).double().numpy().round(4)
            top_items["weight"] = weights[k, top[:n]].double().numpy().round(3)
            answer.append({"taste": k + 1, "share": None if shares is None else round(float(shares[k]), 3),
                           "top_items": top_items.to_dict("records"),
                           "genres": genres.value_counts().head(3).index.tolist(),
                           "rated_items": own[own["taste"] == k + 1].head(n).to_dict("records")})
        return answer

    def rated_tastes(self, user_id):
        """One row per item the user rated (or met): item_id, title, taste (1..K, the taste of the
        largest mixture weight on it) and weight (that weight); by taste, highest weight first."""
        row = self.user_row(user_id)
        rated = self.rated(row)
        with torch.no_grad():
            weights = self.model.mixture_weights(torch.full((len(rated),), row), torch.from_numpy(rated))  # (m, K)
        best = weights.max(1)
        frame = pd.DataFrame({"item_id": self.item_ids[rated], "title": self.items["title"].iloc[rated].to_numpy(),
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
        frame = self._item_frame(top.numpy())
        frame["cosine"] = cosine[top].double().numpy().round(4)
        return frame

    def recommend_all(self, n=10, block=1024):
        """Every user's top n unrated (unmet) items: DataFrame user_id, rank, item_id and score (rating,
        for rating runs); blocks of users scored against all items at once. A user with fewer
        than n such items gets them all."""
        n = min(_count(n), len(self.item_ids))
        users, ranks, chosen, scores = [], [], [], []
        with torch.no_grad():
            for start in range(0, len(self.user_ids), block):
                rows = torch.arange(start, min(start + block, len(self.user_ids)))
                block_scores = self.model.score_all(rows)                           # (B, n_items)
                counts = self.seen_indptr[start + 1:rows[-1] + 2] - self.seen_indptr[start:rows[-1] + 1]
                position = np.repeat(np.arange(len(rows)), counts)
                seen = self.seen_items[self.seen_indptr[start]:self.seen_indptr[rows[-1] + 1]]
                block_scores[position, seen] = -torch.inf
                self._drop_untrained(block_scores)
                values, items = torch.topk(block_scores, n, dim=1)
                unrated = torch.isfinite(values).numpy().ravel()  # -inf: rated, past the user's last
                users.append(np.repeat(self.user_ids[rows.numpy()], n)[unrated])
                ranks.append(np.tile(np.arange(1, n + 1), len(rows))[unrated])
                chosen.append(self.item_ids[items.numpy().ravel()][unrated])
                scores.append(self._shown(values).numpy().ravel()[unrated])
        return pd.DataFrame({"user_id": np.concatenate(users), "rank": np.concatenate(ranks),
                             "item_id": np.concatenate(chosen), self.score_name: np.concatenate(scores)})

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

    def _item_frame(self, item_rows):
        frame = self.items.iloc[item_rows][["item_id", "title", "year", "genres"]].reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        return frame

    # ------------------------------------------------------------------------- pictures

    def write_pictures(self, folder):
        """taste_weights.svg and item_map.svg of this run into folder (as train.py draws them)."""
        users = np.repeat(np.arange(len(self.user_ids)), np.diff(self.seen_indptr))
        import pictures  # matplotlib: only for pictures
        pictures.run_pictures(Path(folder), self.model, (users, self.seen_items), list(self.items["genres"]),
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
        pictures.movie_map(path, coordinates, list(self.items["genres"]), title, rated, tastes,
                           f"user {user_id}", self.untrained)


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


def _text(frame, score_name):
    lines = []
    for record in frame.to_dict("records"):
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
    return parser


def main(argv):
    parser = command_line()
    args = parser.parse_args(argv)
    if args.user is None and args.similar is None:
        parser.error("give --user=<id> or --similar=<item id>")
    if args.n < 1:
        parser.error("--n must be positive")
    try:
        run = Recommender.load(args.run)
        if args.similar is not None:
            answer = run.similar(args.similar, args.n)
        elif args.tastes:
            answer = run.tastes(args.user, args.n)
        else:
            answer = run.recommend(args.user, args.n)
        if args.plot:
            try:
                run.plot_map(args.plot, args.user)
            except OSError as error:
                raise RunError(f"cannot write {args.plot}: {error.strerror or error}") from None
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer.to_dict("records") if isinstance(answer, pd.DataFrame) else answer))
    elif isinstance(answer, pd.DataFrame):
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
