import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

import loader
from conftest import SHARED_DATA, mixture_ratings, write_ratings, write_zip


def small(n=50, seed=1):
    users, items, ratings = mixture_ratings(n_users=20, n_items=15, n_ratings=n, seed=seed)
    return users, items, ratings


# ----------------------------------------------------------------------------- layouts


def test_timestamps_come_in_the_order_of_the_loaded_rows(tmp_path):
    users, items, ratings = small()
    write_ratings(tmp_path / "ml-1m" / "ratings.dat", users, items, ratings)  # time 978300000 + line
    loaded = loader.load("ml-1m", tmp_path, allow_download=False)
    assert loaded.timestamps.tolist() == [978300000 + k for k in range(len(users))]
    assert loader.load("ml-1m", tmp_path, allow_download=False).timestamps.tolist() == loaded.timestamps.tolist()  # cached
    assert loaded.user_ids[loaded.users].tolist() == users.tolist()


@pytest.mark.parametrize("name,folder,filename,sep,header", [
    ("ml-100k", "ml-100k", "u.data", "\t", None),
    ("ml-1m", "ml-1m", "ratings.dat", "::", None),
    ("ml-10m", "ml-10M100K", "ratings.dat", "::", None),
    ("ml-25m", "ml-25m", "ratings.csv", ",", "userId,movieId,rating,timestamp"),
    ("ml-latest-small", "ml-latest-small", "ratings.csv", ",", "userId,movieId,rating,timestamp"),
])
def test_each_extracted_layout_parses_to_the_written_ratings(tmp_path, name, folder, filename,
                                                             sep, header):
    users, items, ratings = small()
    write_ratings(tmp_path / folder / filename, users, items, ratings, sep=sep, header=header)
    data = loader.load(name, tmp_path, allow_download=False)
    assert len(data) == len(ratings)
    np.testing.assert_array_equal(data.user_ids[data.users], users)
    np.testing.assert_array_equal(data.item_ids[data.items], items)
    np.testing.assert_allclose(data.ratings, ratings)


