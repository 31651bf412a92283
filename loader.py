"""The one door to data: MovieLens by name (find or download, verify, extract) or any
interactions file or folder by path (formats.py reads it); parse cache, ids, duplicates, splits and
batches.

    ratings = load("ml-1m", "data")              # MovieLens: local copy, else download from GroupLens
    ratings = load("my/ratings.csv.gz", "")      # a file (or a folder holding one, or train/valid/test)
    train, val, test = rating_split(ratings, cfg)  # the replaced script's 75/25 protocol, or the file's parts
    batches = BatchIterator(ratings.tensors(train), batch_size=8192, seed=0)

A MovieLens copy is used without any network: the folder as the official zip extracts it
(<data_dir>/ml-1m/ratings.dat) or the zip itself (<data_dir>/ml-1m.zip). Parsed arrays are cached
beside the data file (or in ~/.cache/mfmixtaste when that folder is read-only), keyed by the file's
size and time and by the columns asked for, so a second run loads in a fraction of a second. The
data is never redistributed: MovieLens's licence forbids it.
"""

import dataclasses
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
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import torch

import formats
from formats import DataError

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
CACHE_VERSION = 4  # 3: any file; timestamps, pre-split parts and merged duplicates kept; 4: issue 45's reading rules


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
    """All interactions of one dataset in file order, with users and items mapped to contiguous
    indices 0..n-1 (user_ids[k] is the raw id of index k: the file's own ids, int64, or str where
    an id is not a plain integer; both id arrays are sorted, so raw ids map back with
    np.searchsorted). Sparse raw id spaces (ml-25m's movie ids pass 200,000) cost nothing in the
    embedding tables."""
    users: np.ndarray     # (N,) int64 user index
    items: np.ndarray     # (N,) int64 item index
    ratings: np.ndarray   # (N,) float32 (all 1 where the data has no rating column)
    user_ids: np.ndarray  # (n_users,) raw ids, sorted
    item_ids: np.ndarray  # (n_items,) raw ids, sorted
    timestamps: np.ndarray | None = None  # (N,) int64 seconds (or order within a user's line), None: none
    part: np.ndarray | None = None        # (N,) int8 of pre-split data: 0 train, 1 validation, 2 test
    has_ratings: bool = True              # False: implicit feedback only (clicks, plays, reviews)
    described: list = dataclass_field(default_factory=list)  # what was read and merged, in words
    weights: np.ndarray | None = None     # (N,) float32 > 0: --event_weights / --weight_column, None: every row 1

    def __len__(self):
        return len(self.ratings)

    def index_of(self, raw_users, raw_items):
        """Raw ids -> (user indices, item indices); an unknown id is a KeyError."""
        return (_lookup(self.user_ids, raw_users, "user"), _lookup(self.item_ids, raw_items, "item"))

    def tensors(self, rows=None, device="cpu"):
        """(users, items, ratings) as tensors on device, for the given row indices (default all)."""
        sel = slice(None) if rows is None else rows
        return tuple(torch.from_numpy(np.ascontiguousarray(a[sel])).to(device)
                     for a in (self.users, self.items, self.ratings))


def as_ids(raw, ids):
    """Raw ids (a value or a sequence) in the type of the id array ids: int64 for integer ids
    (a str of digits counts; anything else makes the answer None), str for str ids."""
    values = np.atleast_1d(np.asarray(raw, dtype=object))
    if ids.dtype.kind not in "iu":
        return values.astype(str)
    out = np.empty(len(values), dtype=np.int64)
    for k, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, str)):
            return None
        try:
            out[k] = int(value)
        except (ValueError, OverflowError):
            return None
    return out


def positions(ids, raw):
    """Raw ids -> (their indices in the sorted id array ids, whether each is there at all): the
    index of an absent id is meaningless, so read it only where known is True."""
    raw = np.atleast_1d(raw) if isinstance(raw, np.ndarray) and raw.dtype.kind in "iuU" else as_ids(raw, ids)
    if raw is None or len(ids) == 0:
        count = 1 if raw is None else len(raw)
        return np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool)
    index = np.searchsorted(ids, raw).clip(max=len(ids) - 1)
    return index.astype(np.int64), ids[index] == raw


def sparsity(user_pairs, prior_user_pairs):
    """(mean, factor): the mean interactions of a user with any (user_pairs, (n_users,)), and how
    many times fewer that is than prior_user_pairs, the users the ranking defaults were chosen
    for (ML-1M's 112 a user), at least 1 (1 where prior_user_pairs is 0). Here, not in tasks.py,
    so that recommend.py's fold-in reads it without importing Ignite (0.8 s)."""
    mean = float(user_pairs.sum() / max(1, np.count_nonzero(user_pairs)))
    return mean, max(1.0, prior_user_pairs / max(mean, 1e-9)) if prior_user_pairs else 1.0


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
        raise KeyError(f"unknown {kind} id {np.atleast_1d(np.asarray(raw, dtype=object))[~known][0]!r}")
    return pos


