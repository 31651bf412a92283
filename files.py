"""Files written whole or not at all: a kill, a crash or a full disk leaves the old file or the
new one, never half of one. Used by runs.py (a run's folder) and pictures.py (its SVGs), which
both import it from here: neither imports the other for it. (loader.py streams its parse cache
through a temporary file of its own: a cache of 25M rows is not held twice in memory.)"""

import os
from pathlib import Path

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
