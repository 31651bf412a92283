"""Interaction files of any common layout: the format recognised from the file itself, the user,
item, rating and timestamp columns found by their header names (or given), read as arrays.

    found = read_interactions("ratings.csv.gz", columns="")   # -> Interactions (indices, raw ids, file order)
    names = read_item_names("items.csv")                       # -> {"item", "title", "genres", "year"} arrays

What is recognised, without a format flag:
- delimited rows: "::" (MovieLens .dat), tab, comma, "|", ";" or runs of whitespace; a header
  line or none; quoted fields;
- the same compressed: .gz, .bz2, .zst, .xz, or a .zip holding one file;
- Parquet (.parquet, or a file starting with PAR1), and JSON lines (one object a line, as Amazon's
  review files: reviewerID, asin, overall, unixReviewTime);
- RecBole atomic files (.inter, .item: a typed header such as user_id:token<TAB>rating:float);
- one line per user: the user's id, then the items the user interacted with, in order.

Columns: a header's common spellings (SPELLINGS) are found without help; a headerless file is
read by position as user, item[, rating[, timestamp]]; anything else is named with `columns`
("USER,ITEM[,RATING[,TIMESTAMP]]": header names in that order, or 0-based positions; an empty
entry skips one). Ids are the file's own: a column whose every id is a plain integer keeps
integers, any other keeps strings ("007" stays "007"). Timestamps become seconds (numbers as
they are, dates and datetimes parsed). Bad input is a DataError naming the file and the line.

pyarrow reads the rows (multithreaded, ids hashed without a Python object per row): a
25-million-row CSV loads in well under a minute on two cores (docs/data.md).
"""

import bz2
import csv
import gzip
import io
import lzma
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(Exception):
    """Bad or missing data: the message says what and where."""


# Header spellings of each column, compared lower-cased with everything but letters and digits
# removed (user_id, userId and USER-ID are all "userid").
SPELLINGS = {
    "user": {"user", "userid", "uid", "users", "username", "customer", "customerid", "visitorid", "reviewerid",
             "memberid", "accountid", "clientid", "readerid", "viewerid", "playerid", "listenerid", "personid",
             "sessionid", "userindex", "useridx", "client", "clientcode", "account", "accountnumber", "member",
             "buyer", "shopper", "visitor", "subscriber", "customerkey", "customercode", "customerno", "viewer",
             "reader", "listener", "player", "learner", "studentid", "student"},
    "item": {"item", "itemid", "iid", "items", "movie", "movieid", "bookid", "book", "productid", "product",
             "asin", "artist", "artistid", "track", "trackid", "songid", "song", "articleid", "businessid",
             "recipeid", "animeid", "gameid", "courseid", "videoid", "newsid", "poiid", "venueid", "jobid",
             "isbn", "sku", "parentasin", "itemindex", "itemidx", "contentid", "productsku", "skuid", "skucode",
             "article", "articleno", "itemcode", "productcode", "productno", "offer", "offerid", "listing",
             "listingid", "variantid", "goodsid", "goods", "stockcode", "video", "movietitleid", "podcastid",
             "episodeid", "course", "recipe", "restaurantid", "hotelid", "placeid", "appid", "app"},
    "rating": {"rating", "ratings", "score", "stars", "star", "overall", "rate", "rated", "preference",
               "ratingvalue"},
    "timestamp": {"timestamp", "time", "ts", "date", "datetime", "unixreviewtime", "reviewtime", "when",
                  "created", "createdat", "eventtime", "time_stamp", "unixtime", "timestampms", "eventdate", "eventtimestamp",
                  "datetimeutc", "invoicedate", "orderdate", "purchasedate", "playedat", "watchedat", "ratedat",
                  "clickedat", "occurredat", "dateadded", "timeutc"},
}
ITEM_NAME_SPELLINGS = {
    "title": {"title", "name", "movietitle", "itemname", "producttitle", "productname", "booktitle",
              "originaltitle", "trackname", "artistname", "songtitle", "artist", "track"},
    "genres": {"genres", "genre", "category", "categories", "tags", "tag", "class", "classes"},
    "year": {"year", "releaseyear", "publicationyear", "originalpublicationyear"},
}
ROLES = ("user", "item", "rating", "timestamp")
SEPARATORS = ("::", "\t", ",", "|", ";")  # by priority; None: runs of whitespace
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
TEXT_DATA_SUFFIXES = {".csv", ".tsv", ".txt", ".dat", ".data", ".inter", ".item", ".tab", ""}
SAMPLE_BYTES = 1 << 16
RECBOLE_TYPE = re.compile(r"^([^:\s]+):(token|token_seq|float|float_seq)$")
PLAIN_INTEGER = r"^-?(0|[1-9][0-9]{0,17})$"  # an id kept as an integer: no sign but '-', no leading 0


@dataclass
class Layout:
    """How a file is laid out. kind: "rows", "per_user", "parquet" or "json"; sep: the field separator
    (None: runs of whitespace); header: the header's names (None: no header line); n_fields: the
    fields of a row; compression: None, gzip, bz2, zstd, xz or zip; what: in words, for the run's
    first lines."""
    kind: str
    sep: str | None = None
    header: list | None = None
    n_fields: int = 0
    compression: str | None = None
    what: str = ""
    table: object = None  # a JSON-lines file, read whole to learn its fields
    encoding: str = "utf-8"  # "latin-1" for text that is not UTF-8: every byte one character, distinct ids kept
    decimal: str = "."       # "," for ';'-separated files whose numbers use a decimal comma (4,5)


