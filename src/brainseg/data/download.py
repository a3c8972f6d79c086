"""Installer of the LGG dataset into ``DEST/kaggle_3m`` (and the download options and result
that the VGG16 weights, :mod:`brainseg.model.weights`, share).

Re-exports the main names of :mod:`brainseg.data.http` and :mod:`brainseg.data.extract`.
Only the standard library at module level, so the command module imports this cheaply.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from brainseg import console as con
from brainseg.data.cache import load_dataset
from brainseg.data.extract import safe_extract, safe_extract_zip
from brainseg.data.http import (
    DEFAULT_BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    KAGGLE_URL,
    KaggleCredentials,
    RetryPolicy,
    check_url,
    download_record,
    forget_download,
    http_fetch,
    is_kaggle_url,
    kaggle_credentials,
    normalize_sha256,
    sha256_file,
)
from brainseg.data.lgg import discover
from brainseg.data.synthetic import check_arguments, write_synthetic
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import folder_lock, make_temp_dir, remove_stale_temps

__all__ = [
    "KAGGLE_URL",
    "LAYOUT_NAME",
    "LGG_ARCHIVE_NAME",
    "DatasetSummary",
    "KaggleCredentials",
    "dataset_summary",
    "download_lgg",
    "find_layout_root",
    "http_fetch",
    "is_kaggle_url",
    "kaggle_credentials",
    "safe_extract",
    "safe_extract_zip",
]

LGG_ARCHIVE_NAME = "lgg-mri-segmentation.zip"
LAYOUT_NAME = "kaggle_3m"


def find_layout_root(folder: Path) -> Path | None:
    """The shallowest ``kaggle_3m`` folder holding patients, else any folder of TCGA_* folders."""

    def has_patients(p: Path) -> bool:
        return any(c.is_dir() and c.name.startswith("TCGA_") for c in p.iterdir())

    dirs = sorted(
        (p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()),
        key=lambda p: (len(p.parts), str(p)),
    )
    named = [p for p in dirs if p.name == LAYOUT_NAME and has_patients(p)]
    return named[0] if named else next((p for p in [folder, *dirs] if has_patients(p)), None)


def _archive_name(url: str) -> str:
    base = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if base.endswith((".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        return base
    return LGG_ARCHIVE_NAME


AUTH_HINT = (
    "set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ "
    "($KAGGLE_CONFIG_DIR): kaggle.com > Settings > API > Create New Token; "
    "or download the zip in a browser and pass --from-file ZIP"
)


def download_lgg(
    dest: str | os.PathLike[str],
    url: str | None = None,
    from_file: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    *,
    force: bool = False,
    keep_archive: bool = False,
    kaggle_auth: bool | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch (or take ``from_file``) the LGG archive and install ``dest/kaggle_3m``; return it.
    Only archives brainseg downloaded (their record matches) are ever reused or deleted."""
    dest = Path(dest)
    expected = normalize_sha256(sha256)
    if url and from_file:
        raise BrainsegError(
            "--url and --from-file cannot be used together",
            hint="--from-file installs an archive you already have, offline",
        )
    if url is not None:
        check_url(url)
    if from_file is not None:  # the input first: a missing zip is the error to report
        archive = _checked_archive(Path(from_file), expected)
    target = _checked_target(dest, force)
    downloaded = from_file is None
    if downloaded:
        policy = RetryPolicy(retries, backoff, timeout, sleep)
        archive = _fetch_archive(dest, url, expected, kaggle_auth, policy)
    _install_archive(archive, dest, target, downloaded, force)
    if downloaded and not keep_archive:
        forget_download(archive)  # brainseg's own download (checked by _fetch_archive)
    return target


def _checked_target(dest: Path, force: bool) -> Path:
    """``dest/kaggle_3m``, refusing a ``dest`` that is a file or an install without force."""
    if dest.exists() and not dest.is_dir():
        raise BrainsegError(
            f"--dest {dest} is a file, not a folder",
            hint="give the folder that should hold kaggle_3m/",
        )
    target = dest / LAYOUT_NAME
    if (target.exists() or target.is_symlink()) and not force:
        raise BrainsegError(
            f"{target} already exists",
            hint="pass --force to replace it (the old folder is removed only "
            "once the new one is complete)",
        )
    return target