def encode(raw_users, raw_items, ratings):
    """Raw id arrays -> Ratings with contiguous indices (np.unique sorts the ids)."""
    user_ids, users = np.unique(raw_users, return_inverse=True)
    item_ids, items = np.unique(raw_items, return_inverse=True)
    return Ratings(users.astype(np.int64), items.astype(np.int64), np.asarray(ratings, dtype=np.float32),
                   user_ids, item_ids)


# ----------------------------------------------------------------------------- parsing

def movielens_layout(spec):
    """A MovieLens ratings file as formats reads it: four fields, user, item, rating, timestamp."""
    return formats.Layout("rows", spec.sep, ["userId", "movieId", "rating", "timestamp"] if spec.header else None,
                          4, None, "MovieLens ratings")


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
    if not archive.is_file():
        if not allow_download:
            raise DataError(_where_to_put(name, spec, data_dir, "downloads are turned off"))
        try:  # made only to hold a download
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"cannot create the data folder {data_dir}: {error.strerror}") from None
        if not _is_writable(data_dir):
            raise DataError(f"{data_dir} is read-only: cannot download {name} there")
        print(f"downloading {spec.url} to {archive}")
        try:
            download(spec.url, archive, spec.md5, spec.md5_url, progress)
        except DataError as error:
            raise DataError(f"{error}\n{_where_to_put(name, spec, data_dir, 'no download')}") \
                from None
    target = data_dir if _is_writable(data_dir) else archive_cache_dir(archive)
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


def is_movielens(dataset):
    return dataset in DATASETS


def dataset_label(dataset):
    """A short name for a dataset in run and study names: the MovieLens name, or a file's name
    without its suffixes (a folder's name), with a key of its resolved path so that two files of
    one name never share a study."""
    if is_movielens(dataset):
        return dataset
    path = Path(dataset)
    stem = path.name.split(".")[0] or "data"
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', stem)}-{key}"


def dataset_name(dataset):
    """A dataset as titles show it: the MovieLens name, or the file's or folder's own name."""
    return dataset if is_movielens(dataset) else Path(dataset).name


DOC_NAMES = re.compile(r"^(readme|source|license|licence|notes?|changelog|citation)\b", re.IGNORECASE)
SIDE_NAMES = re.compile(r"^(movies?|items?|users?|links|tags|genome|genres?|titles?|books?|artists?|products?|"
                        r"u\.(item|user|info|genre|occupation))\b", re.IGNORECASE)
PARTS = {"train": 0, "training": 0, "valid": 1, "val": 1, "validation": 1, "dev": 1, "test": 2, "testing": 2}


def data_files(folder):
    """The files of a folder that may hold interactions: not hidden, not our caches, not a
    README or SOURCE text, not a side file (movies, items, users, links, tags)."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith(".") or DOC_NAMES.match(path.name) or SIDE_NAMES.match(path.name):
            continue
        compression, suffix = formats.compression_of(path)
        if suffix in formats.TEXT_DATA_SUFFIXES | {".parquet", ".pq"} or compression == "zip":
            found.append(path)
    return found


def part_of(path):
    """0, 1 or 2 where a file's name says train, valid (val, validation) or test, else None."""
    words = re.split(r"[._\-\s]+", path.name.lower())
    named = {PARTS[w] for w in words if w in PARTS}
    return named.pop() if len(named) == 1 else None


def dataset_sources(dataset):
    """A path dataset -> (files, their parts or None): a file; a folder's one data file; or a
    folder's train, test and optional valid files (pre-split)."""
    path = Path(dataset)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise DataError(f"unknown dataset {dataset!r}: neither a MovieLens name ({', '.join(DATASETS)}) nor a "
                        "file or folder")
    files = data_files(path)
    parts = {}
    for file in files:
        part = part_of(file)
        if part is not None:
            if part in parts:
                raise DataError(f"{path}: two files for one part ({parts[part].name}, {file.name})")
            parts[part] = file
    if parts:
        if 0 not in parts or 2 not in parts:
            raise DataError(f"{path}: a pre-split folder needs a train and a test file (valid is optional); "
                            f"found {', '.join(f.name for f in parts.values())}")
        return [parts[p] for p in sorted(parts)], sorted(parts)
    ratings = [f for f in files if re.search(r"rating|inter|click|play|event|review|purchase", f.name, re.IGNORECASE)]
    if len(files) == 1 or len(ratings) == 1:
        return [files[0] if len(files) == 1 else ratings[0]], None
    raise DataError(f"{path}: " + (f"holds several data files ({', '.join(f.name for f in files[:5])}): give the "
                                   "path of the interactions file" if files else "holds no data file"))