@dataclass
class Interactions:
    """A file's interactions in file order: users and items (N,) int64 indices into user_ids and
    item_ids, the sorted raw ids as read (int64, or str where an id is not a plain integer);
    ratings (N,) float32 (None: no rating column); timestamps (N,) int64 seconds (None: none;
    for one line per user, each item's position in its line); what was read, in words."""
    users: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray | None
    timestamps: np.ndarray | None
    described: list = field(default_factory=list)
    weights: np.ndarray | None = None  # (N,) float32 > 0 of --event_weights / --weight_column, None: none


# ----------------------------------------------------------------------------- bytes

def compression_of(path):
    """None, "zip" or a codec name, from the file's last suffix; the suffix it leaves."""
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return "zip", ""
    if suffix in COMPRESSIONS:
        return COMPRESSIONS[suffix], Path(path.stem).suffix.lower()
    return None, suffix


def _zip_member(path):
    with zipfile.ZipFile(path) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                   and not Path(m.filename).name.startswith(".")]
    if len(members) != 1:
        raise DataError(f"{path}: a zip must hold one data file, it holds {len(members)}"
                        + (f" ({', '.join(m.filename for m in members[:4])})" if members else "")
                        + ": extract it and give the file's path")
    return members[0].filename


def open_stream(path, compression):
    """A binary stream of the file's decompressed bytes."""
    try:
        if compression == "zip":
            zipped = zipfile.ZipFile(path)
            return zipped.open(_zip_member(path))
        if compression in ("gzip", "bz2", "xz"):
            return {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression](path, "rb")
        if compression == "zstd":
            import pyarrow as pa
            return pa.input_stream(str(path), compression="zstd")
        return open(path, "rb")
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path}: cannot be opened as {compression or 'a file'} ({error})") from None


def read_bytes(path, compression, limit=None):
    """The decompressed bytes (at most limit of them); a damaged archive is a DataError."""
    try:
        with open_stream(path, compression) as stream:
            return stream.read(limit) if limit else stream.read()
    except (OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError, ValueError) as error:
        raise DataError(f"{path}: the {compression} data is damaged ({error})") from None
    except Exception as error:  # pyarrow's own errors for zstd
        if type(error).__module__.startswith("pyarrow"):
            raise DataError(f"{path}: the {compression} data is damaged ({error})") from None
        raise


# ----------------------------------------------------------------------------- layout

def _split(line, sep):
    if sep is None:
        return line.split()
    if sep == "::":
        return line.split("::")
    return next(csv.reader([line], delimiter=sep))


def _is_number(text, decimal="."):
    """Whether a field is a finite number (decimal: "," where 4,5 is four and a half)."""
    try:
        return np.isfinite(float(text.replace(",", ".") if decimal == "," else text))
    except ValueError:
        return False


DECIMAL_COMMA = re.compile(r"^-?\d+,\d+$")
DATE_LIKE = re.compile(r"^\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}:?\d{2})?)?$")


def _is_time(text):
    """Whether a field is a date or a date and time (2020-01-31, 12/04/1997 15:55, ...)."""
    return bool(DATE_LIKE.match(text.strip()))


def normalised(name):
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def role_of(name, spellings=SPELLINGS):
    key = normalised(name)
    return next((role for role, names in spellings.items() if key in names), None)


def sniff(path):
    """The Layout of a file, from its name and a look at its first 64 KB."""
    path = Path(path)
    compression, suffix = compression_of(path)
    head = read_bytes(path, compression, SAMPLE_BYTES)
    if head[:4] == b"PAR1" or suffix in (".parquet", ".pq"):
        if compression is not None:
            raise DataError(f"{path}: a compressed Parquet file: Parquet compresses inside, give the .parquet file")
        return Layout("parquet", what="Parquet")
    if not head.strip():
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in head:
        raise DataError(f"{path}: not a format this tool reads (binary data; it reads delimited text, "
                        "compressed or not, Parquet and RecBole atomic files: docs/data.md)")
    encoding = text_encoding(head, cut=len(head) == SAMPLE_BYTES)
    text = head.decode(encoding).lstrip("\ufeff")
    if text.lstrip().startswith("{"):  # one JSON object a line (Amazon's review files)
        return Layout("json", compression=compression, what=(f"{compression}-compressed " if compression else "")
                      + "JSON lines")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(head) == SAMPLE_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last may be cut
    how = (f"{compression}-compressed " if compression else "") + ("Latin-1 " if encoding != "utf-8" else "")
    first = lines[0].split("\t")
    if all(RECBOLE_TYPE.match(name.strip()) for name in first):
        return Layout("rows", "\t", [RECBOLE_TYPE.match(n.strip()).group(1) for n in first], len(first),
                      compression, how + "RecBole atomic file", encoding=encoding)
    sep = separator_of(path, lines)
    counts = [len(_split(line, sep)) for line in lines]
    fields = [_split(line, sep) for line in lines]
    named = "spaces" if sep is None else repr(sep)
    firsts = [f[0] for f in fields]
    uniform = max(counts) == min(counts)
    header = _has_header(fields)
    # One line per user: no header, no user on two lines, and either lines of different lengths,
    # many fields apart by spaces, or a third field that cannot be a rating.
    # A third field of numbers (a rating) or of dates (a time) makes rows, whatever the users do.
    if header is None and len(set(firsts)) == len(firsts) and len(lines) > 1 and (
            not uniform or (sep is None and counts[0] > 4)
            or (counts[0] >= 3 and not all(_is_number(f[2], "," if sep == ";" else ".") for f in fields)
                and not all(_is_time(f[2]) for f in fields))):
        return Layout("per_user", sep, None, 0, compression,
                      f"{how}one line per user (the user, then the items in order), separated by {named}",
                      encoding=encoding)
    n_fields = counts[0] if header is None else len(header)
    if header is None and not uniform:  # the count most lines have: the odd line is named when read
        n_fields = max(set(counts), key=counts.count)
    # A ';'-separated file may write its numbers with a decimal comma (4,5): the spreadsheets of
    # many locales do, and the comma is then no separator (separator_of).
    body = fields[1:] if header else fields
    decimal = "," if sep == ";" and any(DECIMAL_COMMA.match(value.strip()) for row in body for value in row) else "."
    return Layout("rows", sep, header, n_fields, compression,
                  f"{how}rows separated by {named}, " + ("with a header line" if header else "no header line")
                  + (", decimal commas" if decimal == "," else ""), encoding=encoding, decimal=decimal)


