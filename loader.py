"""MovieLens ratings: find or download, verify, parse, cache, index, split and batch.

    ratings = load("ml-1m", "data")            # local copy, else download from GroupLens
    train, val, test = split(len(ratings))     # the replaced script's 75/25 protocol + a val slice
    batches = BatchIterator(ratings.tensors(train), batch_size=8192, seed=0)

A local copy is used without any network: the folder as the official zip extracts it
(<data_dir>/ml-1m/ratings.dat) or the zip itself (<data_dir>/ml-1m.zip). Parsed arrays are cached
beside the ratings file (or in ~/.cache/mfmixtaste when that folder is read-only), so a second run
loads in well under a second. The data is never redistributed: its licence forbids it.
"""

import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
CACHE_VERSION = 2  # 2: ratings lines must have their four fields


class DataError(Exception):
    """Bad or missing data: the message says what and where."""


@dataclass(frozen=True)
class MovieLens:
    url: str             # the official archive
    md5: str | None      # fixed archive checksum, where GroupLens fixes one
    md5_url: str | None  # else the .md5 file published beside it, read at download time
    folder: str          # top folder inside the archive
    ratings_file: str    # ratings file inside that folder
    sep: str
    header: bool
    encoding: str


def _grouplens(name, md5, folder, ratings_file, sep, header, encoding="utf-8"):
    return MovieLens(f"{GROUPLENS}{name}.zip", md5, None if md5 else f"{GROUPLENS}{name}.zip.md5",
                     folder, ratings_file, sep, header, encoding)


DATASETS = {
    "ml-100k": _grouplens("ml-100k", "0e33842e24a9c977be4e0107933c0723", "ml-100k", "u.data",
                          "\t", False, "latin-1"),
    "ml-1m": _grouplens("ml-1m", "c4d9eecfca2ab87c1945afe126590906", "ml-1m", "ratings.dat",
                        "::", False, "latin-1"),
    "ml-10m": _grouplens("ml-10m", "ce571fd55effeba0271552578f2648bd", "ml-10M100K",
                         "ratings.dat", "::", False),
    "ml-20m": _grouplens("ml-20m", "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m", "ratings.csv",
                         ",", True),
    "ml-25m": _grouplens("ml-25m", "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m", "ratings.csv",
                         ",", True),
    "ml-32m": _grouplens("ml-32m", "d472be332d4daa821edc399621853b57", "ml-32m", "ratings.csv",
                         ",", True),
    # GroupLens rebuilds ml-latest-small from time to time: its checksum is read at download.
    "ml-latest-small": _grouplens("ml-latest-small", None, "ml-latest-small", "ratings.csv",
                                  ",", True),
}