def _cache_path(source, key=""):
    """Beside the source (a file, or the parts of a pre-split folder) where its folder is
    writable, else in the user cache under a name keyed by its resolved path: two sources never
    share a cache."""
    folder = source.parent
    name = f".{source.name}{key}.mfmixtaste.npz"
    if _is_writable(folder):
        return folder / name
    digest = hashlib.sha1(f"{source.resolve()}{key}".encode()).hexdigest()[:12]
    return user_cache_dir() / f"{source.name}-{digest}.npz"


ARRAYS = ("users", "items", "ratings", "user_ids", "item_ids", "timestamps", "part", "weights")


def load(dataset, data_dir="data", allow_download=True, progress=True, columns="", skip_bad_lines=False, weights=None):
    """Ratings of a MovieLens dataset (by name: data_dir and downloads serve it) or of a file or
    folder (by path; columns: the --columns text; skip_bad_lines: lines that cannot be read are
    dropped and counted instead of stopping the read; weights: a formats.Weights, each row's weight
    from one more column), from the parse cache when it matches the sources (file_stamp), the
    columns and the weights."""
    if is_movielens(dataset):
        if columns or weights:
            raise DataError(f"--columns, --event_weights and --weight_column are for files: {dataset} is read as "
                            "MovieLens lays it out")
        files, parts = [locate(dataset, data_dir, allow_download, progress)], None
    else:
        files, parts = dataset_sources(dataset)
    stamp = np.array([CACHE_VERSION] + [v for f in files for v in file_stamp(f)], dtype=np.int64)
    source = files[0] if parts is None else files[0].parent / "parts"  # a pre-split folder's cache: inside it
    reading = columns + (f"|{weights.text}" if weights else "")
    cache = _cache_path(source, ("" if not reading else "-" + hashlib.sha1(reading.encode()).hexdigest()[:8])
                        + ("-skip" if skip_bad_lines else ""))
    found = _read_cache(cache, stamp)
    if found is not None:
        return found
    if is_movielens(dataset):
        read = [formats.read_interactions(files[0], layout=movielens_layout(dataset_spec(dataset)), integer_ids=True,
                                          skip_bad_lines=skip_bad_lines)]
    else:
        # A pre-split folder's valid and test files need not hold every event the training file has.
        read = [formats.read_interactions(f, columns, skip_bad_lines=skip_bad_lines,
                                          weights=weights if k == 0 or weights is None else
                                          dataclasses.replace(weights, strict=False)) for k, f in enumerate(files)]
    ratings = merge_duplicates(combine(read, parts))
    if ratings.n_users < 2 or ratings.n_items < 2:
        raise DataError(f"{dataset}: {ratings.n_users:,} user(s) and {ratings.n_items:,} item(s): a model of "
                        "tastes needs at least two of each")
    _save_cache(cache, stamp, ratings)
    return ratings


def file_stamp(path):
    """What tells a file's content has changed, cheaply: its size, modification and change times,
    inode, and a hash of its first and last 64 KB. A copy that keeps the size and the mtime
    (cp -p, rsync -a, tar) still changes the ctime and the inode, and the hash catches a
    change of the content wherever the file system keeps neither."""
    info = path.stat()
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        digest.update(stream.read(1 << 16))
        if info.st_size > 1 << 16:
            stream.seek(max(info.st_size - (1 << 16), 1 << 16))
            digest.update(stream.read())
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino,
            int.from_bytes(digest.digest()[:8], "little", signed=True))


def _read_cache(cache, stamp):
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as cached:
            if not np.array_equal(cached["stamp"], stamp):
                return None
            arrays = {k: cached[k] for k in ARRAYS}
            return Ratings(*(arrays[k] for k in ARRAYS[:5]),
                           timestamps=arrays["timestamps"] if len(arrays["timestamps"]) else None,
                           part=arrays["part"] if len(arrays["part"]) else None,
                           weights=arrays["weights"] if len(arrays["weights"]) else None,
                           has_ratings=bool(cached["has_ratings"]), described=cached["described"].tolist())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # a damaged (or empty, or older) cache is rebuilt


def _save_cache(cache, stamp, ratings):
    """Write the cache through a temporary file and an atomic rename; a cache that cannot be
    written only costs the next run a parse."""
    tmp = None
    empty = np.zeros(0, dtype=np.int64)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, stamp=stamp, has_ratings=ratings.has_ratings, described=np.array(ratings.described, dtype=str),
                     **{k: empty if getattr(ratings, k) is None else getattr(ratings, k) for k in ARRAYS})
        os.replace(tmp.name, cache)
    except OSError:
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)