def text_encoding(data, cut=False):
    """ "utf-8" where the bytes are UTF-8 (cut: they may end inside a character), else "latin-1":
    read that way every byte is one character, so ids that differ in a byte stay apart (café and
    cafè in Latin-1), where a replacement character would merge them."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        if not (cut and error.start >= len(data) - 3 and "unexpected end" in error.reason):
            return "latin-1"
    return "utf-8"


def separator_of(path, lines):
    """The field separator of sampled lines: of those that split every line into the same number
    of fields, two or more, the one that gives the most fields (a ';' file with decimal commas,
    1;10;4,5, splits into 2 fields on ',' but 3 on ';'); ties go by SEPARATORS' order. Where none
    is that regular (one line per user), the first in that order that gives each line two fields;
    runs of whitespace last."""
    regular = {}
    for sep in SEPARATORS:
        counts = {len(_split(line, sep)) for line in lines}
        if len(counts) == 1 and min(counts) >= 2:
            regular[sep] = counts.pop()
    if regular:
        return max(regular, key=lambda sep: (regular[sep], -SEPARATORS.index(sep)))
    for sep in SEPARATORS + (None,):
        if min(len(_split(line, sep)) for line in lines) >= 2:
            return sep
    raise DataError(f"{path}: finds no separator that gives each line two fields or more (a user and an "
                    f"item): it reads ',', tab, '::', '|', ';' or spaces; first line: {lines[0][:80]!r}")


def _has_header(fields):
    """The first line's names when it is a header: it names a known column, or it has a
    non-number where the rest of that column holds numbers."""
    first, rest = fields[0], fields[1:]
    names = [name.strip() for name in first]
    if any(role_of(name) for name in names):
        return names
    for i, name in enumerate(names):
        column = [row[i] for row in rest if len(row) > i]
        if column and not _is_number(name) and all(_is_number(value) for value in column):
            return names
    return None


# ----------------------------------------------------------------------------- weights

@dataclass
class Weights:
    """How rows are weighed: kind "event" (column's values -> weights; a value not listed, or
    weight 0, drops its rows) or "strength" (a numeric column x, weight log(1 + x): play counts,
    quantities; 0 drops the row); text: as the command line gave it."""
    kind: str
    column: str
    values: dict = field(default_factory=dict)
    text: str = ""
    strict: bool = True  # a listed value the file lacks is refused (a pre-split folder's valid and test files: not)


def parse_weights(event_weights="", weight_column=""):
    """--event_weights=COLUMN:VALUE=W[,VALUE=W...] or --weight_column=COLUMN -> Weights, or None
    when neither is given; bad text is a DataError that says the form."""
    if event_weights and weight_column:
        raise DataError("give --event_weights (weights by an event column's values) or --weight_column (a numeric "
                        "strength), not both")
    if weight_column:
        return Weights("strength", weight_column.strip(), text=f"--weight_column={weight_column}")
    if not event_weights:
        return None
    form = "--event_weights=COLUMN:VALUE=W[,VALUE=W...], e.g. --event_weights=event_type:view=0.2,cart=0.5,purchase=1"
    column, colon, pairs = event_weights.partition(":")
    if not colon or not column.strip() or not pairs.strip():
        raise DataError(f"--event_weights={event_weights}: give {form}")
    values = {}
    for pair in pairs.split(","):
        value, equals, weight = pair.partition("=")
        try:
            number = float(weight)
        except ValueError:
            number = None
        if not equals or not value.strip() or number is None or not np.isfinite(number) or number < 0:
            raise DataError(f"--event_weights: {pair.strip()!r} is not VALUE=W with W a number of at least 0; give {form}")
        values[value.strip()] = number
    return Weights("event", column.strip(), values, f"--event_weights={event_weights}")


def weigh(table, weights, path):
    """The rows' weights (N,) float64 from table["weight"] under weights (Weights). An event
    value listed but absent from the file, or a strength that is not a number of at least 0, is
    a DataError that says what the file has."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table["weight"]
    if weights.kind == "event":
        values = pc.utf8_trim_whitespace(column.cast(pa.string())).to_numpy(zero_copy_only=False).astype(str)
        present = set(np.unique(values).tolist())
        missing = [value for value in weights.values if value not in present]
        if missing and weights.strict:
            shown = sorted(present)
            raise DataError(f"{path}: {weights.text}: its column {weights.column!r} has no value "
                            f"{', '.join(map(repr, missing))}; it has {', '.join(map(repr, shown[:20]))}"
                            + (f" and {len(shown) - 20:,} more" if len(shown) > 20 else ""))
        lookup = np.vectorize(lambda v: weights.values.get(v, 0.0), otypes=[np.float64])
        return lookup(values) if len(values) else np.zeros(0)
    try:
        strength = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        strength = np.array([np.nan])
    if not np.isfinite(strength).all() or (strength < 0).any():
        raise DataError(f"{path}: {weights.text}: the column {weights.column!r} must hold numbers of at least 0 (a "
                        "count or an amount) in every row")
    return np.log1p(strength)