def _checked_archive(archive: Path, expected: str | None) -> Path:
    """A ``--from-file`` archive that exists (and matches ``expected`` when given)."""
    if not archive.is_file():
        raise BrainsegError(
            f"--from-file {archive} does not exist or is not a file",
            hint="give the lgg-mri-segmentation .zip you downloaded",
        )
    if expected:
        actual = sha256_file(archive)
        if not actual.startswith(expected):
            raise BrainsegError(
                f"checksum mismatch for {archive}: sha256 is {actual}, expected {expected}",
                hint="check the --sha256 value or download the file again",
            )
    return archive


def _kaggle_headers(to_kaggle: bool, kaggle_auth: bool | None) -> dict[str, str]:
    """The Authorization header for Kaggle (or a mirror with kaggle_auth), when we have one."""
    if not (kaggle_auth if kaggle_auth is not None else to_kaggle):
        return {}
    creds = kaggle_credentials()
    if creds:
        con.info(f"using Kaggle credentials of {creds.username} ({creds.source})")
        return {"Authorization": creds.header()}
    if kaggle_auth:
        raise BrainsegError(
            "--kaggle-auth was given but no Kaggle credentials were found", hint=AUTH_HINT
        )
    con.info("no Kaggle credentials found; trying an anonymous download")
    return {}


def _fetch_archive(
    dest: Path, url: str | None, expected: str | None, kaggle_auth: bool | None, policy: RetryPolicy
) -> Path:
    """Download the archive into ``dest``, or reuse brainseg's finished download of it."""
    src = url or KAGGLE_URL
    archive = dest / _archive_name(src)
    if archive.exists() or archive.is_symlink():
        info = download_record(archive)
        if info is None:  # a user's file (or one changed since): never used, never deleted
            raise BrainsegError(
                f"{archive} already exists and was not downloaded by brainseg; it is left alone",
                hint=f"to install that archive pass --from-file {archive}; otherwise move it "
                "away or choose another --dest",
            )
        if expected and not str(info.get("sha256", "")).startswith(expected):
            con.info(f"{archive} (downloaded before) does not match --sha256; downloading again")
        elif info.get("url") != src:
            con.info(f"{archive} was downloaded from {info.get('url')}; downloading {src}")
        else:
            con.info(f"using {archive}, downloaded before from {src}")
            return archive
        forget_download(archive)
    to_kaggle = url is None or is_kaggle_url(src)
    headers = _kaggle_headers(to_kaggle, kaggle_auth)
    con.info(f"downloading {src} to {dest}")
    return http_fetch(
        src,
        archive,
        headers,
        expected,
        retries=policy.retries,
        backoff=policy.backoff,
        timeout=policy.timeout,
        sleep=policy.sleep,
        from_file_hint="--from-file ZIP",
        auth_hint=AUTH_HINT if to_kaggle or headers else None,
        record=True,
    )


