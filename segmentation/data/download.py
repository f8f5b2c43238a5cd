"""Download, verify and unpack ADEChallengeData2016, then write its index files.

    python -m segmentation.data.download --root DIR [--url URL] [--sha256 HEX]

The archive is fetched to ``DIR/ADEChallengeData2016.zip.part`` and resumed with an HTTP Range
request when interrupted. A complete archive already at ``DIR/ADEChallengeData2016.zip``
(copied by hand on a machine without network) is used as is. After unpacking, the sample
counts are checked against the shipped official index (20210 training, 2000 validation).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .errors import DatasetError
from .make_odgt import make_odgt
from .odgt import official_odgt, read_odgt

log = logging.getLogger(__name__)

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ARCHIVE_NAME = "ADEChallengeData2016.zip"
DATASET_DIR = "ADEChallengeData2016"
# Not pinned: no checksum for this archive could be verified while building mishkit (no
# network). Pass --sha256 to enforce one; the computed digest is always printed.
ADE20K_SHA256: str | None = None
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The archive could not be fetched, verified or unpacked; the message says what to do."""


def fetch(url: str, dest: Path, *, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with a Range request if present."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # requested range past the end: the part is complete
            part.replace(dest)
            return dest
        raise DownloadError(f"{url}: server answered HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"no network: cannot reach {url} ({reason}).\n"
            f"Fetch {ARCHIVE_NAME} on a machine with network access, copy it to {dest} and run "
            "this command again: it will verify, unpack and index it."
        ) from None
    with response:
        if offset and response.status != 206:  # server ignored the range: start over
            offset = 0
        total = response.headers.get("Content-Length")
        total = int(total) + offset if total is not None else None
        mode = "ab" if offset else "wb"
        with (
            open(part, mode) as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name) as bar,
        ):
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise DownloadError(
            f"{url}: connection closed at {part.stat().st_size} of {total} bytes; "
            "run again to resume"
        )
    part.replace(dest)
    return dest


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str | None) -> str:
    """Compute the SHA-256 of ``path``; raise :class:`DownloadError` if it is not ``expected``."""
    actual = sha256sum(path)
    if expected is not None and actual != expected.lower():
        raise DownloadError(
            f"{path}: SHA-256 {actual} does not match the expected {expected}; "
            "delete the file and download again"
        )
    return actual


def unpack(archive: Path, root: Path) -> Path:
    """Extract ``archive`` into ``root``, refusing members that would land outside it."""
    root = root.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: member {member!r} escapes {root}")
            zf.extractall(root)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive}: not a valid zip archive ({err})") from None
    return root / DATASET_DIR


def check_counts(dataset: Path, written: dict[str, Path]) -> None:
    """Each split must hold as many samples as the shipped official index lists."""
    for split, path in written.items():
        got, want = len(read_odgt(path)), len(read_odgt(official_odgt(split)))
        if got != want:
            raise DownloadError(f"{dataset}: {split} has {got} samples, ADE20K has {want}")


def download_ade20k(
    root: str | Path, *, url: str = ADE20K_URL, sha256: str | None = ADE20K_SHA256
) -> dict[str, Path]:
    """Fetch (or reuse), verify, unpack and index ADE20K under ``root``; split -> odgt path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / ARCHIVE_NAME
    if not archive.exists():
        fetch(url, archive)
    digest = verify(archive, sha256)
    print(f"{archive}: SHA-256 {digest}" + (" (verified)" if sha256 else " (no pinned digest)"))
    dataset = root / DATASET_DIR
    if not (dataset / "images").is_dir():
        tmp = root / (DATASET_DIR + ".unpacking")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        unpack(archive, tmp).replace(dataset)  # atomic: a half-unpacked tree is never used
        shutil.rmtree(tmp)
    written = make_odgt(dataset)
    check_counts(dataset, written)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.data.download", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, required=True, help="folder to hold the dataset")
    parser.add_argument("--url", default=ADE20K_URL)
    parser.add_argument("--sha256", default=ADE20K_SHA256, help="expected archive digest")
    args = parser.parse_args(argv)
    try:
        written = download_ade20k(args.root, url=args.url, sha256=args.sha256)
    except (DownloadError, DatasetError) as err:
        parser.exit(1, f"error: {err}\n")
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