# ----------------------------------------------------------------------------- columns

def parse_columns(text):
    """--columns=USER,ITEM[,RATING[,TIMESTAMP]] -> {role: name or position}, empty entries left out."""
    if not text:
        return {}
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > len(ROLES) or len(entries) < 2 or not entries[0] or not entries[1]:
        raise DataError(f"--columns={text}: give USER,ITEM[,RATING[,TIMESTAMP]] (header names or 0-based "
                        "positions; an empty entry skips one, as in --columns=visitor,product,,when)")
    return {role: entry for role, entry in zip(ROLES, entries) if entry}


def resolve_columns(path, layout, given, spellings=SPELLINGS, needed=("user", "item")):
    """{role: column index} of the file: the given names or positions, else the header's known
    spellings, else (no header) user, item[, rating[, timestamp]] by position. A given entry the
    header has as a name is that column, whatever it looks like (a pandas dump's header ,0,1,2
    names columns "0", "1", "2"); other digits are 0-based positions."""
    header = layout.header
    if given and any(not v.isdigit() for v in given.values()) and header is None and layout.kind == "rows":
        layout.header = header = [name.strip() for name in _first_fields(path, layout)]
        layout.what = layout.what.replace("no header line", "with a header line (named by --columns)")
    if given:
        found = {}
        for role, entry in given.items():
            if header and entry in header:
                found[role] = header.index(entry)
                if entry.isdigit():  # said, since a position is written the same way
                    layout.what += f"; --columns' {entry} is the header's name {entry!r}, not a position"
            elif entry.isdigit():
                if int(entry) >= max(layout.n_fields, len(header or ())):
                    raise DataError(f"{path}: --columns gives column {entry} for the {role}, but its rows have "
                                    f"{layout.n_fields} fields (numbered from 0)")
                found[role] = int(entry)
            else:
                raise DataError(f"{path} has no column {entry!r}; its columns are {', '.join(header)}")
        return found
    if header is None:
        found = {role: i for i, role in enumerate(ROLES[:layout.n_fields])}
        return found
    found = {}
    for i, name in enumerate(header):
        role = role_of(name, spellings)
        if role and role not in found:
            found[role] = i
    missing = [role for role in needed if role not in found]
    if missing:
        suggestion = suggest_columns(path, layout, found)
        raise DataError(f"{path}: cannot tell which columns hold the {' and the '.join(missing)}; its columns are "
                        f"{', '.join(header)}: name them with --columns=USER,ITEM[,RATING[,TIMESTAMP]]"
                        + (f", perhaps --columns={suggestion}" if suggestion else ""))
    return found


def suggest_columns(path, layout, found):
    """A --columns guess for a header whose user or item was not recognised, from the sampled
    values: the roles found by name keep their columns; a missing user or item is an id-like
    column (short tokens without spaces, not decimal numbers nor times, repeating across rows
    but with more than ten values: not a rating or an event type), the first whose name holds a
    spelling of the role, else the first in the file; a time-like column is the timestamp. None
    where no column is id-like."""
    header = layout.header
    if layout.kind == "rows":
        text = read_bytes(path, layout.compression, SAMPLE_BYTES).decode(layout.encoding).lstrip("\ufeff")
        lines = [line for line in text.splitlines() if line.strip()][1:-1] or \
            [line for line in text.splitlines() if line.strip()][1:]
        rows = [row for row in (_split(line, layout.sep) for line in lines) if len(row) == len(header)]
        columns = [[row[i].strip() for row in rows] for i in range(len(header))]
    else:
        table = layout.table if layout.kind == "json" else _parquet_head(path)
        columns = [[str(v) for v in table.column(name).to_pylist()[:2000]] for name in header]
    chosen, used = dict(found), set(found.values())

    def id_like(values):
        return (values and all(v and " " not in v and len(v) <= 64 and not _is_time(v) for v in values)
                and not all(_is_number(v) and not re.fullmatch(r"-?\d+", v) for v in values))

    def many_repeated(values):
        distinct = len(set(values))
        return distinct < len(values) and (distinct > 10 or len(values) < 50)

    for role in ("user", "item"):
        if role in chosen:
            continue
        candidates = [i for i in range(len(header)) if i not in used and id_like(columns[i])
                      and many_repeated(columns[i])]
        if not candidates:
            return None
        named = [i for i in candidates if any(w in normalised(header[i]) for w in SPELLINGS[role] if len(w) >= 3)]
        chosen[role] = (named or candidates)[0]
        used.add(chosen[role])
    if "timestamp" not in chosen:
        timed = [i for i in range(len(header)) if i not in used and columns[i] and all(_is_time(v) for v in columns[i])]
        if timed:
            chosen["timestamp"] = timed[0]
    entries = [header[chosen[role]] if role in chosen else "" for role in ROLES]
    while not entries[-1]:
        entries.pop()
    return ",".join(entries)