def combine(read, parts):
    """formats.Interactions of one file, or of a pre-split folder's files (parts: 0, 1, 2 of each)
    -> Ratings over one id space. Validation and test rows whose user or item never occurs in
    training are dropped (said in described): the model has no vector for them."""
    has_ratings = {r.ratings is not None for r in read}
    if len(has_ratings) > 1:
        raise DataError("the train, valid and test files must all have a rating column or all lack one")
    has_times = all(r.timestamps is not None for r in read)
    described = [line for r in read for line in r.described]
    if parts is None:
        (one,) = read
        ratings = one.ratings if one.ratings is not None else np.ones(len(one.users), dtype=np.float32)
        return Ratings(one.users, one.items, ratings, one.user_ids, one.item_ids, one.timestamps,
                       has_ratings=one.ratings is not None, described=described, weights=one.weights)
    user_ids, item_ids = read[0].user_ids, read[0].item_ids  # every id kept occurs in training
    if any(r.user_ids.dtype.kind != user_ids.dtype.kind or r.item_ids.dtype.kind != item_ids.dtype.kind for r in read):
        # One part's id that is no plain integer (guest, 0042) makes every id a str: sorted again,
        # as text (10 < 9), since positions() looks ids up by binary search.
        user_ids, item_ids = np.sort(user_ids.astype(str)), np.sort(item_ids.astype(str))
    users, items, part, kept = [], [], [], []
    for r, p in zip(read, parts):
        u, known_u = positions(user_ids, _like(r.user_ids, user_ids)[r.users])
        i, known_i = positions(item_ids, _like(r.item_ids, item_ids)[r.items])
        keep = known_u & known_i
        if not keep.all():
            described.append(f"{(~keep).sum():,} of the {len(keep):,} {('validation', 'test')[p - 1]} rows dropped: "
                             "their user or item never occurs in training")
        users.append(u[keep]), items.append(i[keep]), part.append(np.full(keep.sum(), p, dtype=np.int8))
        kept.append(keep)
    cat = np.concatenate
    ratings = cat([r.ratings[k] for r, k in zip(read, kept)]) if read[0].ratings is not None else \
        np.ones(sum(len(u) for u in users), dtype=np.float32)
    times = cat([r.timestamps[k] for r, k in zip(read, kept)]) if has_times else None
    weights = cat([r.weights[k] for r, k in zip(read, kept)]) if all(r.weights is not None for r in read) else None
    described.append("pre-split: " + ", ".join(f"{('train', 'valid', 'test')[p]} {len(u):,} rows"
                                               for p, u in zip(parts, users)) + " (used as given)")
    return Ratings(cat(users), cat(items), ratings.astype(np.float32), user_ids, item_ids, times, cat(part),
                   has_ratings=read[0].ratings is not None, described=described, weights=weights)


def _like(ids, other):
    return ids.astype(str) if other.dtype.kind == "U" else ids


def merge_duplicates(ratings):
    """One row per (user, item) (within each part of pre-split data): the latest by timestamp,
    else the last in the file, keeps its place in file order; the merge is said in described."""
    part = ratings.part.astype(np.int64) if ratings.part is not None else 0
    key = (part * ratings.n_users + ratings.users) * ratings.n_items + ratings.items
    if len(key) < 2 or not (np.diff(np.sort(key)) == 0).any():
        return ratings
    rows = np.arange(len(key))
    order = np.lexsort((rows, key) if ratings.timestamps is None else (rows, ratings.timestamps, key))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = key[order[1:]] != key[order[:-1]]
    kept = np.sort(order[last])
    rule = ("the latest by timestamp" if ratings.timestamps is not None else "the last in the file") + " of each pair"
    weights = None
    if ratings.weights is not None:  # a pair weighs as its strongest row: a view then a purchase is a purchase
        group = np.cumsum(np.concatenate([[0], last[:-1]]))                     # each sorted row's pair
        strongest = np.zeros(int(group[-1]) + 1, dtype=np.float32)
        np.maximum.at(strongest, group, ratings.weights[order])                # per pair, in key order
        weights = np.empty(len(key), dtype=np.float32)
        weights[order[last]] = strongest
        weights = weights[kept]
        rule += "; each pair weighs as its strongest row"
    described = ratings.described + [f"{len(key) - len(kept):,} duplicate (user, item) rows merged into the "
                                     f"{len(kept):,} kept ({rule})"]
    pick = lambda a: None if a is None else a[kept]
    return Ratings(ratings.users[kept], ratings.items[kept], ratings.ratings[kept], ratings.user_ids,
                   ratings.item_ids, pick(ratings.timestamps), pick(ratings.part), ratings.has_ratings, described,
                   weights)


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
    return _check_parts(n_ratings, (*_validation_slice(train, val_fraction, split_seed), test),
                        test_fraction, val_fraction)


