"""A run folder's files: written whole or not at all (a kill, a crash or a full disk leaves the
old file or the new one, never half of one), and read back checked, each damaged or foreign
file named in one RunError. runs.py (a run's folder) and pictures.py (its SVGs) write through it;
recommend.py reads a finished run with it, without importing Ignite or anything a training run
needs (an answer's process then starts in the time torch takes to import). (loader.py streams its
parse cache through a temporary file of its own: a cache of 25M rows is not held twice in memory.)"""

import json
import math
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

TEMPORARY = ".tmp"  # the suffix of a file being written (here, and runs.RunFolderSaver's checkpoints)


def write_atomically(path, content):
    """Write content (str or bytes) to a temporary file beside path and rename it over path: an
    interruption leaves the old file or the new one, never half of one. A failed write is an
    OSError that names path (a full disk's error names no file)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY}")
    try:
        if isinstance(content, str):
            temporary.write_text(content)
        else:
            temporary.write_bytes(content)
        os.replace(temporary, path)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        temporary.unlink(missing_ok=True)


class RunError(Exception):
    """A run folder or an id that cannot answer: the message says which and why."""


def best_model_file(run_dir):
    """The run's best model: of its best_*.pt files (one, unless an interruption fell between
    Ignite's writing a better one and deleting the old), the one of the highest score, then the
    latest epoch, read from the name Ignite's Checkpoint gives it, best_model_<epoch>_<score
    name>=<score>.pt, higher being better (a loss is saved negated). None when there is none."""
    found = []
    for path in Path(run_dir).glob("best_*.pt"):
        named = re.search(r"_(\d+)_[^=]*=(-?\d+(?:\.\d+)?(?:e-?\d+)?)\.pt$", path.name)
        key = (float(named.group(2)), int(named.group(1))) if named else (-math.inf, -1)
        found.append((key, path))
    return max(found)[1] if found else None


def _read(path, reader):
    """reader(path), with a damaged or foreign file named in a RunError."""
    try:
        return reader(path)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        raise RunError(f"{path} is damaged or not this run's ({type(error).__name__}: "
                       f"{str(error)[:120] or 'no detail'}); rerun train.py to write it again") from None


def _json_object(path, keys):
    value = json.loads(Path(path).read_text())
    if not isinstance(value, dict) or not all(k in value for k in keys):
        raise ValueError(f"expected a JSON object with {', '.join(keys)}")
    return value


def _npz(path, keys):
    with np.load(path, allow_pickle=False) as arrays:
        found = {k: arrays[k] for k in arrays.files}
    missing = [k for k in keys if k not in found]
    if missing:
        raise KeyError(f"it has no {', '.join(missing)}")
    return found


def _items(path, n_items):
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list) or len(records) != n_items or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"expected a list of {n_items} items")
    # Run folders written before items were called items keep movies.json, keyed "movie_id".
    key = "item_id" if not records or "item_id" in records[0] else "movie_id"
    # Years stay whole numbers, None where a title has none (a float would print 1953.0, and NaN
    # is not JSON).
    return item_columns([r.get(key) for r in records], [r.get("title") for r in records],
                        [None if r.get("year") is None or r["year"] != r["year"] else int(r["year"]) for r in records],
                        [r.get("genres") for r in records])


def item_columns(item_ids, titles, years, genres):
    """A run's items as {item_id, title, year, genres: (n_items,) arrays}: numpy, not pandas, so
    that an answer's process need not import pandas (0.3 s of its 2)."""
    columns = {"item_id": np.asarray(item_ids)}
    for name, values in (("title", titles), ("year", years), ("genres", genres)):
        columns[name] = np.empty(len(values), dtype=object)
        columns[name][:] = values
    return columns


def read_run(run_dir, quiet=False):
    """A finished run folder's files, checked: (config, arrays of dataset.npz, the items'
    columns (item_columns: item_id, title, year as int or None, genres), best model path). A
    missing folder or an unfinished run, or a damaged file, is a RunError that says which."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.json there)")
    best, data = best_model_file(run_dir), run_dir / "dataset.npz"
    if best is None or not data.is_file():
        raise RunError(f"{run_dir} is unfinished: a run leaves its best model and dataset.npz "
                       f"when it ends; let it finish, or continue it with "
                       f"`python train.py --resume={run_dir}`")
    config = _read(run_dir / "config.json", lambda path: _json_object(path, ("dim", "n_tastes")))
    arrays = _read(data, lambda path: _npz(path, ("user_ids", "item_ids", "seen_indptr", "seen_items")))
    item_ids = arrays["item_ids"]
    names_file = next((run_dir / name for name in ("items.json", "movies.json") if (run_dir / name).is_file()), None)
    if names_file is not None:
        items = _read(names_file, lambda path: _items(path, len(item_ids)))
    else:
        if not quiet:
            print(f"note: {run_dir} has no items.json (the dataset had no item names): items are "
                  "named by id", file=sys.stderr)
        items = item_columns(item_ids, [str(i) for i in item_ids], [None] * len(item_ids), [[] for _ in item_ids])
    return config, arrays, items, best