def dataset_spec(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- ratings

class _IdMaps:
    """n_users and n_items of a dataclass that holds the raw id arrays user_ids and item_ids."""

    @property
    def n_users(self):
        return len(self.user_ids)

    @property
    def n_items(self):
        return len(self.item_ids)


@dataclass
class Ratings(_IdMaps):
    """All ratings of one dataset in file order, with users and items mapped to contiguous
    indices 0..n-1 (user_ids[k] is the raw MovieLens id of index k; both id arrays are sorted,
    so raw ids map back with np.searchsorted). Sparse raw id spaces (ml-25m's movie ids pass
    200,000) therefore cost nothing in the embedding tables."""
    users: np.ndarray     # (N,) int64 user index
    items: np.ndarray     # (N,) int64 item index
    ratings: np.ndarray   # (N,) float32
    user_ids: np.ndarray  # (n_users,) int64 raw ids, sorted
    item_ids: np.ndarray  # (n_items,) int64 raw ids, sorted

    def __len__(self):
        return len(self.ratings)

    def index_of(self, raw_users, raw_items):
        """Raw MovieLens ids -> (user indices, item indices); an unknown id is a KeyError."""
        return (_lookup(self.user_ids, raw_users, "user"), _lookup(self.item_ids, raw_items, "item"))

    def tensors(self, rows=None, device="cpu"):
        """(users, items, ratings) as tensors on device, for the given row indices (default all)."""
        sel = slice(None) if rows is None else rows
        return tuple(torch.from_numpy(np.ascontiguousarray(a[sel])).to(device)
                     for a in (self.users, self.items, self.ratings))


def positions(ids, raw):
    """Raw ids -> (their indices in the sorted id array ids, whether each is there at all): the
    index of an absent id is meaningless, so read it only where known is True."""
    raw = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    index = np.searchsorted(ids, raw).clip(max=len(ids) - 1)
    return index.astype(np.int64), ids[index] == raw


def pairs_within(ratings, user_ids, item_ids):
    """(users, items) index arrays, in the index space of the sorted raw ids user_ids and
    item_ids, of every rating whose user and item are both there (the others are dropped)."""
    users, known_users = positions(user_ids, ratings.user_ids[ratings.users])
    items, known_items = positions(item_ids, ratings.item_ids[ratings.items])
    known = known_users & known_items
    return users[known], items[known]


def _lookup(ids, raw, kind):
    pos, known = positions(ids, raw)
    if not known.all():
        raise KeyError(f"unknown {kind} id {int(np.atleast_1d(raw)[~known][0])}")
    return pos


def encode(raw_users, raw_items, ratings):
    """Raw id arrays -> Ratings with contiguous indices (np.unique sorts the ids)."""
    user_ids, users = np.unique(raw_users, return_inverse=True)
    item_ids, items = np.unique(raw_items, return_inverse=True)
    return Ratings(users.astype(np.int64), items.astype(np.int64),
                   np.asarray(ratings, dtype=np.float32), user_ids.astype(np.int64),
                   item_ids.astype(np.int64))


# ----------------------------------------------------------------------------- parsing

FIELDS = 4  # user, item, rating, timestamp: every MovieLens ratings file has four per line


def parse_ratings(path, sep, header, encoding="utf-8", with_timestamps=False):
    """Read user, item and rating of a ratings file (the timestamp must be there, and is
    returned as a fourth array with with_timestamps).

    pandas' C parser reads ML-1M in ~0.3 s; the '::' separator of ml-1m and ml-10m is rewritten to
    a tab first, because pandas only parses multi-character separators with its Python engine
    (10x slower). Any anomaly (a missing or extra field, a non-number) sends us to a line-by-line
    scan that names the first bad line."""
    import pandas as pd  # imported here: a cached run does not pay for it

    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    data_sep = sep
    if len(sep) > 1:
        raw, data_sep = raw.replace(sep.encode(encoding), b"\t"), "\t"
    try:
        # A line with three fields leaves the int64 timestamp empty, which pandas refuses; a line
        # with five is a ParserError: both go to the scan below.
        frame = pd.read_csv(io.BytesIO(raw), sep=data_sep, header=0 if header else None,
                            names=["user", "item", "rating", "timestamp"],
                            dtype={"user": np.int64, "item": np.int64, "rating": np.float32,
                                   "timestamp": np.int64},
                            encoding=encoding, engine="c")
    except (ValueError, pd.errors.ParserError) as error:
        _raise_first_bad_line(path, sep, header, encoding, error)
    users, items, ratings = (frame[c].to_numpy() for c in ("user", "item", "rating"))
    if len(ratings) == 0:
        raise DataError(f"{path}: no ratings after the header")
    if not np.isfinite(ratings).all():
        _raise_first_bad_line(path, sep, header, encoding, None)
    return (users, items, ratings, frame["timestamp"].to_numpy()) if with_timestamps else (users, items, ratings)


def _field_problem(fields):
    try:
        int(fields[0]), int(fields[1])
    except ValueError:
        return "user and item ids must be integers"
    try:
        if not np.isfinite(float(fields[2])):
            return "the rating is not a finite number"
    except ValueError:
        return "the rating is not a finite number"
    try:
        int(fields[3])
    except ValueError:
        return "the timestamp must be an integer"
    return None


def _raise_first_bad_line(path, sep, header, encoding, error):
    with open(path, encoding=encoding, errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if (header and number == 1) or not line.strip():
                continue
            fields = line.rstrip("\r\n").split(sep)
            if len(fields) != FIELDS:
                problem = (f"expected {FIELDS} fields (user, item, rating, timestamp) separated "
                           f"by {sep!r}, found {len(fields)}")
            else:
                problem = _field_problem(fields)
            if problem:
                raise DataError(f"{path}, line {number}: {problem}: {line.strip()[:80]!r}")
    raise DataError(f"{path}: could not be parsed ({error})")


# ----------------------------------------------------------------------------- files

def _is_writable(folder):
    """Writable, and not marked read-only: root may write anywhere, but a folder without write
    bits (a shared, read-only data set) is not ours to fill with caches."""
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & stat.S_IWUSR)


def user_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "mfmixtaste"


def _file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url, timeout=60):
    return urllib.request.urlopen(url, timeout=timeout)