def _parquet_head(path):
    import pyarrow.parquet as pq
    with pq.ParquetFile(path) as parquet:
        return next(parquet.iter_batches(batch_size=2000))


def _first_fields(path, layout):
    text = read_bytes(path, layout.compression, SAMPLE_BYTES).decode(layout.encoding, errors="replace").lstrip("\ufeff")
    line = next(line for line in text.splitlines() if line.strip())
    return _split(line, layout.sep)


# ----------------------------------------------------------------------------- reading

def read_table(path, layout, columns, types, skip_misfit=None):
    """The chosen columns of a rows or Parquet file as a pyarrow Table named by role. columns:
    {role: index}; types: {role: pyarrow type} forced at parse (others inferred); skip_misfit:
    called with each line of another number of fields, which is then left out (else an error)."""
    import pyarrow as pa
    import pyarrow.csv as pv

    if layout.kind == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path, columns=[layout.header[i] for i in columns.values()])
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"{path}: not a readable Parquet file ({error})") from None
        return table.rename_columns(list(columns))
    if layout.kind == "json":
        return layout.table.select([layout.header[i] for i in columns.values()]).rename_columns(list(columns))
    names = [f"c{i}" for i in range(layout.n_fields)]
    chosen = {role: names[i] for role, i in columns.items()}
    sep = layout.sep
    source = None
    if sep in ("\t", ",", "|", ";") and layout.compression != "zip":
        source = open_stream(path, layout.compression)
    else:  # pyarrow takes one-character separators: "::" and runs of spaces become tabs first
        data = read_bytes(path, layout.compression)
        if sep == "::":
            data = data.replace(b"::", b"\t")
        elif sep is None:  # blanks at either end of a line (before a \r too) are no field
            data = re.sub(rb"(?m)^[ \t]+|[ \t]+(?=\r?$)", b"", re.sub(rb"[ \t]+", b"\t", data))
        source, sep = pa.BufferReader(data), "\t" if sep in ("::", None) else sep
    with source:
        return pv.read_csv(
            source,
            read_options=pv.ReadOptions(column_names=names, skip_rows=1 if layout.header else 0,
                                        block_size=1 << 24, encoding=layout.encoding),
            parse_options=pv.ParseOptions(delimiter=sep, quote_char='"' if layout.sep not in ("::", None) else False,
                                          invalid_row_handler=skip_misfit and (lambda row: skip_misfit(row) or "skip")),
            convert_options=pv.ConvertOptions(include_columns=list(chosen.values()),
                                              column_types={chosen[r]: t for r, t in types.items() if r in chosen},
                                              strings_can_be_null=False, quoted_strings_can_be_null=False,
                                              decimal_point=layout.decimal),
        ).rename_columns(list(chosen))


def encode_ids(column):
    """A pyarrow id column -> (codes (N,) int64 into the sorted unique ids, those ids: int64 when
    every id is a plain integer, else str)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        ids, codes = np.unique(column.to_numpy(), return_inverse=True)
        return codes.astype(np.int64), ids.astype(np.int64)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    column = pc.utf8_trim_whitespace(column)  # " 10" in "1, 10, 4" is the item 10, as pandas reads it
    encoded = pc.dictionary_encode(column).combine_chunks()
    dictionary, codes = encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if len(dictionary) and pc.all(pc.match_substring_regex(dictionary, PLAIN_INTEGER)).as_py():
        values = dictionary.cast(pa.int64()).to_numpy()
    else:
        values = np.asarray(dictionary.to_pylist(), dtype=str)
    order = np.argsort(values, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], values[order]


def seconds(column, path):
    """A timestamp column -> int64 seconds: numbers as they are, dates and datetimes from the
    epoch; None where a value is neither (the caller names the line)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column.to_numpy().astype(np.float64)
        return None if not np.isfinite(values).all() else np.floor(values).astype(np.int64)
    if pa.types.is_date(kind):
        column = column.cast(pa.timestamp("s"))
        kind = column.type
    if pa.types.is_timestamp(kind):  # whole seconds, rounded down (2020-01-01T10:00:00.250 is 10:00:00)
        per_second = {"s": 1, "ms": 10 ** 3, "us": 10 ** 6, "ns": 10 ** 9}[kind.unit]
        return np.floor_divide(pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False), per_second)
    import pandas as pd
    parsed = pd.to_datetime(pd.Series(column.to_numpy(zero_copy_only=False)), errors="coerce", format="mixed", utc=True)
    if parsed.isna().any():
        return None
    per_second = {"s": 1, "ms": 10 ** 3, "us": 10 ** 6, "ns": 10 ** 9}[parsed.dt.unit]
    return np.floor_divide(parsed.astype("int64").to_numpy(), per_second)


