"""Pictures of a run, as SVG files: its metric curves, how its users spread their weight over their
tastes, and the movie map (the item embeddings in 2-D). train.py draws them at the end of every
run; recommend.py draws the movie map with one user on it.

Everything here takes plain arrays (and the model, for the mixture weights), and imports
matplotlib only when it draws.
"""

import gc
import io
from pathlib import Path

import numpy as np
import torch

from files import write_atomically


def _pyplot():
    """matplotlib's pyplot on its SVG backend, imported on first use (a quarter of a second; with
    the collector off while its objects are built, as train.py's imports, 15% less)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
    finally:
        if collecting:
            gc.enable()
    return plt


def save(fig, path, **savefig_kwargs):
    """fig.savefig(path), and the figure closed. The picture is drawn in memory and written by
    files.write_atomically: whole or absent (a disk that filled mid-picture left the first 8 KB
    of an SVG), and a failed write names the picture."""
    drawn = io.BytesIO()
    try:
        fig.savefig(drawn, format=Path(path).suffix[1:], **savefig_kwargs)
    finally:
        _pyplot().close(fig)
    write_atomically(path, drawn.getvalue())


# The pictures of every run have fixed margins (fractions of the figure) where tight_layout
# measured every label first: that measuring was a third of the drawing time.
MARGINS = dict(left=0.12, right=0.97, bottom=0.13, top=0.9)


def metric_curves(folder, rows, plots, best_epoch, title):
    """One SVG per (filename, name, [(column, label), ...], ylabel) of plots: the columns of the
    per-epoch rows against the epoch, with the best epoch (by validation) marked."""
    plt = _pyplot()
    for filename, name, curves, ylabel in plots:
        curves = [(column, label) for column, label in curves if any(column in r for r in rows)]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for column, label in curves:
            measured = [r for r in rows if column in r]  # with eval_every > 1, not every epoch
            ax.plot([r["epoch"] for r in measured], [r[column] for r in measured], marker="o", markersize=3,
                    label=label)
        ax.axvline(best_epoch, color="grey", linestyle=":", label="best epoch (val)")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{name}: {title}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.subplots_adjust(**MARGINS)
        save(fig, folder / filename)


def mean_weights(model, users, items, n_users):
    """(n_users, K): each user's mixture weights averaged over the given (user, item) pairs
    (numpy index arrays: the movies each user rated)."""
    out = torch.zeros(n_users, model.n_tastes, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(items), 1 << 16):
            u = torch.from_numpy(users[start:start + (1 << 16)])
            weights = model.mixture_weights(u, torch.from_numpy(items[start:start + (1 << 16)]))  # (m, K)
            out.index_add_(0, u, weights.double())  # 2x faster than np.add.at
    return out.numpy() / np.maximum(np.bincount(users, minlength=n_users), 1)[:, None]


def item_map(vectors):
    """2-D PCA of the item embeddings (n_items, d): (coordinates (n_items, 2), the function that
    projects any (m, d) vectors the same way). The principal axes are the top right singular
    vectors of the centred embeddings (numpy's SVD of an n_items x d matrix: milliseconds, where
    importing scikit-learn for its PCA took a second of every run), each signed so that its
    largest loading is positive (scikit-learn's convention), so a map does not flip between
    runs. With d=1 the second axis is 0."""
    vectors = np.asarray(vectors, dtype=np.float64)
    mean = vectors.mean(0)
    _, _, axes = np.linalg.svd(vectors - mean, full_matrices=False)                 # (d, d)
    axes = axes[:2] * np.sign(axes[:2][np.arange(min(2, len(axes))), np.abs(axes[:2]).argmax(1)])[:, None]
    if len(axes) < 2:
        axes = np.vstack([axes, np.zeros_like(axes)])

    def project(v):
        return (np.asarray(v, dtype=np.float64) - mean) @ axes.T

    return project(vectors), project


def taste_weights(path, mean, title, drawn=""):
    """Over users: the entropy of their mean mixture weights, and the share of their top taste;
    a mixture whose users all collapse onto one taste shows at a glance. drawn: a note on the
    title when mean holds a sample of the users."""
    plt = _pyplot()
    entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    k = mean.shape[1]
    # Filled outlines: one path per histogram instead of one rectangle per bar.
    axes[0].hist(entropy, bins=40, range=(0, max(np.log(k), 1e-6)), color="tab:blue", histtype="stepfilled")
    axes[0].set(xlabel=f"entropy of the user's mean mixture weights (max log K = {np.log(k):.2f})",
                ylabel="users", title="How evenly users use their tastes")
    axes[1].hist(mean.max(1), bins=40, range=(1 / k, 1), color="tab:orange", histtype="stepfilled")
    axes[1].set(xlabel="share of the user's top taste", ylabel="users",
                title="1/K: all tastes used; 1: collapsed onto one")
    fig.suptitle(f"{title}: users' mean mixture weights over their movies{drawn}")
    fig.subplots_adjust(**{**MARGINS, "left": 0.07, "top": 0.85, "wspace": 0.25})
    save(fig, path)


def movie_map(path, coordinates, genres, title, rated=None, tastes=None, user_label="", untrained=None):
    """The movie map: coordinates (n_items, 2) coloured by each movie's first genre (genres: a
    list of name lists); with rated (item rows) and tastes ((K, 2) directions on the same map),
    one user's movies circled and the user's tastes as arrows from the centre. untrained
    ((n_items,) bool): the items no training row has, marked apart: their vectors never met a
    positive (only the prior and, in the rating task, the implicit term's sampled negatives),
    so they stand apart from the rest as a cluster of their own."""
    from collections import Counter
    plt = _pyplot()
    first = [g[0] if len(g) else "(none)" for g in genres]
    common = [genre for genre, _ in Counter(first).most_common(8)]
    fig, ax = plt.subplots(figsize=(8, 7))
    # Above MAP_VECTOR_POINTS the dots are one image inside the SVG (axes and text stay vector):
    # 59,047 dots as vector shapes took 1.7 s and 8.7 MB, as an image 0.2 s and 0.4 MB.
    image = len(coordinates) > MAP_VECTOR_POINTS
    for genre in common + ["other"]:
        members = np.array([(g if g in common else "other") == genre for g in first])
        ax.scatter(*coordinates[members].T, s=4, alpha=0.5, label=genre,
                   color="lightgrey" if genre == "other" else None, rasterized=image)
    if untrained is not None and untrained.any():
        ax.scatter(*coordinates[untrained].T, s=14, marker="x", color="black", linewidths=0.8,
                   label=f"never in training ({int(untrained.sum())})")
    if rated is not None:
        ax.scatter(*coordinates[rated].T, s=18, facecolors="none", edgecolors="black",
                   label=f"rated by {user_label}")
    if tastes is not None:
        # Scaled so that the longest arrow reaches 80% of the map along each axis.
        scale = 0.8 * min(np.abs(coordinates[:, axis]).max() / max(np.abs(tastes[:, axis]).max(), 1e-9)
                          for axis in (0, 1) if np.abs(coordinates[:, axis]).max() > 0)
        for k, (x, y) in enumerate(tastes * scale):
            ax.annotate("", (x, y), (0, 0), arrowprops={"arrowstyle": "->", "color": "red", "lw": 2})
            ax.text(x, y, f" taste {k + 1}", color="red", fontsize=11)
    ax.set(title=title, xlabel="first principal component", ylabel="second principal component")
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.subplots_adjust(**{**MARGINS, "left": 0.1, "bottom": 0.08, "top": 0.94})
    save(fig, path, dpi=150)  # the resolution of the dots' image, where there is one


MAP_VECTOR_POINTS = 10_000  # item maps with more dots draw them as an image (movie_map)
PICTURE_USERS = 20_000      # taste_weights.svg's histograms over at most this many users (run_pictures)


def run_pictures(folder, model, seen, genres, dataset, untrained=None):
    """The pictures of every finished run, into folder: taste_weights.svg (how users spread their
    weight over tastes, over the (users, items) pairs of seen) and item_map.svg (the item
    embedding in 2-D, coloured by genre, the items never in training marked). Above
    PICTURE_USERS users the histograms are of that many drawn at random (seed 0), with all their
    pairs: the same shape, where the mixture weights of every pair took 5 s at ML-25M's 24.5M."""
    title = f"{dataset}, K={model.n_tastes}"
    users, items = seen
    chosen, drawn = np.ones(model.n_users, dtype=bool), ""
    if model.n_users > PICTURE_USERS:
        chosen[:] = False
        chosen[np.random.default_rng(0).choice(model.n_users, PICTURE_USERS, replace=False)] = True
        kept = chosen[users]                                                       # (pairs,)
        users, items = users[kept], items[kept]
        drawn = f" ({PICTURE_USERS:,} users drawn of {model.n_users:,})"
    taste_weights(folder / "taste_weights.svg", mean_weights(model, users, items, model.n_users)[chosen], title,
                  drawn)
    coordinates, _ = item_map(model.item_factors.detach().numpy())
    movie_map(folder / "item_map.svg", coordinates, genres, f"Item embeddings (PCA): {title}", untrained=untrained)


def purity_histograms(path, purities):
    """Per-account purity of shared accounts' tastes (benchmark.py --shared-accounts): one panel
    per (accounts, task), the mixtures' purities beside the largest person's share (what one
    taste scores). purities: {(accounts, task, K): (per-account purity, per-account largest
    share)}."""
    plt = _pyplot()
    panels = sorted({(label, task) for label, task, _ in purities}, key=lambda p: (p[0], p[1] != "rating"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, task) in zip(axes[0], panels):
        curves = [(key[2], values) for key, values in purities.items() if key[:2] == (label, task)]
        base = curves[0][1][1]
        ax.hist(base, bins=40, range=(0.3, 1), histtype="stepfilled", color="lightgrey",
                label=f"largest person's share, mean {base.mean():.2f}")
        for k, (got, _) in curves:
            ax.hist(got, bins=40, range=(0.3, 1), histtype="step", lw=2, label=f"K={k} tastes, mean {got.mean():.2f}")
        ax.set(xlabel="purity of the account's tastes against its people", ylabel="accounts",
               title=f"{task}: {label.split(' (')[0]}")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save(fig, path)


def account_map(path, coordinates, rated, person, taste, title):
    """One shared account's movies on the movie map, twice: coloured by the real person who rated
    each (left) and by its dominant taste (right), every other movie in grey. coordinates
    (n_items, 2): item_map of the run's item vectors; rated, person, taste: (m,) the account's
    movie rows, their persons and dominant tastes."""
    plt = _pyplot()
    persons = np.unique(person)
    which = np.searchsorted(persons, person)                      # (m,) 0..n_persons-1
    # The tastes in the order of the person each mostly holds, so that a taste that found a
    # person wears that person's colour.
    tastes = sorted(np.unique(taste), key=lambda k: np.bincount(which[taste == k], minlength=len(persons)).argmax())
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True, sharey=True)
    for ax, (groups, order, name) in zip(axes, ((person, persons, "person"), (taste, tastes, "taste"))):
        ax.scatter(*coordinates.T, s=3, color="lightgrey", rasterized=True)  # 3,700 points: one image
        for n, group in enumerate(order):
            members = rated[groups == group]
            ax.scatter(*coordinates[members].T, s=12, color=("tab:blue", "tab:orange", "tab:green", "tab:red")[n % 4],
                       label=f"{name} {group + 1 if name == 'taste' else n + 1}: {len(members)} movies")
        ax.set(title=f"coloured by {name}", xlabel="first principal component")
        ax.legend(markerscale=2, fontsize=9, loc="best")
    axes[0].set(ylabel="second principal component")
    fig.suptitle(title)
    fig.subplots_adjust(**{**MARGINS, "left": 0.07, "bottom": 0.1, "top": 0.88, "wspace": 0.08})
    save(fig, path)


def cost_curve(path, rows):
    """benchmark.py --cost_curve's picture: one panel per axis (interactions, users, items), the
    seconds of a rating epoch, a ranking epoch, a validation ranking, ALS and EASE fits against
    that axis (log-log), the other two held at the base shape. rows: studies.cost_curve's dicts."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [("rating_epoch", "rating epoch"), ("ranking_epoch", "ranking epoch"),
              ("ranking_eval", "validation ranking (all items)"), ("als_fit", "ALS, 3 iterations"),
              ("ease_fit", "EASE fit")]
    for ax, axis in zip(axes, ("interactions", "users", "items")):
        points = sorted((r for r in rows if r["axis"] in (axis, "base")), key=lambda r: r[axis])
        for key, label in series:
            xs = [r[axis] for r in points if key in r]
            if xs:
                ax.plot(xs, [r[key] for r in points if key in r], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="seconds", title=f"against {axis}")
    axes[0].legend(fontsize=8)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.9, wspace=0.25)
    save(fig, path)