def test_local_zip_is_extracted_through_a_temporary_folder(tmp_path):
    users, items, ratings = small()
    source = write_ratings(tmp_path / "src" / "ratings.dat", users, items, ratings)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = write_zip(data_dir / "ml-1m.zip", "ml-1m", {"ratings.dat": source})
    spec = loader.DATASETS["ml-1m"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    loader.DATASETS["ml-1m"] = loader.MovieLens(**{**spec.__dict__, "md5": md5})
    try:
        data = loader.load("ml-1m", data_dir, allow_download=False)
    finally:
        loader.DATASETS["ml-1m"] = spec
    assert len(data) == len(ratings)
    assert (data_dir / "ml-1m" / "ratings.dat").is_file()
    assert not list(data_dir.glob(".extract-*"))


def test_local_zip_with_wrong_checksum_is_refused(tmp_path):
    source = write_ratings(tmp_path / "ratings.dat", *small())
    write_zip(tmp_path / "ml-1m.zip", "ml-1m", {"ratings.dat": source})
    with pytest.raises(loader.DataError, match="checksum mismatch"):
        loader.load("ml-1m", tmp_path, allow_download=False)
    assert not (tmp_path / "ml-1m").exists()


def test_corrupt_zip_is_a_clear_error_and_leaves_no_folder(tmp_path):
    (tmp_path / "ml-latest-small.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(loader.DataError, match="not a valid zip"):
        loader.load("ml-latest-small", tmp_path, allow_download=False)
    assert not (tmp_path / "ml-latest-small").exists()
    assert not list(tmp_path.glob(".extract-*"))


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(loader.DataError, match="ml-100k.*ml-1m.*ml-32m"):
        loader.dataset_spec("ml-2m")


def test_no_local_copy_and_no_download_says_where_to_put_files(tmp_path):
    with pytest.raises(loader.DataError, match=r"ml-1m\.zip.*ratings\.dat"):
        loader.load("ml-1m", tmp_path, allow_download=False)


# ----------------------------------------------------------------------------- cache

def test_cache_is_used_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write_ratings(tmp_path / "ml-1m" / "ratings.dat", *small())
    first = loader.load("ml-1m", tmp_path)
    caches = list((tmp_path / "ml-1m").glob(".*.npz"))
    assert len(caches) == 1
    # A cache hit does not parse the ratings file (a change of its content is a miss:
    # tests/test_reading_rules.py).
    with monkeypatch.context() as patched:
        patched.setattr(loader.formats, "read_interactions", lambda *a, **k: pytest.fail("parsed on a cache hit"))
        np.testing.assert_array_equal(loader.load("ml-1m", tmp_path).ratings, first.ratings)
    users, items, ratings = small(n=30, seed=5)
    write_ratings(path, users, items, ratings)
    assert len(loader.load("ml-1m", tmp_path)) == 30


def test_read_only_data_dir_caches_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "ro" / "ml-1m"
    write_ratings(folder / "ratings.dat", *small())
    folder.chmod(0o555)
    try:
        loader.load("ml-1m", tmp_path / "ro")
        assert list((tmp_path / "cache" / "mfmixtaste").glob("*.npz"))
        assert not list(folder.glob(".*.npz"))
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- malformed

@pytest.mark.parametrize("bad_line,problem", [
    ("7::abc::4::978300000", "ids must be integers"),
    ("7::11::4", "expected 4 fields"),  # every MovieLens ratings line has its timestamp
    ("7::11", "expected 4 fields"),
    ("7::11::4::978300000::1", "expected 4 fields"),
    ("7::11::four::978300000", "the rating is not a finite number"),
    ("7::11::4::soon", "the timestamp must be an integer"),
])
def test_malformed_line_is_named_with_file_and_line_number(tmp_path, bad_line, problem):
    path = write_ratings(tmp_path / "ml-1m" / "ratings.dat", *small(n=10))
    lines = path.read_text().splitlines()
    lines.insert(4, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(loader.DataError) as error:
        loader.load("ml-1m", tmp_path)
    assert f"{path}, line 5" in str(error.value) and problem in str(error.value)


def test_missing_rating_in_csv_is_named(tmp_path):
    path = write_ratings(tmp_path / "ml-25m" / "ratings.csv", *small(n=10), sep=",",
                         header="userId,movieId,rating,timestamp")
    lines = path.read_text().splitlines()
    lines[3] = "4,5,,978300000"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(loader.DataError, match=r"line 4: the rating is not a finite number"):
        loader.load("ml-25m", tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", "userId,movieId,rating,timestamp\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "ml-25m" / "ratings.csv"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(loader.DataError, match=str(path)):
        loader.load("ml-25m", tmp_path)


# ----------------------------------------------------------------------------- download

class _Server:
    """A static file server on 127.0.0.1 for the download tests."""

    def __init__(self, root):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_archive(tmp_path, monkeypatch):
    """A fake ml-latest-small.zip (and its .md5) served over HTTP; DATASETS points at it."""
    root = tmp_path / "server"
    root.mkdir()
    users, items, ratings = small(n=40)
    source = write_ratings(tmp_path / "src" / "ratings.csv", users, items, ratings, sep=",",
                           header="userId,movieId,rating,timestamp")
    archive = write_zip(root / "ml-latest-small.zip", "ml-latest-small", {"ratings.csv": source})
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    (root / "ml-latest-small.zip.md5").write_text(f"MD5 (ml-latest-small.zip) = {md5}\n")
    with _Server(root) as server:
        spec = loader.MovieLens(server.url + "ml-latest-small.zip", None,
                                server.url + "ml-latest-small.zip.md5", "ml-latest-small",
                                "ratings.csv", ",", True, "utf-8")
        monkeypatch.setitem(loader.DATASETS, "ml-latest-small", spec)
        yield spec, md5, len(ratings)


def test_download_reads_the_published_md5_and_extracts(tmp_path, served_archive):
    spec, md5, n = served_archive
    data_dir = tmp_path / "data"
    data = loader.load("ml-latest-small", data_dir, progress=False)
    assert len(data) == n
    assert hashlib.md5((data_dir / "ml-latest-small.zip").read_bytes()).hexdigest() == md5
    assert sorted(p.name for p in data_dir.iterdir()) == ["ml-latest-small", "ml-latest-small.zip"]


def test_download_with_checksum_mismatch_leaves_nothing_behind(tmp_path, served_archive,
                                                               monkeypatch):
    spec, md5, _ = served_archive
    monkeypatch.setitem(loader.DATASETS, "ml-latest-small",
                        loader.MovieLens(**{**spec.__dict__, "md5": "0" * 32}))
    data_dir = tmp_path / "data"
    with pytest.raises(loader.DataError, match="checksum mismatch"):
        loader.load("ml-latest-small", data_dir, progress=False)
    assert list(data_dir.iterdir()) == []


def test_unreachable_server_says_how_to_get_the_files_by_hand(tmp_path, monkeypatch):
    with _Server(tmp_path) as server:
        url = server.url
    # The server is closed now: connections are refused, like a machine without network.
    monkeypatch.setitem(loader.DATASETS, "ml-100k", loader.MovieLens(
        url + "ml-100k.zip", "0" * 32, None, "ml-100k", "u.data", "\t", False, "latin-1"))
    with pytest.raises(loader.DataError) as error:
        loader.load("ml-100k", tmp_path / "data", progress=False)
    message = str(error.value)
    assert "could not download" in message and "ml-100k.zip" in message and "by hand" in message
    assert list((tmp_path / "data").iterdir()) == []


# ----------------------------------------------------------------------------- split, batches

def test_split_follows_the_replaced_scripts_protocol():
    n = 10_000
    train, val, test = loader.split(n)
    np.random.seed(42)
    expected_train = np.random.rand(n) < 0.75
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])),
                                  np.flatnonzero(expected_train))
    np.testing.assert_array_equal(test, np.flatnonzero(~expected_train))
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.07
    assert not set(val) & set(train)


