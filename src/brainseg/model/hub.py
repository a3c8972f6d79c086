"""Models on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION][/FILE]`` -> a local file.

:func:`local_model` is the one place a MODEL argument naming the Hub (or a Hub folder)
becomes a file, so every command takes the same references. ``hf_hub_download`` (the
``brainseg[hub]`` extra) and its cache give revision pinning, ``HF_HUB_OFFLINE=1``,
``HF_ENDPOINT`` and ``HF_TOKEN``. Without FILE the first of :data:`DEFAULT_FILES` is taken; the
downloaded file is sniffed like a local one, so a Git LFS pointer or an HTML page is refused
in one line. Only the standard library at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from brainseg import console
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.fsutil import write_error
from brainseg.model.modelfile import FILE_KINDS, sniff_model_file
from brainseg.optional import require
from brainseg.settings import MODEL_SUFFIXES

#: The scheme of a Hub reference.
SCHEME = "hf://"
#: The model file taken when a reference or a folder names none, in this order.
DEFAULT_FILES = ("model.safetensors", "model.onnx")
#: The small JSON file of a Hub folder (what export --hub-folder writes next to the model).
CONFIG_FILE = "config.json"
FORM = "hf://OWNER/NAME[@REVISION][/FILE]"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Revisions that contain a "/" (pull requests, conversions), as huggingface_hub reads them.
_SPECIAL_REF = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")

_resolved: dict[str, Path] = {}  # one download check per reference and process


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{rev}" + (f"/{self.filename}" if self.filename else "")


def is_hub_ref(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ``hf://`` reference (also as a ``Path``, which reads ``hf:/``)."""
    return os.fspath(path).startswith("hf:/")


def parse_ref(path: str | os.PathLike[str]) -> HubRef:
    """``hf://OWNER/NAME[@REVISION][/FILE]`` (``hf://models/...`` too) -> :class:`HubRef`."""
    body = os.fspath(path)[3:].lstrip("/")
    shown = SCHEME + body

    def bad(what: str) -> BrainsegError:
        return BrainsegError(
            f"{shown}: {what}; a Hub model is {FORM}",
            hint="e.g. hf://acme/brainseg-lgg, hf://acme/brainseg-lgg@v1.0/model.onnx",
        )

    if body.startswith(("datasets/", "spaces/", "buckets/", "kernels/")):
        raise bad("not a model repository")
    body = body.removeprefix("models/")
    owner, _, rest = body.partition("/")
    revision: str | None = None
    if "@" in rest.split("/")[0]:
        name, _, after = rest.partition("@")
        special = _SPECIAL_REF.match(after)
        if special:
            revision, rest = special.group(0), after[special.end() :].lstrip("/")
        else:
            revision, _, rest = after.partition("/")
        if not revision:
            raise bad("empty revision after @")
    else:
        name, _, rest = rest.partition("/")
    if not owner or not name:
        raise bad("no OWNER/NAME")
    for part in (owner, name):
        if not _NAME.match(part) or ".." in part or part.endswith((".git", ".")):
            raise bad(f"{part!r} is not a repository name")
    filename = rest or None
    if filename is not None and (
        filename.startswith("/") or any(p in ("", ".", "..") for p in filename.split("/"))
    ):
        raise bad(f"{filename!r} is not a file name in a repository")
    return HubRef(f"{owner}/{name}", revision, filename)