def _install_archive(
    archive: Path, dest: Path, target: Path, downloaded: bool, force: bool = False
) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)  # what a killed unpack left here
        # the umask applies: this folder may become kaggle_3m itself (patients at the top)
        tmp = make_temp_dir(dest, f"{LAYOUT_NAME}-unpack")
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot create a folder in {dest}: {exc.strerror or exc}",
            hint="check --dest is writable",
        ) from exc
    try:
        try:
            safe_extract(archive, tmp)
            root = find_layout_root(tmp)
            if root is None:
                raise BrainsegError(
                    f"{archive} holds no {LAYOUT_NAME} folder (nor folders of TCGA_* patients)",
                    hint="is this the LGG archive (mateuszbuda/lgg-mri-segmentation)?",
                )
            con.info(f"checking {root.relative_to(tmp)}")
            _discover_in_archive(root, tmp, archive)
        except BrainsegError as exc:
            if downloaded and archive.exists() and exc.exit_code == 2:
                forget_download(archive)  # a bad download must not be reused by the next run
                note = f"the downloaded {archive.name} was deleted"
                if "\n" in exc.message:  # a problem list: the note must not break its form
                    con.warn(note)
                    raise
                raise BrainsegError(
                    f"{exc.message}; {note}", exc.hint, exit_code=exc.exit_code
                ) from exc
            raise
        _swap_into_place(root, target, dest, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discover_in_archive(root: Path, tmp: Path, archive: Path) -> None:
    """``discover`` on the unpacked tree, naming the archive, not the temporary folder."""
    try:
        discover(root)
    except BrainsegError as exc:
        rel = root.relative_to(tmp).as_posix()
        name = f"{archive} ({rel})" if rel != "." else str(archive)
        raise BrainsegError(
            exc.message.replace(str(root), name).replace(str(tmp), str(archive)),
            exc.hint,
            exit_code=exc.exit_code,
        ) from exc


def _swap_into_place(new: Path, target: Path, dest: Path, force: bool = False) -> None:
    """Rename ``new`` onto ``target``; an old ``target`` is removed only after the rename."""
    if not force and (target.exists() or target.is_symlink()):
        raise BrainsegRuntimeError(
            f"{target} was created by another run while this one was unpacking; it was left "
            "as it is and nothing of this run was kept",
            hint="pass --force to replace it, or choose another --dest",
        )
    old: Path | None = None
    try:
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{LAYOUT_NAME}-old-", dir=dest)) / "old"
            os.replace(target, old)
        try:
            os.replace(new, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
    except OSError as exc:
        raise BrainsegRuntimeError(
            f"cannot move the dataset into {target}: {exc.strerror or exc}"
        ) from exc
    if old is not None:  # rmtree unlinks an old kaggle_3m that was a link, never follows it
        shutil.rmtree(old.parent, ignore_errors=True)
    con.info(f"installed {target}")


@dataclass(frozen=True)
class DatasetSummary:
    """What the summary table shows after a download."""

    path: Path
    patients: int
    slices: int
    tumor_slices: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def dataset_summary(root: str | os.PathLike[str]) -> DatasetSummary:
    """Patients, slices and slices with tumor, via the dataset cache (built once, reused)."""
    s: dict[str, Any] = load_dataset(Path(root)).summary()
    return DatasetSummary(Path(root), int(s["patients"]), int(s["slices"]), int(s["tumor_slices"]))


@dataclass(frozen=True)
class DownloadOptions:
    """What ``brainseg download lgg | vgg16 | synthetic`` does (the command's options)."""

    what: str  # "lgg", "vgg16" or "synthetic"
    dest: Path | None = None  # lgg / synthetic: the folder that receives kaggle_3m/
    url: str | None = None
    from_file: Path | None = None
    sha256: str | None = None
    force: bool = False
    keep_archive: bool = False
    kaggle_auth: bool | None = None
    bn: bool = False  # vgg16: the batch-norm variant
    patients: int = 10  # synthetic
    seed: int = 0
    size: int = 256
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class DownloadResult:
    """What was installed: the path, and for a dataset its summary (patients, slices)."""

    path: Path
    summary: DatasetSummary | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        base = self.summary.as_dict() if self.summary else {"path": str(self.path)}
        return {**base, **self.extra}


@contextlib.contextmanager
def install_lock(dest: Path) -> Iterator[None]:
    """Hold ``DEST/.kaggle_3m.lock``: a second run must not replace a folder the first uses."""
    created = not (dest.exists() or dest.is_symlink())
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # a file, or no permission: the install says so in its own words
        return
    try:
        with folder_lock(dest, LAYOUT_NAME, "brainseg download"):
            yield
    finally:
        if created:  # a run that failed before writing anything leaves no empty --dest
            with contextlib.suppress(OSError):
                dest.rmdir()


def run_download(opts: DownloadOptions) -> DownloadResult:
    """The ``brainseg download lgg | synthetic`` job (``vgg16``: :mod:`brainseg.model.weights`)."""
    dest = Path(opts.dest or ("data/synthetic" if opts.what == "synthetic" else "data"))
    if opts.what not in ("lgg", "synthetic"):
        raise BrainsegError(f"unknown download {opts.what!r}", hint="lgg or synthetic")
    # bad options are refused before install_lock creates DEST (and its parents)
    if opts.what == "synthetic":
        check_arguments(opts.patients, opts.size, seed=opts.seed)
    elif opts.url is not None:
        check_url(opts.url)
    with install_lock(dest):
        if opts.what == "synthetic":
            root = write_synthetic(dest, opts.patients, opts.seed, opts.size, force=opts.force)
            con.info(f"wrote {opts.patients} phantom patients to {root}")
            extra: dict[str, Any] = {"seed": opts.seed, "size": opts.size}
        else:
            root = download_lgg(
                dest,
                url=opts.url,
                from_file=opts.from_file,
                sha256=opts.sha256,
                force=opts.force,
                keep_archive=opts.keep_archive,
                kaggle_auth=opts.kaggle_auth,
                retries=opts.retries,
                backoff=opts.backoff,
                timeout=opts.timeout,
            )
            extra = {}
        con.info(
            f"indexing {root} (the dataset cache is built once and reused by split, train and cv)"
        )
        return DownloadResult(root, dataset_summary(root), extra)