def _validation_slice(train, val_fraction, split_seed):
    in_val = np.random.default_rng(split_seed).random(len(train)) < val_fraction
    return train[~in_val], train[in_val]


def _check_parts(n_ratings, parts, test_fraction, val_fraction):
    """parts, refused where a part that should hold rows is empty (a fraction of 0 asks for none:
    a fit on all the data)."""
    if min(len(part) for part, fraction in zip(parts, (1.0, val_fraction, test_fraction)) if fraction) == 0:
        raise DataError(f"{n_ratings:,} ratings are too few to split: test_fraction={test_fraction} "
                        f"and val_fraction={val_fraction} leave {len(parts[0])} training, "
                        f"{len(parts[1])} validation and {len(parts[2])} test ratings, and each "
                        "part needs at least one (use more data or larger fractions)")
    return parts


SPLITS = ("random", "time", "last")  # train.py's --split


def unseen_in_training(users, items, part):
    """(N,) bool: the validation and test rows whose user or item has no training row (a time
    split can leave a late user or a new item there): the model has nothing learned for them."""
    trained = part == 0
    known_users = np.zeros(users.max() + 1 if len(users) else 0, dtype=bool)
    known_users[users[trained]] = True
    known_items = np.zeros(items.max() + 1 if len(items) else 0, dtype=bool)
    known_items[items[trained]] = True
    return (part > 0) & ~(known_users[users] & known_items[items])


