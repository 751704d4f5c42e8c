"""Checksummed downloads: fetch to a temporary file, verify, then atomically rename into place.

A file only ever appears under its final name after its digest matched, so an interrupted or
tampered download can never be mistaken for a good copy on the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from jemlab.errors import DataError

log = logging.getLogger(__name__)

_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file that can be downloaded, with the digests it must match.

    At least one of ``sha256`` / ``md5`` is set; every digest that is set must match. MD5 alone is
    kept only where no SHA-256 published for the file could be cross-checked.

    Attributes:
        filename: the name to store it under.
        urls: where to fetch it from, tried in order (mirrors).
        sha256: expected SHA-256 hex digest, or None.
        md5: expected MD5 hex digest, or None.
    """

    filename: str
    urls: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5):
            raise ValueError(f"RemoteFile {self.filename} needs a sha256 or md5 digest")


class DownloadError(DataError):
    """Every URL of a file failed for network reasons (not a checksum mismatch)."""


def fetch(url: str, dest: Path) -> None:
    """Copy the bytes at ``url`` into the file ``dest`` (tests replace this function).

    Args:
        url: http(s) URL.
        dest: file to write; it exists and is empty.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "jemlab"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """Compute the SHA-256 and MD5 of a file in one pass.

    Args:
        path: the file.

    Returns:
        ``{"sha256": hex, "md5": hex}``.
    """
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest()}


def checksum_problem(path: str | os.PathLike, remote: RemoteFile) -> str | None:
    """Compare a file with the digests of ``remote``.

    Args:
        path: the file to check.
        remote: the expected digests.

    Returns:
        None if every expected digest matches, else ``"expected <algo> X, got Y"``.
    """
    actual = file_digests(path)
    for algo in ("sha256", "md5"):
        expected = getattr(remote, algo)
        if expected and actual[algo] != expected.lower():
            return f"expected {algo} {expected}, got {actual[algo]}"
    return None


def download_file(remote: RemoteFile, directory: str | os.PathLike) -> Path:
    """Download ``remote`` into ``directory``, verifying its checksum before it gets its final name.

    Mirrors are tried in order; a network failure moves on to the next one. A checksum mismatch is
    an error on its own: it means a corrupted or tampered file, and nothing is left behind.

    Args:
        remote: what to fetch and the digests it must match.
        directory: destination folder, created if needed.

    Returns:
        Path of the verified file.

    Raises:
        DataError: checksum mismatch (naming the URL and both digests).
        DownloadError: every URL failed to download.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    dest = directory / remote.filename
    failures: list[str] = []
    for url in remote.urls:
        log.info("downloading %s to %s", url, dest)
        # The temporary file sits next to the destination so that os.replace is an atomic rename.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                fetch(url, tmp)
            except Exception as exc:  # urllib raises URLError, HTTPError, TimeoutError, OSError, ...
                reason = " ".join(str(exc).split()) or type(exc).__name__  # keep messages one line
                failures.append(f"{url}: {reason}")
                log.warning("download of %s failed: %s", url, reason)
                continue
            problem = checksum_problem(tmp, remote)
            if problem is not None:
                raise DataError(
                    f"{url}: checksum mismatch for {remote.filename}: {problem}; the download is "
                    f"corrupt or "
                    f"was tampered with and was deleted; retry later or fetch the file by hand and "
                    f"pass "
                    f"--data-dir"
                )
            os.replace(tmp, dest)
            return dest
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(f"download of {remote.filename} failed: {'; '.join(failures)}")