def local_model(path: str | os.PathLike[str], suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> Path:
    """The local file of a MODEL argument (a Hub reference downloaded, a Hub folder's model
    file); any other path as it is."""
    if is_hub_ref(path):
        return download(parse_ref(path), suffixes)
    p = Path(path)
    if p.is_dir() and any((p / f).is_file() for f in (*DEFAULT_FILES, CONFIG_FILE)):
        return folder_model(p)
    return p


def folder_model(folder: Path) -> Path:
    """The model file of a Hub folder: ``config.json``'s ``model_file``, else the first of
    :data:`DEFAULT_FILES` that is there."""
    cfg = folder / CONFIG_FILE
    if cfg.is_file():
        try:
            name = json.loads(cfg.read_text(encoding="utf-8")).get("model_file")
        except (ValueError, OSError, AttributeError):
            name = None
        if isinstance(name, str) and name and "/" not in name and name not in (".", ".."):
            return folder / name
    for name in DEFAULT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BrainsegError(
        f"folder {folder} has no model file ({' or '.join(DEFAULT_FILES)})",
        hint="give the model file itself, or a folder written by brainseg export --hub-folder",
    )


def download(ref: HubRef, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> Path:
    """The local path of ``ref``'s file in huggingface_hub's cache (downloaded when needed)."""
    key = str(ref)
    if key in _resolved:
        return _resolved[key]
    if ref.filename is not None and Path(ref.filename).suffix.lower() not in suffixes:
        raise BrainsegError(
            f"{ref}: not a model file (suffix {Path(ref.filename).suffix or '(none)'!r}); "
            f"expected one of {', '.join(suffixes)}",
            hint=f"name the model file, e.g. hf://{ref.repo_id}/model.onnx",
        )

    require("huggingface_hub", f"a Hub model ({ref})")

    if not console.interactive():  # progress bars only on a terminal, as brainseg's own
        with contextlib.suppress(AttributeError, ImportError):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    if ref.filename is not None:
        path = _fetch(ref)
    else:
        path = _fetch_default(ref)
        ref = replace(ref, filename=path.name)
    check_downloaded(path, ref)
    commit = _commit_of(path)
    console.info(f"model {ref}" + (f" at commit {commit}" if commit else "") + f": {path}")
    _resolved[key] = path
    return path


def _commit_of(path: Path) -> str | None:
    """The commit of a file in huggingface_hub's cache (``.../snapshots/COMMIT/FILE``)."""
    parts = path.parts
    if "snapshots" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        return parts[i + 1] if i + 1 < len(parts) - 1 else None
    return None


def _fetch_default(ref: HubRef) -> Path:
    """The first of :data:`DEFAULT_FILES` the repository has at that revision."""
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    last: BrainsegError | None = None
    for name in DEFAULT_FILES:
        try:
            return _fetch(replace(ref, filename=name), raw=True)
        except LocalEntryNotFoundError as exc:  # offline / unreachable, not in the cache
            last = _error(replace(ref, filename=name), exc)
        except EntryNotFoundError:
            continue  # the repository has no such file: the next one
        except Exception as exc:
            raise _error(ref, exc) from exc
    if last is not None:
        raise last
    raise BrainsegError(
        f"{ref}: the repository has neither {' nor '.join(DEFAULT_FILES)}"
        + (f" at revision {ref.revision}" if ref.revision else ""),
        hint=f"name the model file: hf://{ref.repo_id}/FILE (a .safetensors or .onnx file)",
    )


def _fetch(ref: HubRef, raw: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    assert ref.filename is not None
    try:
        return Path(hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision))
    except Exception as exc:
        if raw:
            raise
        raise _error(ref, exc) from exc


def _error(ref: HubRef, exc: BaseException) -> BrainsegError:
    """huggingface_hub's exception -> one line naming the reference (exit 2 for a bad name, 1 for
    the network or the server)."""
    from huggingface_hub import constants
    from huggingface_hub import utils as hf

    endpoint = getattr(constants, "ENDPOINT", "the Hub")
    if isinstance(exc, hf.GatedRepoError):
        return BrainsegError(
            f"{ref}: repository {ref.repo_id} is gated on {endpoint}",
            hint="accept its conditions on the Hub, then log in (hf auth login) or set HF_TOKEN",
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return BrainsegError(
            f"{ref}: repository {ref.repo_id} not found on {endpoint}",
            hint="check OWNER/NAME; a private repository needs hf auth login or HF_TOKEN",
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return BrainsegError(
            f"{ref}: revision {ref.revision} not found in {ref.repo_id}",
            hint="give a branch, tag or commit hash the repository has (default: main)",
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):
        why = (
            "HF_HUB_OFFLINE is set"
            if getattr(constants, "HF_HUB_OFFLINE", False)
            else f"{endpoint} could not be reached ({first_line(exc.__cause__ or exc)})"
        )
        return BrainsegRuntimeError(
            f"{ref}: not in the local Hub cache and {why}",
            hint="download it once online (then HF_HUB_OFFLINE=1 works), or check the "
            "network / HF_ENDPOINT",
        )
    if isinstance(exc, hf.EntryNotFoundError):
        at = f" at revision {ref.revision}" if ref.revision else ""
        return BrainsegError(
            f"{ref}: file {ref.filename} not found in {ref.repo_id}{at}",
            hint=f"see the repository's files; without FILE brainseg takes "
            f"{' or '.join(DEFAULT_FILES)}",
        )
    if isinstance(exc, hf.HfHubHTTPError):
        return BrainsegRuntimeError(
            f"{ref}: the Hub answered {first_line(exc)}",
            hint="try again later, or check HF_ENDPOINT / HF_TOKEN",
        )
    if isinstance(exc, OSError):
        cache = getattr(constants, "HF_HUB_CACHE", "the Hub cache")
        return write_error(Path(cache), exc)
    return BrainsegRuntimeError(
        f"{ref}: download failed: {type(exc).__name__}: {first_line(exc)}",
        hint="run with --debug and report it",
    )


def check_downloaded(path: Path, ref: HubRef) -> None:
    """Refuse a downloaded file whose content is not a model of its kind (one line)."""
    try:
        kind = sniff_model_file(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise BrainsegRuntimeError(f"{ref}: cannot read the downloaded file {path}: {exc}") from exc
    expected = "onnx" if path.suffix.lower() == ".onnx" else "safetensors"
    if kind == expected:
        return
    if head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer, not the model (the repository stores it without LFS content)"
    else:
        what = f"{FILE_KINDS[kind]}, not {FILE_KINDS[expected]}"
    raise BrainsegError(
        f"{ref}: the downloaded file is {what}",
        hint="the repository's file is damaged or not a brainseg model; upload the files "
        "brainseg export --hub-folder writes",
    )