def test_index_of_maps_raw_ids_and_rejects_unknown_ones():
    data = loader.encode(np.array([10, 30, 10]), np.array([5, 5, 900]), np.array([1, 2, 3]))
    users, items = data.index_of([30, 10], [900, 5])
    assert users.tolist() == [1, 0] and items.tolist() == [1, 0]
    with pytest.raises(KeyError, match="unknown user id 20"):
        data.index_of([20], [5])


def _tensors(n):
    return torch.arange(n), torch.arange(n) * 10, torch.arange(n, dtype=torch.float32)


def test_batches_cover_every_rating_once_keep_the_last_and_reshuffle():
    batches = loader.BatchIterator(_tensors(103), batch_size=10, seed=3)
    assert len(batches) == 11
    epochs = [[b for b in batches] for _ in range(2)]
    for epoch in epochs:
        users = torch.cat([b[0] for b in epoch])
        assert sorted(users.tolist()) == list(range(103))
        assert len(epoch[-1][0]) == 3 and all(b[3] == len(b[0]) for b in epoch)
        assert torch.equal(epoch[0][1], epoch[0][0] * 10)  # rows stay aligned
    assert not torch.equal(torch.cat([b[0] for b in epochs[0]]),
                           torch.cat([b[0] for b in epochs[1]]))


def test_batches_are_reproducible_and_resume_from_state():
    a = loader.BatchIterator(_tensors(50), batch_size=8, seed=7)
    b = loader.BatchIterator(_tensors(50), batch_size=8, seed=7)
    list(a)
    state = a.state_dict()
    second_a = [x[0] for x in a]
    list(b)
    c = loader.BatchIterator(_tensors(50), batch_size=8, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(x, y[0]) for x, y in zip(second_a, b))
    assert all(torch.equal(x, y[0]) for x, y in zip(second_a, c))


def test_rank_shares_partition_each_global_batch():
    whole = list(loader.BatchIterator(_tensors(37), batch_size=8, seed=1))
    shares = [list(loader.BatchIterator(_tensors(37), batch_size=8, seed=1, rank=r,
                                        world_size=2)) for r in range(2)]
    for k, batch in enumerate(whole):
        joined = torch.cat([shares[0][k][0], shares[1][k][0]])
        assert sorted(joined.tolist()) == sorted(batch[0].tolist())
        assert shares[0][k][3] == shares[1][k][3] == len(batch[0])


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not (SHARED_DATA / "ml-1m" / "ratings.dat").is_file(),
                    reason="../shared/data/ml-1m is not here (optional benchmark data)")