def download(url, destination, md5=None, md5_url=None, progress=True):
    """Download url to destination through a .part file, verifying md5 (or the checksum
    published at md5_url) before the final rename: a failure leaves no file behind."""
    from tqdm.auto import tqdm

    destination = Path(destination)
    # A name of its own, so that processes downloading at once (several machines' ranks on a
    # shared folder) never write into one file; each renames a complete, verified copy.
    handle, partial = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part",
                                       dir=destination.parent)
    os.close(handle)
    partial = Path(partial)
    try:
        if md5 is None and md5_url is not None:
            with _fetch(md5_url) as response:
                found = re.search(rb"\b[0-9a-fA-F]{32}\b", response.read())
            if not found:
                raise DataError(f"no MD5 checksum found in {md5_url}")
            md5 = found.group(0).decode().lower()
        with _fetch(url) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {destination.name}",
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if md5 is not None and _file_md5(partial) != md5:
            raise DataError(f"checksum mismatch for {url}: expected MD5 {md5}, got "
                            f"{_file_md5(partial)}; nothing was kept, try again")
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError) as error:
        raise DataError(f"could not download {url} ({getattr(error, 'reason', error)})") from None
    finally:
        partial.unlink(missing_ok=True)
    return destination


def extract(archive, folder_name, ratings_file, target_dir):
    """Extract archive into target_dir through a temporary folder moved into place, so an
    interrupted extraction never leaves a half-written <target_dir>/<folder_name>.

    Where that folder already exists (it can hold only our parse cache, the ratings file having
    been deleted), the extracted files move in one by one, the ratings file last: its presence
    is what says the folder is complete."""
    member = f"{folder_name}/{ratings_file}"
    destination = Path(target_dir) / folder_name
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target_dir))
    try:
        with zipfile.ZipFile(archive) as zipped:
            if member not in zipped.namelist():
                raise DataError(f"{archive}: the archive has no {member}")
            zipped.extractall(staging)
        if not destination.exists():
            try:
                os.replace(staging / folder_name, destination)
            except OSError:
                if not (destination / ratings_file).is_file():  # else another process was first
                    raise
        else:
            entries = sorted((staging / folder_name).iterdir(), key=lambda p: p.name == ratings_file)
            for entry in entries:
                if not (destination / entry.name).exists():
                    os.replace(entry, destination / entry.name)
    except (zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{archive} is not a valid zip archive ({error}); delete it and run "
                        "again to download a fresh copy") from None
    except OSError as error:
        raise DataError(f"could not extract {archive} into {target_dir}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination / ratings_file


def archive_cache_dir(archive):
    """Where a zip in a read-only folder is extracted: a folder of the user cache keyed by that
    archive (its resolved path, size and modification time), so that another archive of the
    same name, elsewhere or replaced, never reads this one's extraction."""
    info = Path(archive).stat()
    key = hashlib.sha1(f"{Path(archive).resolve()}:{info.st_size}:{info.st_mtime_ns}".encode())
    return user_cache_dir() / f"{Path(archive).stem}-{key.hexdigest()[:16]}"


def locate(name, data_dir, allow_download=True, progress=True):
    """The path of the dataset's ratings file: extracted folder, else local zip, else download.
    A zip in a read-only folder is extracted once into archive_cache_dir(zip)."""
    spec = dataset_spec(name)
    data_dir = Path(data_dir)
    if (data_dir / spec.folder / spec.ratings_file).is_file():
        return data_dir / spec.folder / spec.ratings_file
    archive = data_dir / f"{name}.zip"
    if data_dir.is_dir() or allow_download:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create the data folder {data_dir}: {error.strerror}") from None
    writable = _is_writable(data_dir)
    if not archive.is_file():
        if not allow_download:
            raise DataError(_where_to_put(name, spec, data_dir, "downloads are turned off"))
        if not writable:
            raise DataError(f"{data_dir} is read-only: cannot download {name} there")
        print(f"downloading {spec.url} to {archive}")
        try:
            download(spec.url, archive, spec.md5, spec.md5_url, progress)
        except DataError as error:
            raise DataError(f"{error}\n{_where_to_put(name, spec, data_dir, 'no download')}") \
                from None
    target = data_dir if writable else archive_cache_dir(archive)
    if (target / spec.folder / spec.ratings_file).is_file():
        return target / spec.folder / spec.ratings_file  # this very archive, extracted before
    if spec.md5 is not None and _file_md5(archive) != spec.md5:
        raise DataError(f"{archive}: checksum mismatch (expected MD5 {spec.md5}); it is not the "
                        "official archive or is incomplete: delete it and run again")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create {target} to extract {archive}: {error.strerror}") from None
    return extract(archive, spec.folder, spec.ratings_file, target)


def _where_to_put(name, spec, data_dir, why):
    return (f"{name} is not available locally and {why}. Download {spec.url} by hand and put it "
            f"at {data_dir / (name + '.zip')}, or extract it so that "
            f"{data_dir / spec.folder / spec.ratings_file} exists.")


def _cache_path(ratings_path):
    folder = ratings_path.parent
    if _is_writable(folder):
        return folder / f".{ratings_path.name}.mfmixtaste.npz"
    key = hashlib.sha1(str(ratings_path.resolve()).encode()).hexdigest()[:12]
    return user_cache_dir() / f"{ratings_path.parent.name}-{key}.npz"


def load(name, data_dir, allow_download=True, progress=True):
    """Ratings of a MovieLens dataset, from the parse cache when it matches the ratings file."""
    spec = dataset_spec(name)
    path = locate(name, data_dir, allow_download, progress)
    source = path.stat()
    stamp = np.array([CACHE_VERSION, source.st_size, source.st_mtime_ns], dtype=np.int64)
    cache = _cache_path(path)
    if cache.is_file():
        try:
            with np.load(cache) as cached:
                if np.array_equal(cached["stamp"], stamp):
                    return Ratings(*(cached[k] for k in ("users", "items", "ratings", "user_ids",
                                                         "item_ids")))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged (or empty) cache is rebuilt below
    ratings = encode(*parse_ratings(path, spec.sep, spec.header, spec.encoding))
    _save_cache(cache, stamp, ratings)
    return ratings


def timestamps(name, data_dir):
    """(n_ratings,) int64: the time of each rating of a local dataset, in the order of load()'s
    rows (file order). Parsed anew, not cached: only benchmark.py's shared accounts ask."""
    spec = dataset_spec(name)
    return parse_ratings(locate(name, data_dir, allow_download=False), spec.sep, spec.header,
                         spec.encoding, with_timestamps=True)[3]


def _save_cache(cache, stamp, ratings):
    """Write the cache through a temporary file and an atomic rename; a cache that cannot be
    written only costs the next run a parse."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, stamp=stamp, users=ratings.users, items=ratings.items,
                     ratings=ratings.ratings, user_ids=ratings.user_ids, item_ids=ratings.item_ids)
        os.replace(tmp.name, cache)
    except OSError:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- split

def split(n_ratings, test_fraction=0.25, val_fraction=0.05, split_seed=42):
    """Row indices (train, val, test) in file order.

    The test rows follow the replaced script's protocol, so results compare with its published
    figures: numpy.random.seed(42); a row is in train if numpy.random.rand() < 0.75. The
    validation rows are a val_fraction slice of that training part drawn with its own generator;
    they choose epochs and hyperparameters, and the test rows choose nothing."""
    draws = np.random.RandomState(split_seed).random_sample(n_ratings)
    in_train = draws < 1.0 - test_fraction
    train, test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    in_val = np.random.default_rng(split_seed).random(len(train)) < val_fraction
    parts = train[~in_val], train[in_val], test
    if min(map(len, parts)) == 0:
        raise DataError(f"{n_ratings:,} ratings are too few to split: test_fraction={test_fraction} "
                        f"and val_fraction={val_fraction} leave {len(parts[0])} training, "
                        f"{len(parts[1])} validation and {len(parts[2])} test ratings, and each "
                        "part needs at least one (use more data or larger fractions)")
    return parts


# ----------------------------------------------------------------------------- batches

class _SeededShuffle:
    """A shuffling generator whose state travels with checkpoints (state_dict/load_state_dict),
    so a resumed run draws the same orders (and negatives) as an uninterrupted one."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        # A checkpoint loaded with map_location=cuda would hand over a CUDA byte tensor, which
        # Generator.set_state refuses: the shuffling generator always lives on the CPU.
        self.generator.set_state(state["generator"].cpu())


class BatchIterator(_SeededShuffle):
    """Batches of (users, items, ratings, global_batch_size) over tensors already on the device.

    Each pass reshuffles with a seeded generator that advances from epoch to epoch (its state is
    saved with checkpoints through state_dict), keeps the last partial batch, and has a length.
    Indexing tensors per batch costs a fraction of what a DataLoader's per-sample collation does.
    With world_size > 1, each rank yields its share (every world_size-th row) of the same global
    batch, so the sum of the shares is exactly the single-process batch."""

    def __init__(self, tensors, batch_size, seed=0, shuffle=True, rank=0, world_size=1):
        self.users, self.items, self.ratings = tensors
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        super().__init__(seed)

    def __len__(self):
        return -(-len(self.ratings) // self.batch_size)

    def __iter__(self):
        n = len(self.ratings)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n)).to(self.ratings.device)
        for start in range(0, n, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = batch[self.rank::self.world_size]
            # index_select: ~4x faster than advanced indexing (tensor[share]) for these gathers
            yield (self.users.index_select(0, share), self.items.index_select(0, share),
                   self.ratings.index_select(0, share), len(batch))


# ----------------------------------------------------------------------------- movies

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


def read_movies(name, data_dir, allow_download=False):
    """The dataset's movies as a list of {"movie_id", "title", "year" (int or None), "genres" (a
    list of names)}, in file order: movies.dat of ml-1m and ml-10m ("::", latin-1 for ml-1m),
    u.item of ml-100k ("|", latin-1, 19 genre flags), movies.csv of the CSV releases (quoted
    titles). None when the dataset's folder has no movie file. The standard library's csv reads
    them all, so that a training run does not import pandas for a few thousand lines."""
    import csv

    folder, spec = locate(name, data_dir, allow_download, progress=False).parent, dataset_spec(name)
    path = folder / ("u.item" if name == "ml-100k" else "movies.csv" if spec.header else "movies.dat")
    if not path.is_file():
        return None
    encoding = "latin-1" if name == "ml-100k" else spec.encoding
    text = path.read_bytes().decode(encoding, errors="replace")
    if name == "ml-100k":
        rows = [(f[0], f[1], [g for g, on in zip(ML100K_GENRES, f[5:5 + len(ML100K_GENRES)]) if on == "1"])
                for f in csv.reader(io.StringIO(text), delimiter="|") if f]
    else:
        fields = (list(csv.reader(io.StringIO(text)))[1:] if spec.header
                  else [line.split("::", 2) for line in text.splitlines() if line.strip()])
        if any(len(f) != 3 for f in fields):
            raise DataError(f"{path}: expected 3 fields per movie (id, title, genres)")
        rows = [(f[0], f[1], [g for g in f[2].split("|") if g and g != "(no genres listed)"]) for f in fields]
    movies = []
    for raw_id, title, genres in rows:
        try:
            movie_id = int(raw_id)
        except ValueError:
            raise DataError(f"{path}: movie ids must be integers, got {raw_id!r}") from None
        year = re.search(r"\((\d{4})\)\s*$", title)
        movies.append({"movie_id": movie_id, "title": title, "year": int(year.group(1)) if year else None,
                       "genres": genres})
    return movies


def load_movies(name, data_dir, allow_download=False):
    """read_movies as a pandas DataFrame indexed by raw movie id (columns title, year, genres)."""
    import pandas as pd

    movies = read_movies(name, data_dir, allow_download)
    if movies is None:
        return None
    return pd.DataFrame({"title": [m["title"] for m in movies],
                         "year": pd.Series([m["year"] for m in movies], dtype=object).to_numpy(),
                         "genres": [m["genres"] for m in movies]},
                        index=pd.Index([m["movie_id"] for m in movies], name="movie_id"))


# ----------------------------------------------------------------------------- implicit feedback

@dataclass
class Interactions(_IdMaps):
    """Implicit feedback for top-N ranking: which items each user interacted with, split per user.
    users/items are contiguous indices; user_ids/item_ids map them back to raw MovieLens ids."""
    users: np.ndarray     # (N,) int64
    items: np.ndarray     # (N,) int64
    part: np.ndarray      # (N,) int8: 0 train, 1 validation, 2 test
    user_ids: np.ndarray  # (n_users,) raw ids, sorted
    item_ids: np.ndarray  # (n_items,) raw ids, sorted

    def __len__(self):
        return len(self.users)

    def rows(self, part):
        """Row indices of one part (0 train, 1 validation, 2 test)."""
        return np.flatnonzero(self.part == part)


def implicit_feedback(ratings, min_rating=3.0, core=10):
    """Ratings -> (users, items) raw-id arrays of the positives: a rating >= min_rating is a
    positive (its value is dropped), then users and items with fewer than `core` positives are
    removed, repeatedly, until every one left has at least `core` (RecBole's ml-1m protocol)."""
    keep = ratings.ratings >= min_rating
    users, items = ratings.users[keep], ratings.items[keep]
    while len(users):
        ok = ((np.bincount(users, minlength=ratings.n_users)[users] >= core)
              & (np.bincount(items, minlength=ratings.n_items)[items] >= core))
        if ok.all():
            break
        users, items = users[ok], items[ok]
    if len(users) == 0:
        raise DataError(f"no interactions are left: ratings >= {min_rating} and a {core}-core filter "
                        "(users and items with at least that many) remove all of them; lower "
                        "--ranking_core or --ranking_min_rating")
    return ratings.user_ids[users], ratings.item_ids[items]


def split_per_user(raw_users, raw_items, fractions=(0.8, 0.1, 0.1), seed=2020):
    """Interactions split within each user, at random: floor(fraction * n) of a user's n
    interactions to validation and to test, the rest to training (seeded). Every user needs at
    least one validation and one test interaction."""
    user_ids, users = np.unique(raw_users, return_inverse=True)
    item_ids, items = np.unique(raw_items, return_inverse=True)
    users, items = users.astype(np.int64), items.astype(np.int64)
    counts = np.bincount(users, minlength=len(user_ids))
    n_val = np.floor(counts * fractions[1] + 1e-9).astype(np.int64)
    n_test = np.floor(counts * fractions[2] + 1e-9).astype(np.int64)
    short = np.flatnonzero((n_val == 0) | (n_test == 0))
    if len(short):
        need = int(np.ceil(1 / min(fractions[1], fractions[2]) - 1e-9))
        raise DataError(f"user {user_ids[short[0]]} has {counts[short[0]]} interactions, too few to "
                        f"split {fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} (a user needs "
                        f"{need}); {len(short)} users are that short: raise --ranking_core to {need}")
    # One random key per interaction; sorting by (user, key) gives each user a random order.
    order = np.lexsort((np.random.default_rng(seed).random(len(users)), users))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(users), dtype=np.int64)
    position[order] = np.arange(len(users)) - start[users[order]]  # 0..n-1 within each user
    n_train = counts - n_val - n_test
    part = np.where(position < n_train[users], 0, np.where(position < (n_train + n_val)[users], 1, 2))
    return Interactions(users, items, part.astype(np.int8), user_ids.astype(np.int64),
                        item_ids.astype(np.int64))


