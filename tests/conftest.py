"""Small MovieLens-format data built on the fly: no network and no real MovieLens files."""

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


def mixture_ratings(n_users=120, n_items=80, n_ratings=6000, n_tastes=3, dim=4, seed=0):
    """Ratings drawn from a known mixture of tastes: each user has n_tastes taste vectors and
    the item's closest taste (by attention) decides the score. Returns raw ids (sparse, not
    starting at 0, to exercise the id mapping) and ratings rounded to halves in [1, 5]."""
    rng = np.random.default_rng(seed)
    tastes = rng.normal(0, 1.0, (n_users, n_tastes, dim))
    attention = rng.normal(0, 3.0, (n_users, n_tastes, dim))
    item_vectors = rng.normal(0, 1.0, (n_items, dim))
    user_bias, item_bias = rng.normal(0, 0.3, n_users), rng.normal(0, 0.3, n_items)
    pairs = rng.choice(n_users * n_items, size=n_ratings, replace=False)
    users, items = pairs // n_items, pairs % n_items
    logits = np.einsum("bkd,bd->bk", attention[users], item_vectors[items])
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    scores = (weights * np.einsum("bkd,bd->bk", tastes[users], item_vectors[items])).sum(1)
    ratings = 3.5 + user_bias[users] + item_bias[items] + 0.8 * scores
    ratings = np.clip(np.round(ratings * 2) / 2, 1, 5)
    return users * 7 + 3, items * 11 + 5, ratings


def write_ratings(path, users, items, ratings, sep="::", header=None):
    """A ratings file in MovieLens layout: user, item, rating, timestamp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] if header else []
    lines += [f"{u}{sep}{i}{sep}{r:g}{sep}{978300000 + k}"
              for k, (u, i, r) in enumerate(zip(users, items, ratings))]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_zip(archive, folder, files):
    """A zip laid out as GroupLens's: folder/name for each (name, path) in files."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, path in files.items():
            zipped.write(path, f"{folder}/{name}")
    return archive


@pytest.fixture
def synthetic_ml100k(tmp_path):
    """A data_dir holding a synthetic ml-100k folder (tab-separated u.data)."""
    data_dir = tmp_path / "data"
    write_ratings(data_dir / "ml-100k" / "u.data", *mixture_ratings(), sep="\t")
    return data_dir