def test_real_ml1m_parses_with_the_documented_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data = loader.load("ml-1m", SHARED_DATA, allow_download=False)
    assert (len(data), data.n_users, data.n_items) == (1_000_209, 6040, 3706)
    assert abs(float(data.ratings.mean()) - 3.581564) < 1e-5


# ----------------------------------------------------------------------------- edges

def _read_only_zip(folder, ratings):
    """A read-only folder holding ml-latest-small.zip with the given (users, items, ratings)."""
    source = write_ratings(folder.parent / f"{folder.name}-src" / "ratings.csv", *ratings, sep=",",
                           header="userId,movieId,rating,timestamp")
    folder.mkdir(parents=True)
    write_zip(folder / "ml-latest-small.zip", "ml-latest-small", {"ratings.csv": source})
    folder.chmod(0o555)
    return folder


def test_the_user_cache_is_keyed_by_the_archive_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = _read_only_zip(tmp_path / "a", small(n=40, seed=1))
    second = _read_only_zip(tmp_path / "b", small(n=25, seed=2))
    try:
        assert len(loader.load("ml-latest-small", first)) == 40
        assert len(loader.load("ml-latest-small", second)) == 25  # not the first one's extraction
        assert len(loader.load("ml-latest-small", first)) == 40
        with pytest.raises(loader.DataError, match="not available locally"):
            loader.load("ml-latest-small", tmp_path / "nowhere", allow_download=False)
    finally:
        first.chmod(0o755), second.chmod(0o755)


def test_an_empty_parse_cache_is_rebuilt(tmp_path):
    write_ratings(tmp_path / "ml-1m" / "ratings.dat", *small())
    loader.load("ml-1m", tmp_path)
    [cache] = (tmp_path / "ml-1m").glob(".*.npz")
    cache.write_bytes(b"")
    assert len(loader.load("ml-1m", tmp_path)) == 50
    assert cache.stat().st_size > 0


def test_zip_extracts_into_a_folder_that_holds_only_the_cache(tmp_path):
    source = write_ratings(tmp_path / "src" / "u.data", *small(), sep="\t")
    data_dir = tmp_path / "data"
    (data_dir / "ml-100k").mkdir(parents=True)
    (data_dir / "ml-100k" / ".u.data.mfmixtaste.npz").write_bytes(b"stale")
    archive = write_zip(data_dir / "ml-100k.zip", "ml-100k", {"u.data": source})
    spec = loader.DATASETS["ml-100k"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    loader.DATASETS["ml-100k"] = loader.MovieLens(**{**spec.__dict__, "md5": md5})
    try:
        assert len(loader.load("ml-100k", data_dir, allow_download=False)) == 50
    finally:
        loader.DATASETS["ml-100k"] = spec
    assert (data_dir / "ml-100k" / "u.data").is_file()


@pytest.mark.parametrize("n,val_fraction,empty", [(2, 0.05, "validation"), (200, 1e-6, "validation"),
                                                  (1, 0.5, "test")])
def test_data_too_small_to_split_is_a_clear_error(n, val_fraction, empty):
    with pytest.raises(loader.DataError, match=f"{n} ratings are too few to split.* 0 {empty}"):
        loader.split(n, val_fraction=val_fraction)


def test_generator_state_loads_from_any_device_copy():
    """A checkpoint read with map_location=cuda hands over a CUDA tensor; set_state takes only
    a CPU byte tensor. A float copy stands in for the foreign tensor here: it must be refused by
    set_state, and accepted through load_state_dict's conversion."""
    a = loader.BatchIterator(_tensors(20), batch_size=4, seed=3)
    state = a.state_dict()["generator"]

    class Elsewhere(torch.Tensor):  # a tensor that is not on the CPU until .cpu() is called
        def cpu(self):
            return state.clone()
    moved = state.double().as_subclass(Elsewhere)
    with pytest.raises((TypeError, RuntimeError)):
        torch.Generator().set_state(moved)
    b = loader.BatchIterator(_tensors(20), batch_size=4, seed=99)
    b.load_state_dict({"generator": moved})
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