class UserBatches(_SeededShuffle):
    """Batches of users for the full-softmax ranking loss: (users, pair_users, pair_items,
    global_pairs). Each pass shuffles the users (seeded generator, saved with checkpoints);
    pair_users/pair_items are the batch users' training interactions, pair_users giving the
    position of the user in the batch. With world_size > 1 each rank takes every world_size-th
    user of the global batch; global_pairs counts the whole global batch's interactions."""

    def __init__(self, users, items, n_users, batch_size, seed=0, shuffle=True, rank=0,
                 world_size=1):
        order = torch.argsort(users * (int(items.max()) + 1 if len(items) else 1) + items)
        self.items_sorted = items[order]                                   # grouped by user
        self.counts = torch.bincount(users, minlength=n_users)              # (n_users,)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts           # (n_users,)
        self.n_users, self.batch_size, self.shuffle = n_users, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        super().__init__(seed)

    def __len__(self):
        return -(-self.n_users // self.batch_size)

    def pairs(self, users):
        """(positions in users, items) of the given users' interactions."""
        counts = self.counts[users]
        position = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
        first = torch.repeat_interleave(self.offsets[users] - (torch.cumsum(counts, 0) - counts), counts)
        return position, self.items_sorted[first + torch.arange(len(position), device=users.device)]

    def __iter__(self):
        order = (torch.randperm(self.n_users, generator=self.generator) if self.shuffle
                 else torch.arange(self.n_users)).to(self.counts.device)
        for start in range(0, self.n_users, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = batch[self.rank::self.world_size]
            position, items = self.pairs(share)
            yield share, position, items, int(self.counts[batch].sum())


class NegativeBatches(BatchIterator):
    """BatchIterator's batches with, for each row, n_negatives items drawn uniformly from all
    n_items (from the same saved generator, so a resumed run draws the same): yields (users,
    items, ratings, global_batch, negatives (B, n_negatives)). Every rank draws the whole global
    batch's negatives and keeps its share's, so several processes train on the draws of one."""

    def __init__(self, tensors, batch_size, n_items, n_negatives, **kwargs):
        super().__init__(tensors, batch_size, **kwargs)
        self.n_items, self.n_negatives = n_items, n_negatives
        self.drawing = True  # False: BatchIterator's batches, without negatives (set per epoch)

    def __iter__(self):
        if not self.drawing:
            yield from super().__iter__()
            return
        for batch in super().__iter__():
            negatives = torch.randint(self.n_items, (batch[3], self.n_negatives), generator=self.generator)
            yield *batch, negatives[self.rank::self.world_size].to(batch[0].device)