def read_interactions(path, columns="", layout=None, integer_ids=False, skip_bad_lines=False, weights=None):
    """Interactions of a file (the format sniffed, unless layout is given; columns: the
    --columns text). integer_ids: ids must be integers (MovieLens). A line that cannot be read
    (a wrong number of fields, an empty id, a rating or time that is not one) stops the read
    with its number, unless skip_bad_lines: then such lines are dropped, counted, and the first
    few named (as pandas' on_bad_lines="skip", said in the run's first lines). weights (a
    Weights): each row's weight from one more column (rows weighing 0 dropped, counted)."""
    path = Path(path)
    layout = layout or sniff(path)
    if layout.kind == "per_user":
        if columns or weights:
            raise DataError(f"{path}: one line per user (the user, then the items) has no columns to name or to "
                            "weigh rows by: leave --columns, --event_weights and --weight_column out")
        return _read_per_user(path, layout)
    named_columns(path, layout)
    roles = resolve_columns(path, layout, parse_columns(columns))
    if weights is not None:
        if layout.header is None or (weights.column not in layout.header and not weights.column.isdigit()):
            raise DataError(f"{path} has no column {weights.column!r} to weigh rows by ({weights.text}); its columns are "
                            + (", ".join(layout.header) if layout.header else "unnamed (no header line)"))
        roles["weight"] = layout.header.index(weights.column) if weights.column in layout.header else int(weights.column)
    if layout.header is None and "rating" in roles and "timestamp" not in roles:
        _maybe_times(path, layout, roles)
    import pyarrow as pa
    import pyarrow.compute as pc
    types = {"user": pa.string(), "item": pa.string(), "rating": pa.float64(), "weight": pa.string()}
    if integer_ids:
        types.update(user=pa.int64(), item=pa.int64(), timestamp=pa.int64())
    try:
        try:
            table = read_table(path, layout, roles, types if layout.kind == "rows" else {})
        except pa.ArrowInvalid as error:
            if layout.kind != "rows" or layout.encoding != "utf-8" or "UTF8" not in str(error):
                raise
            # Bytes that are not UTF-8 past the sampled head: the whole file is read as Latin-1.
            layout.encoding, layout.what = "latin-1", "Latin-1 " + layout.what
            table = read_table(path, layout, roles, types)
    except DataError:
        raise
    except (pa.ArrowException, UnicodeDecodeError) as error:
        if skip_bad_lines and layout.kind == "rows":
            return _read_skipping_bad_lines(path, layout, roles, integer_ids, weights)
        raise _first_bad_line(path, layout, roles, integer_ids, error) from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows" + (" after the header" if layout.header else ""))
    row_weights, dropped = None, []
    if weights is not None:
        table, row_weights, dropped, _ = _weighed(table, weights, path)
    bad = any(role in roles and (table[role].null_count or (pa.types.is_string(table[role].type) and pc.any(
        pc.equal(pc.utf8_trim_whitespace(table[role]), "")).as_py())) for role in ("user", "item", "rating"))
    ratings = times = None
    if "rating" in roles and not bad:
        ratings = table["rating"].to_numpy().astype(np.float32) if pa.types.is_floating(table["rating"].type) \
            or pa.types.is_integer(table["rating"].type) else None
        bad = ratings is None or not np.isfinite(ratings).all()
    if "timestamp" in roles and not bad:
        times = seconds(table["timestamp"], path)
        bad = times is None
    if bad:
        if skip_bad_lines and layout.kind == "rows":
            return _read_skipping_bad_lines(path, layout, roles, integer_ids, weights)
        raise _first_bad_line(path, layout, roles, integer_ids, None)
    users, user_ids = encode_ids(table["user"])
    items, item_ids = encode_ids(table["item"])
    return Interactions(users, items, user_ids, item_ids, ratings, times, [_described(path, layout, roles)] + dropped,
                        row_weights)


def _weighed(table, weights, path):
    """(the table without the rows that weigh 0, their weights (N,) float32, the described
    line of what was dropped, as a list, and the kept rows' mask)."""
    import pyarrow as pa

    row_weights = weigh(table, weights, path)
    kept = row_weights > 0
    said = [f"{weights.text}: {int((~kept).sum()):,} of {len(kept):,} rows weigh 0 (or name an event not listed) "
            "and are dropped"] if not kept.all() else []
    if not kept.any():
        raise DataError(f"{path}: {weights.text} leaves no row (every row weighs 0)")
    return table.filter(pa.array(kept)).drop_columns(["weight"]), row_weights[kept].astype(np.float32), said, kept


def _described(path, layout, roles):
    return f"{path}: {layout.what}; " + ", ".join(f"{role} = {_column_name(layout, i)}" for role, i in roles.items())


NUMBER = r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$"