def time_parts(ratings, rows, how, test_fraction, val_fraction):
    """(N,) int8 parts of rows (0 train, 1 validation, 2 test) by time. "time": one cut for all,
    the latest test_fraction of the interactions are the test set and the latest val_fraction of
    those before them validation (a "what happens next" split: no future leaks into training).
    "last": within each user, the latest interaction is the test item and the one before it
    validation (leave-one-out, as RecBole's ordered split and the sequential papers); a user of
    fewer than 3 stays in training (with a fraction of 0, that part is not drawn)."""
    if ratings.timestamps is None:
        raise DataError(f"--split={how} orders interactions by time, and this data has no time column: name it "
                        "with --columns=USER,ITEM,RATING,TIME (or USER,ITEM,,TIME), or use --split=random")
    # Each row's place in time, ties in file order (a one-line-per-user file's times are the items'
    # places in their lines).
    rank = np.empty(len(rows), dtype=np.int64)
    rank[np.argsort(ratings.timestamps[rows], kind="stable")] = np.arange(len(rows))
    part = np.zeros(len(rows), dtype=np.int8)
    if how == "time":
        n_test = int(round(len(rows) * test_fraction))
        n_val = int(round((len(rows) - n_test) * val_fraction))
        part[rank >= len(rows) - n_test] = 2
        part[(rank >= len(rows) - n_test - n_val) & (rank < len(rows) - n_test)] = 1
        return part
    users = ratings.users[rows]
    order = np.lexsort((rank, users))                      # by user, then time
    counts = np.bincount(users, minlength=ratings.n_users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    from_end = counts[users[order]] - (np.arange(len(rows)) - start[users[order]])  # 1: the latest
    enough = counts[users[order]] >= 3
    part[order[enough & (from_end == 1) & (test_fraction > 0)]] = 2
    part[order[enough & (from_end == 2 - (test_fraction == 0)) & (val_fraction > 0)]] = 1
    return part


def rating_split(ratings, test_fraction=0.25, val_fraction=0.05, split_seed=42, how="random"):
    """The rating task's rows (train, val, test): split() of the file's rows, the time_parts of
    --split=time or last, or a pre-split dataset's own parts (validation drawn from the training
    rows as split() draws it when the data has no validation part)."""
    if ratings.part is not None and how != "random":
        raise DataError(f"--split={how}: a pre-split dataset is used as given (its own parts): leave --split out")
    if how != "random":
        part = time_parts(ratings, np.arange(len(ratings)), how, test_fraction, val_fraction)
        unseen = unseen_in_training(ratings.users, ratings.items, part)
        if unseen.any():
            ratings.described.append(f"{unseen.sum():,} validation and test rows dropped: their user or item has no "
                                     "earlier row in training")
        part[unseen] = -1
        return _check_parts(len(ratings), tuple(np.flatnonzero(part == p) for p in range(3)),
                            test_fraction, val_fraction)
    if ratings.part is None:
        return split(len(ratings), test_fraction, val_fraction, split_seed)
    train, val, test = (np.flatnonzero(ratings.part == p) for p in range(3))
    if len(val) == 0:
        train, val = _validation_slice(train, val_fraction, split_seed)
    return _check_parts(len(ratings), (train, val, test), test_fraction, val_fraction)


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
    """Batches of (users, items, ratings, global_batch_size[, weights]) over tensors already on
    the device: tensors (users, items, ratings[, weights]), the rows' weights where a run has
    them (--event_weights).

    Each pass reshuffles with a seeded generator that advances from epoch to epoch (its state is
    saved with checkpoints through state_dict), keeps the last partial batch, and has a length.
    Indexing tensors per batch costs a fraction of what a DataLoader's per-sample collation does.
    With world_size > 1, each rank yields its share (every world_size-th row) of the same global
    batch, so the sum of the shares is exactly the single-process batch."""

    def __init__(self, tensors, batch_size, seed=0, shuffle=True, rank=0, world_size=1):
        self.users, self.items, self.ratings = tensors[:3]
        self.weights = tensors[3] if len(tensors) > 3 else None
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
            rows = (self.users.index_select(0, share), self.items.index_select(0, share),
                    self.ratings.index_select(0, share), len(batch))
            yield rows if self.weights is None else (*rows, self.weights.index_select(0, share))


# ----------------------------------------------------------------------------- movies

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


def read_movies(name, data_dir, allow_download=False):
    """The dataset's movies as a list of {"item_id", "title", "year" (int or None), "genres" (a
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
        movies.append({"item_id": movie_id, "title": title, "year": int(year.group(1)) if year else None,
                       "genres": genres})
    return movies


def read_items(dataset, data_dir, items=""):
    """The items' names as read_movies gives them: from the items file when one is given
    (--items, any format formats.read_item_names reads), else MovieLens's movie file for a
    MovieLens name; None when there is neither."""
    if items:
        found = formats.read_item_names(items)
        return [{"item_id": raw.item() if hasattr(raw, "item") else raw, "title": title, "year": year,
                 "genres": genres} for raw, title, year, genres in
                zip(found["item"], found["title"], found["year"], found["genres"])]
    return read_movies(dataset, data_dir) if is_movielens(dataset) else None


def load_movies(name, data_dir, allow_download=False, items=""):
    """read_items as a pandas DataFrame indexed by raw item id (columns title, year, genres)."""
    import pandas as pd

    movies = read_items(name, data_dir, items) if items or not is_movielens(name) else \
        read_movies(name, data_dir, allow_download)
    if movies is None:
        return None
    return pd.DataFrame({"title": [m["title"] for m in movies],
                         "year": pd.Series([m["year"] for m in movies], dtype=object).to_numpy(),
                         "genres": [m["genres"] for m in movies]},
                        index=pd.Index([m["item_id"] for m in movies], name="item_id"))


# ----------------------------------------------------------------------------- implicit feedback

@dataclass
class Interactions(_IdMaps):
    """Implicit feedback for top-N ranking: which items each user interacted with, split per user.
    users/items are contiguous indices; user_ids/item_ids map them back to the raw ids."""
    users: np.ndarray     # (N,) int64
    items: np.ndarray     # (N,) int64
    part: np.ndarray      # (N,) int8: 0 train, 1 validation, 2 test
    user_ids: np.ndarray  # (n_users,) raw ids, sorted
    item_ids: np.ndarray  # (n_items,) raw ids, sorted
    described: list = dataclass_field(default_factory=list)  # the filter and split, in words
    timestamps: np.ndarray | None = None  # (N,) int64 seconds (or places in a user's line), None: none
    weights: np.ndarray | None = None     # (N,) float32 > 0 of each interaction (--event_weights), None: all 1

    def __len__(self):
        return len(self.users)

    def rows(self, part):
        """Row indices of one part (0 train, 1 validation, 2 test)."""
        return np.flatnonzero(self.part == part)


def implicit_feedback(ratings, min_rating=3.0, core=10):
    """Ratings -> (row indices of the positives, in file order; what was kept, in words): a
    rating >= min_rating is a positive (its value is dropped; data without ratings is all
    positives), then users and items with fewer than `core` positives are removed, repeatedly,
    until every one left has at least `core` (RecBole's ml-1m protocol). Pre-split data takes no
    core filter: its rows are used as given."""
    rows = np.flatnonzero(ratings.ratings >= min_rating) if ratings.has_ratings else np.arange(len(ratings))
    positives = len(rows)
    if ratings.part is not None and core > 1:
        raise DataError(f"--ranking_core={core}: a pre-split dataset is used as given, with no filter of ours "
                        "(leave --ranking_core at 1)")
    while len(rows) and core > 1:
        users, items = ratings.users[rows], ratings.items[rows]
        ok = ((np.bincount(users, minlength=ratings.n_users)[users] >= core)
              & (np.bincount(items, minlength=ratings.n_items)[items] >= core))
        if ok.all():
            break
        rows = rows[ok]
    if len(rows) == 0:
        raise DataError(f"no interactions are left: ratings >= {min_rating} and a {core}-core filter "
                        "(users and items with at least that many) remove all of them; lower "
                        "--ranking_core or --ranking_min_rating")
    kept = [f"{len(ratings):,} rows"]
    if ratings.has_ratings and positives < len(ratings):
        kept.append(f"{positives:,} with a rating >= {min_rating:g}")
    if core > 1:
        kept.append(f"{len(rows):,} in the {core}-core (users and items with at least {core})")
    return rows, "ranking data: " + ", ".join(kept)


def per_user_counts(counts, fractions):
    """(n_val, n_test) of users with `counts` interactions: floor(fraction * n) of each, and at
    least one of each part with a positive fraction for a user of 3 or more (RecBole's ratio split
    for small users); a user with fewer keeps them all in training."""
    held = []
    for fraction in fractions:
        n = np.floor(counts * fraction + 1e-9).astype(np.int64)
        held.append(np.where((counts >= 3) & (fraction > 0), np.maximum(n, 1), np.where(counts >= 3, n, 0)))
    return held


def split_per_user(ratings, rows, fractions=(0.8, 0.1, 0.1), seed=2020, how="random"):
    """The given rows (positives) as Interactions, split within each user at random, seeded:
    per_user_counts of a user's n to validation and test, the rest to training; or by time
    (how="time" or "last": time_parts). Pre-split data keeps its parts, validation drawn so from
    the training rows where it has none."""
    user_index, users = np.unique(ratings.users[rows], return_inverse=True)
    item_index, items = np.unique(ratings.items[rows], return_inverse=True)
    users, items = users.astype(np.int64), items.astype(np.int64)
    given = None if ratings.part is None else ratings.part[rows]
    if given is not None and how != "random":
        raise DataError(f"--split={how}: a pre-split dataset is used as given (its own parts): leave --split out")
    if given is None and how != "random":
        part = time_parts(ratings, rows, how, fractions[2], fractions[1])
        unseen = unseen_in_training(users, items, part)
        if unseen.any():  # left out of every part
            keep = ~unseen
            rows, users, items, part = rows[keep], users[keep], items[keep], part[keep]
            user_index, users = np.unique(user_index[users], return_inverse=True)
            item_index, items = np.unique(item_index[items], return_inverse=True)
            users, items = users.astype(np.int64), items.astype(np.int64)
        how = (f"by time: the latest {fractions[2]:g} of the interactions to test, the latest {fractions[1]:g} "
               "before them to validation" if how == "time" else
               "by time within each user: the latest to test, the one before it to validation") \
            + (f"; {unseen.sum():,} validation and test interactions dropped: their user or item has no earlier "
               "one in training" if unseen.any() else "")
    elif given is not None and (given == 1).any():
        part, how = given.astype(np.int8), "the dataset's own train/valid/test"
    else:
        drawn = np.flatnonzero(given == 0) if given is not None else np.arange(len(rows))
        fractions = fractions if given is None else (1 - fractions[1], fractions[1], 0.0)
        part = np.full(len(rows), 2, dtype=np.int8)
        part[drawn] = _draw_parts(users[drawn], len(user_index), fractions, seed)
        how = (f"{fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} within each user (seed {seed})" if given is None
               else f"the dataset's train/test, validation drawn as {fractions[1]:g} of each user's training rows")
    need_test = given is not None or fractions[2] > 0  # a fraction of 0: no such part (a fit on all the data)
    if (fractions[1] > 0 and not (part == 1).any()) or (need_test and not (part == 2).any()):
        raise DataError(f"no user has the 3 interactions that a validation and a test item need ({len(rows):,} "
                        f"interactions of {len(user_index):,} users): nothing to choose a model on or to test it on")
    # Users with nothing held out (fewer than 3 interactions), where anything is held out at all.
    trained_only = int((np.bincount(users[part > 0], minlength=len(user_index)) == 0).sum()) if (part > 0).any() else 0
    if not (part > 0).any():
        how = "none: every interaction trains (test_fraction=0, val_fraction=0: a fit on all the data)"
    described = [f"split: {how}; train {(part == 0).sum():,}, validation {(part == 1).sum():,}, test "
                 f"{(part == 2).sum():,} interactions of {len(user_index):,} users and {len(item_index):,} items"
                 + (f"; {trained_only:,} users (fewer than 3 interactions) in training only" if trained_only else "")]
    return Interactions(users, items, part, ratings.user_ids[user_index], ratings.item_ids[item_index], described,
                        None if ratings.timestamps is None else ratings.timestamps[rows],
                        None if ratings.weights is None else ratings.weights[rows])


def _draw_parts(users, n_users, fractions, seed):
    """(N,) int8 parts of one user's interactions each: a seeded random order within each user,
    its last per_user_counts ones to validation, then test."""
    counts = np.bincount(users, minlength=n_users)
    n_val, n_test = per_user_counts(counts, fractions[1:])
    # One random key per interaction; sorting by (user, key) gives each user a random order.
    order = np.lexsort((np.random.default_rng(seed).random(len(users)), users))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(users), dtype=np.int64)
    position[order] = np.arange(len(users)) - start[users[order]]  # 0..n-1 within each user
    n_train = counts - n_val - n_test
    part = np.where(position < n_train[users], 0, np.where(position < (n_train + n_val)[users], 1, 2))
    return part.astype(np.int8)


def user_pairs(users, counts, offsets, items_sorted):
    """(positions in users, items) of the users' (B,) interactions, from each user's count and
    offset (n_users,) into items_sorted (their items grouped by user): a CSR matrix's row lengths,
    row starts and column indices."""
    counts = counts[users]
    position = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    first = torch.repeat_interleave(offsets[users] - (torch.cumsum(counts, 0) - counts), counts)
    return position, items_sorted[first + torch.arange(len(position), device=users.device)]


class UserBatches(_SeededShuffle):
    """Batches of users for the full-softmax ranking loss: (users, pair_users, pair_items,
    global_pairs). Each pass shuffles the users (seeded generator, saved with checkpoints);
    pair_users/pair_items are the batch users' training interactions, pair_users giving the
    position of the user in the batch. With world_size > 1 each rank takes every world_size-th
    user of the global batch; global_pairs counts the whole global batch's interactions. With
    columns (a number) and probabilities (n_items,), each batch also yields that many items drawn
    with replacement by those probabilities (the same on every rank: one generator): the items
    of a sampled softmax."""

    def __init__(self, users, items, n_users, batch_size, seed=0, shuffle=True, rank=0,
                 world_size=1, columns=0, probabilities=None, weights=None, grouped=None):
        # grouped: a UserBatches of the same (users, items) whose grouping by user is shared
        # instead of sorted again (ML-25M: 19.7M pairs, 151 MB and a sort).
        if grouped is not None and weights is None:
            self.items_sorted, self.weights_sorted = grouped.items_sorted, None
            self.counts, self.offsets = grouped.counts, grouped.offsets
        else:
            order = torch.argsort(users * (int(items.max()) + 1 if len(items) else 1) + items)
            self.items_sorted = items[order]                                   # grouped by user
            # weights (N,) of the interactions (--event_weights): each batch then also yields its
            # pairs' weights, and global_pairs is the global batch's total weight.
            self.weights_sorted = None if weights is None else weights[order]
            self.counts = torch.bincount(users, minlength=n_users)              # (n_users,)
            self.offsets = torch.cumsum(self.counts, 0) - self.counts           # (n_users,)
        self.totals = self.counts if weights is None else \
            torch.zeros(n_users, dtype=weights.dtype).index_add_(0, users, weights)  # (n_users,)
        self.n_users, self.batch_size, self.shuffle = n_users, batch_size, shuffle
        self.rank, self.world_size = rank, world_size
        self.columns, self.probabilities = columns, probabilities
        super().__init__(seed)

    def __len__(self):
        return -(-self.n_users // self.batch_size)

    def pairs(self, users):
        """(positions in users, items) of the given users' interactions."""
        return user_pairs(users, self.counts, self.offsets, self.items_sorted)

    def __iter__(self):
        """(users, positions, items, global_pairs[, drawn items][, weights]): drawn with columns,
        None in their place where there are weights but no columns."""
        order = (torch.randperm(self.n_users, generator=self.generator) if self.shuffle
                 else torch.arange(self.n_users)).to(self.counts.device)
        for start in range(0, self.n_users, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = batch[self.rank::self.world_size]
            position, items = self.pairs(share)
            drawn = torch.multinomial(self.probabilities, self.columns, replacement=True,
                                      generator=self.generator).to(share.device) if self.columns else None
            global_pairs = self.totals[batch].sum().item()
            if self.weights_sorted is not None:
                weights = user_pairs(share, self.counts, self.offsets, self.weights_sorted)[1]
                yield share, position, items, global_pairs, drawn, weights
            elif drawn is not None:
                yield share, position, items, int(global_pairs), drawn
            else:
                yield share, position, items, int(global_pairs)


class NegativeBatches(BatchIterator):
    """BatchIterator's batches with, for each row, n_negatives items drawn uniformly from all
    n_items (from the same saved generator, so a resumed run draws the same): yields (users,
    items, ratings, global_batch[, weights], negatives (B, n_negatives)). Every rank draws the whole global
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
