"""Where dataset files are looked for, in order, and the download fallback.

Order: an explicit ``data_dir`` (files directly in it, or in ``data_dir/<name>/``), the user cache
(``$JEMLAB_DATA/<name>`` if the variable is set, else ``~/.cache/jemlab/<name>``), the system folder
``/usr/share/datasets/<name>`` (where Debian's ``dataset-*`` packages install), and finally a
download into the user cache. The first folder holding a complete set of files wins; files are never
mixed across folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from jemlab.data.download import DownloadError, RemoteFile, download_file
from jemlab.errors import DataError

T = TypeVar("T")

CACHE_ENV = "JEMLAB_DATA"
# Module attribute rather than a default argument so tests (and unusual installs) can repoint it.
SYSTEM_DATA_DIR = Path("/usr/share/datasets")


def cache_root() -> Path:
    """The user cache root: ``$JEMLAB_DATA`` if set and non-empty, else ``~/.cache/jemlab``.

    Returns:
        The root folder (it may not exist yet).
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jemlab"


def cache_dir(name: str) -> Path:
    """The user cache folder of one dataset, where downloads go.

    Args:
        name: canonical dataset name.

    Returns:
        ``cache_root() / name``.
    """
    return cache_root() / name


def candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders searched for a dataset's files, in priority order (before any download).

    Args:
        name: canonical dataset name.
        data_dir: an explicit folder from the user, or None.

    Returns:
        Folders to search, most specific first.
    """
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root, root / name]
    dirs += [cache_dir(name), Path(SYSTEM_DATA_DIR) / name]
    return dirs


def resolve(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    find: Callable[[Path], T | None],
    needs: str,
    remotes: Sequence[RemoteFile],
    download: bool,
    hint: str,
    after_download: Callable[[Path], None] | None = None,
    extra_dirs: Sequence[Path] = (),
) -> T:
    """Find a dataset's files, downloading them into the user cache as a last resort.

    Args:
        name: canonical dataset name.
        data_dir: explicit folder from the user, or None.
        find: returns what the loader needs if a folder holds a complete set of files, else None.
        needs: human-readable list of the files, for the error message.
        remotes: files to download (empty if the dataset cannot be downloaded).
        download: allow the download fallback.
        hint: how to get the files by hand, appended to the error message.
        after_download: called with the cache folder after a successful download (e.g. to unpack an
            archive).
        extra_dirs: further folders to search after the standard ones (e.g. inside an installed
            package).

    Returns:
        Whatever ``find`` returned for the first folder with a complete set.

    Raises:
        DataError: nothing found and no download possible; the message lists every folder looked at.
    """
    looked: list[str] = []
    for directory in [*candidate_dirs(name, data_dir), *extra_dirs]:
        found = find(directory) if directory.is_dir() else None
        if found is not None:
            return found
        looked.append(str(directory) if directory.is_dir() else f"{directory} (no such folder)")

    if not remotes:
        outcome = "it cannot be downloaded"
    elif not download:
        outcome = "downloading is disabled"
    else:
        target = cache_dir(name)
        try:
            for remote in remotes:
                if not (target / remote.filename).is_file():
                    download_file(remote, target)
        except DownloadError as exc:
            outcome = f"download into {target} failed ({exc})"
        else:
            if after_download is not None:
                after_download(target)
            found = find(target)
            if found is not None:
                return found
            outcome = f"downloaded into {target} but the files are still incomplete"
    raise DataError(
        f"{name}: dataset files not found (needs {needs}); looked in {', '.join(looked)}; {outcome}; fix: {hint}"
    )