def _read_skipping_bad_lines(path, layout, roles, integer_ids, weights=None):
    """read_interactions with skip_bad_lines, for a rows file that has bad lines: every column
    read as text (lines with another number of fields dropped by pyarrow's invalid_row_handler),
    then the rows whose ids are empty or whose rating or time is not one dropped; the count and
    the first lines by number (_bad_lines) go into the described lines."""
    import pyarrow as pa
    import pyarrow.compute as pc

    misfits = []
    table = read_table(path, layout, roles, dict.fromkeys(roles, pa.string()), misfits.append)
    columns = {role: pc.utf8_trim_whitespace(table[role]) for role in roles}
    keep = pc.and_(pc.not_equal(columns["user"], ""), pc.not_equal(columns["item"], ""))
    if integer_ids:
        for role in ("user", "item"):
            keep = pc.and_(keep, pc.match_substring_regex(columns[role], r"^-?\d+$"))
    if "rating" in roles:
        if layout.decimal == ",":
            columns["rating"] = pc.replace_substring(columns["rating"], ",", ".")
        keep = pc.and_(keep, pc.match_substring_regex(columns["rating"], NUMBER))
    table = pa.table(columns).filter(keep)
    times = None
    if "timestamp" in roles:
        stamps = table["timestamp"]
        numeric = pc.match_substring_regex(stamps, NUMBER)
        if integer_ids or pc.sum(numeric).as_py() * 2 > len(stamps):  # numbers, the odd word a bad line
            table, stamps = table.filter(numeric), stamps.filter(numeric)
            times = np.floor(stamps.cast(pa.float64()).to_numpy()).astype(np.int64)
        else:
            import pandas as pd
            parsed = pd.to_datetime(pd.Series(stamps.to_numpy(zero_copy_only=False)), errors="coerce",
                                    format="mixed", utc=True)
            valid = parsed.notna().to_numpy()
            table = table.filter(pa.array(valid))
            times = np.floor_divide(parsed[valid].astype("int64").to_numpy(),
                                    {"s": 1, "ms": 10 ** 3, "us": 10 ** 6, "ns": 10 ** 9}[parsed.dt.unit])
    dropped = len(misfits) + len(keep) - table.num_rows  # the bad lines
    row_weights, weighed = None, []
    if weights is not None:
        table, row_weights, weighed, kept = _weighed(table, weights, path)
        times = times[kept] if times is not None else None
    if table.num_rows == 0:
        raise DataError(f"{path}: no line could be read ({dropped:,} dropped by --skip_bad_lines); "
                        + str(_first_bad_line(path, layout, roles, integer_ids, None)))
    ratings = table["rating"].cast(pa.float64()).to_numpy().astype(np.float32) if "rating" in roles else None
    if ratings is not None and not np.isfinite(ratings).all():
        finite = np.isfinite(ratings)
        table, ratings, dropped = table.filter(pa.array(finite)), ratings[finite], dropped + int((~finite).sum())
        times = times[finite] if times is not None else None
        row_weights = row_weights[finite] if row_weights is not None else None
    users, user_ids = encode_ids(table["user"].cast(pa.int64()) if integer_ids else table["user"])
    items, item_ids = encode_ids(table["item"].cast(pa.int64()) if integer_ids else table["item"])
    lines = _bad_lines(path, layout, roles, integer_ids, limit=5)
    described = [_described(path, layout, roles),
                 f"{dropped:,} line(s) that could not be read were dropped (--skip_bad_lines): "
                 + "; ".join(f"line {number}: {problem}" for number, problem in lines)
                 + ("; ..." if dropped > len(lines) else "")] + weighed
    return Interactions(users, items, user_ids, item_ids, ratings, times, described, row_weights)


def named_columns(path, layout):
    """The field names of a Parquet file (its schema) or a JSON-lines file (read whole, kept on
    the layout) as layout.header; rows and per-user files are left as they are."""
    import pyarrow as pa
    try:
        if layout.kind == "parquet":
            import pyarrow.parquet as pq
            layout.header = pq.read_schema(path).names
        elif layout.kind == "json":
            import pyarrow.json as pj
            with open_stream(path, layout.compression) as stream:
                layout.table = pj.read_json(stream)
            layout.header = layout.table.column_names
        else:
            return
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: not a readable {layout.what} file ({str(error).splitlines()[0][:200]})") from None
    layout.n_fields = len(layout.header)


def _column_name(layout, index):
    return repr(layout.header[index]) if layout.header else f"column {index}"


def _maybe_times(path, layout, roles):
    """A headerless third column of integers past 10^8 (Unix seconds) or of dates holds times,
    not ratings."""
    text = read_bytes(path, layout.compression, SAMPLE_BYTES).decode(layout.encoding, errors="replace")
    lines = text.splitlines()
    rows = [_split(line, layout.sep) for line in (lines[:-1] if len(lines) > 1 else lines) if line.strip()]
    values = [row[roles["rating"]] for row in rows if len(row) > roles["rating"]]
    if values and (all(re.fullmatch(r"\d{9,}", v.strip()) for v in values) or all(_is_time(v) for v in values)):
        roles["timestamp"] = roles.pop("rating")


def _read_per_user(path, layout):
    data = read_bytes(path, layout.compression)
    if layout.encoding == "utf-8" and text_encoding(data) != "utf-8":  # past the sampled head
        layout.encoding, layout.what = "latin-1", "Latin-1 " + layout.what
    text = data.decode(layout.encoding).lstrip("\ufeff")
    import pyarrow as pa
    users, items, order = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = _split(line, layout.sep) if line.strip() else []
        if not fields:
            continue
        if len(fields) < 2 or any(not f.strip() for f in fields):
            raise DataError(f"{path}, line {number}: a user's line holds the user and at least one item, "
                            f"none empty: {line.strip()[:80]!r}")
        users.extend([fields[0]] * (len(fields) - 1))
        items.extend(fields[1:])
        order.extend(range(len(fields) - 1))
    if not items:
        raise DataError(f"{path}: the file is empty")
    user_codes, user_ids = encode_ids(pa.chunked_array([pa.array(users, pa.string())]))
    item_codes, item_ids = encode_ids(pa.chunked_array([pa.array(items, pa.string())]))
    return Interactions(user_codes, item_codes, user_ids, item_ids, None, np.asarray(order, dtype=np.int64),
                        [f"{path}: {layout.what}"])


def _first_bad_line(path, layout, roles, integer_ids, error):
    """The DataError naming the first line that does not read: a wrong number of fields, an
    empty id, a rating or timestamp that is not a number (or, for timestamps, a date)."""
    if layout.kind != "rows":
        return DataError(f"{path}: a user or item id is missing, or a rating or timestamp is not a number "
                         f"({error or 'found after reading'})")
    for number, problem, line in _bad_lines(path, layout, roles, integer_ids, limit=1, with_text=True):
        return DataError(f"{path}, line {number}: {problem}: {line.strip()[:80]!r}"
                         " (--skip_bad_lines drops such lines, counted)")
    return DataError(f"{path}: could not be read ({error})")


def _bad_lines(path, layout, roles, integer_ids, limit, with_text=False):
    """The first `limit` lines that do not read, as (line number, problem[, the line]): read
    line by line in Python, so only as far as the last of them."""
    found = []
    sep_name = "spaces" if layout.sep is None else repr(layout.sep)
    with open_stream(path, layout.compression) as stream:
        lines = io.TextIOWrapper(stream, encoding=layout.encoding, errors="replace")
        seen_header = not layout.header
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not seen_header:
                seen_header = True
                continue
            problem = _field_problem(_split(line.rstrip("\r\n"), layout.sep), layout, roles, integer_ids, sep_name)
            if problem:
                found.append((number, problem, line) if with_text else (number, problem))
                if len(found) == limit:
                    break
    return found


def _field_problem(fields, layout, roles, integer_ids, sep_name):
    if len(fields) != layout.n_fields:
        what = " (user, item, rating, timestamp)" if integer_ids else ""
        return f"expected {layout.n_fields} fields{what} separated by {sep_name}, found {len(fields)}"
    for role in ("user", "item"):
        value = fields[roles[role]].strip()
        if not value:
            return f"the {role} id is empty"
        if integer_ids and not re.fullmatch(r"-?\d+", value):
            return "user and item ids must be integers"
    if "rating" in roles and not _is_number(fields[roles["rating"]].strip(), layout.decimal):
        return "the rating is not a finite number"
    if "timestamp" in roles:
        value = fields[roles["timestamp"]].strip()
        if integer_ids and not re.fullmatch(r"-?\d+", value):
            return "the timestamp must be an integer"
        if not _is_number(value):
            import pandas as pd
            if pd.isna(pd.to_datetime(value, errors="coerce", format="mixed")):
                return "the timestamp is neither a number nor a date"
    return None


# ----------------------------------------------------------------------------- item names

def read_item_names(path):
    """An items file (any of the formats above, a RecBole .item file included): {"item": ids
    (int64 or str, as encode_ids keeps them), "title": str, "genres": lists of names, "year": int
    or None}, in file order. The id column by the item spellings (else the first column), the
    title by ITEM_NAME_SPELLINGS (else the second column); genres and year where a column has
    them (genres split on '|', or on spaces in a RecBole token_seq)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--items={path}: no such file")
    layout = sniff(path)
    if layout.kind == "per_user":
        raise DataError(f"{path}: an items file has a row per item (its id, then its title...), not a list per line")
    named_columns(path, layout)
    header = layout.header or []
    roles = {}
    for i, name in enumerate(header):
        role = "item" if role_of(name) == "item" else role_of(name, ITEM_NAME_SPELLINGS)
        if role and role not in roles:
            roles[role] = i
    roles.setdefault("item", 0)
    if "title" not in roles and layout.n_fields > 1:
        roles["title"] = next(i for i in range(layout.n_fields) if i != roles["item"])
    import pyarrow as pa
    try:
        table = read_table(path, layout, roles, {} if layout.kind != "rows" else
                           {role: pa.string() for role in roles})
    except (pa.ArrowException, UnicodeDecodeError) as error:
        raise DataError(f"{path}: could not be read as an items file ({str(error).splitlines()[0][:200]})") from None
    codes, ids = encode_ids(table["item"])
    n = table.num_rows
    titles = [str(t) for t in table["title"].to_pylist()] if "title" in roles else [str(i) for i in ids[codes]]
    seq = "recbole" in layout.what.lower()
    genres = [[g.strip() for g in (str(v).split() if seq else re.split(r"[|,]", str(v)))
               if g.strip() and g.strip() != "(no genres listed)"] if v is not None else []
              for v in table["genres"].to_pylist()] if "genres" in roles else [[] for _ in range(n)]
    years = []
    for value in (table["year"].to_pylist() if "year" in roles else [None] * n):
        found = re.search(r"\d{4}", str(value)) if value is not None else None
        years.append(int(found.group(0)) if found else None)
    return {"item": ids[codes], "title": titles, "genres": genres, "year": years,
            "described": f"{path}: {layout.what}"}
