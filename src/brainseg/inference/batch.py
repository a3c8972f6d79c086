"""``brainseg predict`` on image files: inputs -> masks on disk + a summary.

Inputs (files, folders, globs, ``-`` for stdin) are walked lazily and go through the one case
pipeline as one-slice cases, so memory stays constant however many files there are; each
mask is eval's rule (:func:`brainseg.inference.postprocess.mask_from_output`), so
``_mask.tif`` is exactly ``_prob.tif`` thresholded at any image size.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from itertools import chain, islice
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from brainseg import console
from brainseg.data import imageio
from brainseg.data.imageio import is_mask_name
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import file_kind, one_line, remove_stale_temps
from brainseg.inference import postprocess
from brainseg.inference.pipeline import PredictOptions, Prepared, RunOutcome, run_cases
from brainseg.inference.predict import Predictor
from brainseg.inference.runtimes import check_choice, describe
from brainseg.settings import PostSettings

_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputFile:
    """One input image: where to read it and its path relative to the output folder."""

    path: Path
    rel: PurePosixPath
    error: str = ""  # a stdin line that names no file (NUL, too long): that line's error row


#: Files a dataset keeps beside its images (kaggle_3m's README.md and data.csv) and
#: predict's own summaries: left out of a folder walk without a warning.
SIDE_FILE = re.compile(
    r"^(readme(\.(md|txt|rst))?|licen[cs]e(\.(md|txt))?|data\.csv|thumbs\.db|desktop\.ini"
    r"|summary(-\d+-of-\d+)?\.(csv|jsonl))$",
    re.IGNORECASE,
)
#: Names predict writes (``<stem>_mask.tif/png``, ``_prob.tif``, ``_overlay.png``): inside the
#: output folder such files are earlier outputs, never inputs (even with --include-masks).
OUTPUT_NAME = re.compile(r"_(mask|prob|overlay)\.(tif|tiff|png)$", re.IGNORECASE)
#: Longest path line read from stdin (PATH_MAX); a longer line is an error row, not a path.
MAX_PATH_BYTES = 4096


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def walk_images(
    top: Path,
    stats: InputStats,
    *,
    max_depth: int | None = None,
    outputs: Sequence[Path] = (),
    count_other: bool = True,
) -> Iterator[Path]:
    """Image files below ``top`` in sorted order, lazily; linked folders are never entered
    twice (link loops), hidden entries (macOS ``._x.tif``) are skipped, and what is left out
    is counted in ``stats`` (see :func:`_file_kind`)."""
    outs = [os.path.realpath(d) for d in outputs]
    seen = {_dir_key(top)}  # None is never looked up: an unreadable folder is skipped
    stack: list[tuple[Path, int]] = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[Path] = []
        real = os.path.realpath(folder) if outs else ""
        in_out = any(real == o or real.startswith(o + os.sep) for o in outs)
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                continue
            if is_dir:
                if max_depth is not None and depth + 1 > max_depth:
                    continue
                k = _dir_key(Path(e.path))
                if k is None or k in seen:
                    continue
                seen.add(k)
                subdirs.append(Path(e.path))
            else:
                kind = _file_kind(e, in_out)
                if kind == "image":
                    yield Path(e.path)
                elif kind == "earlier":
                    stats.earlier_outputs += 1
                elif kind == "irregular":
                    stats.irregular.append(Path(e.path))
                elif kind == "other" and count_other:
                    stats.other_types.append(Path(e.path))
        stack.extend((d, depth + 1) for d in reversed(subdirs))


def _file_kind(entry: os.DirEntry[str], in_out: bool) -> str:
    """What a walk does with a file: "image" (an input), "earlier" (an output of predict
    inside -o), "irregular" (a FIFO, device or socket named like an image), "side" (a known
    dataset side file: no warning) or "other" (a type predict does not read)."""
    if not imageio.is_image_path(entry.name):
        return "side" if SIDE_FILE.match(entry.name) else "other"
    if in_out and OUTPUT_NAME.search(entry.name):
        return "earlier"
    try:
        mode = entry.stat().st_mode  # follows links
    except OSError:
        return "image"  # a dangling link: that file's error row ("no such file")
    return "image" if stat.S_ISREG(mode) else "irregular"  # FIFOs, devices, sockets


def _glob_base(pattern: str) -> tuple[Path, list[str]]:
    """Split a glob into its literal leading folder and the pattern components after it."""
    parts = PurePosixPath(pattern.replace(os.sep, "/")).parts
    for i, part in enumerate(parts):
        if _MAGIC.search(part):
            return Path(*parts[:i]), list(parts[i:])  # Path() is "."
    return Path(*parts[:-1]), list(parts[-1:])


def _match_parts(parts: Sequence[str], pats: Sequence[str]) -> bool:
    """Match path components against glob components (``**``: any number of folders)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    # no part is hidden: the walk skips hidden entries
    return bool(parts) and fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


def _explicit_rel(path: Path) -> PurePosixPath:
    """Output location of a file named explicitly: relative to the current folder when it
    is inside it, else its absolute path without the root (so it can never climb out)."""
    absolute = Path(os.path.abspath(path))
    try:
        rel = absolute.relative_to(Path.cwd())
    except ValueError:
        rel = absolute.relative_to(absolute.anchor)
    return PurePosixPath(*rel.parts)


@dataclass
class InputStats:
    """What a walk of the inputs left out (and the summary line reports)."""

    masks_skipped: int = 0
    other_types: list[Path] = field(default_factory=list)
    irregular: list[Path] = field(default_factory=list)
    earlier_outputs: int = 0


def read_stdin_lines(buf: Any = None) -> Iterator[str]:
    """The lines of stdin as file names, decoded as the OS decodes names; an overlong line
    is cut to :data:`MAX_PATH_BYTES` + 1 bytes, never held whole."""
    buf = buf if buf is not None else getattr(sys.stdin, "buffer", None)
    if buf is None:
        yield from sys.stdin
        return
    while True:
        raw = buf.readline(MAX_PATH_BYTES + 2)
        if not raw:
            return
        if len(raw.rstrip(b"\r\n")) > MAX_PATH_BYTES:
            while not raw.endswith(b"\n"):  # drop the rest of the line, in pieces
                rest = buf.readline(1 << 16)
                if not rest:
                    break
                raw = raw[: MAX_PATH_BYTES + 1] + rest[-1:]
            raw = raw[: MAX_PATH_BYTES + 1] + b"\n"
        yield os.fsdecode(raw)


def _stdin_lines(stream: Iterable[str] | None) -> Iterator[tuple[str, str]]:
    """(path, error) per non-empty stdin line: a bad line is an error row, the run goes on."""
    for n, line in enumerate(stream if stream is not None else read_stdin_lines(), 1):
        name = line.rstrip("\r\n")
        if not name.strip():
            continue
        if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            yield (
                one_line(name[:60]) + "...",
                f"line {n} of stdin is longer than {MAX_PATH_BYTES} bytes "
                f"(starts {one_line(name[:60])}...): not a file path",
            )
        elif "\0" in name:
            yield (
                one_line(name),
                f"line {n} of stdin ({one_line(name)}) holds a NUL byte, which no file name can",
            )
        else:
            yield name, ""


def iter_inputs(opts: PredictOptions, stats: InputStats | None = None) -> Iterator[InputFile]:
    """Every input image of ``opts.inputs``, lazily: arguments in the order given, folders
    and globs sorted, ``-`` a path per line of ``opts.stdin``; ground-truth masks are left
    out (and counted in ``stats``) unless ``opts.include_masks``."""
    stats = stats if stats is not None else InputStats()
    outputs = [opts.out_dir]

    def keep(path: Path) -> bool:
        if opts.include_masks or not is_mask_name(path):
            return True
        stats.masks_skipped += 1
        return False

    for item in opts.inputs:
        if item == "-":
            for name, error in _stdin_lines(opts.stdin):
                if error:
                    yield InputFile(Path(name), PurePosixPath("-"), error)
                elif keep(Path(name)):
                    yield InputFile(Path(name), _explicit_rel(Path(name)))
            continue
        p = Path(item)
        if _MAGIC.search(item) and not p.exists():
            base, pats = _glob_base(item)
            depth = None if "**" in pats else len(pats) - 1
            walk = walk_images(base, stats, max_depth=depth, outputs=outputs, count_other=False)
            for f in walk:
                rel_parts = f.relative_to(base).parts
                if _match_parts(rel_parts, pats) and keep(f):
                    yield InputFile(f, PurePosixPath(*rel_parts))
        elif p.is_dir():
            for f in walk_images(p, stats, outputs=outputs):
                if keep(f):
                    yield InputFile(f, PurePosixPath(*f.relative_to(p).parts))
        else:
            yield InputFile(p, _explicit_rel(p))


def check_inputs(items: Sequence[str], include_masks: bool = False) -> None:
    """Refuse inputs that name nothing or a ground-truth mask before any model loads."""
    if not items:
        raise BrainsegError(
            "no INPUT given", hint="pass image files, folders, globs or - (paths on stdin)"
        )
    if items.count("-") > 1:
        raise BrainsegError("'-' (paths on stdin) is given more than once")
    for item in items:
        if item == "-" or _MAGIC.search(item):
            continue
        if not Path(item).exists():
            raise BrainsegError(
                f"input {one_line(item)} does not exist",
                hint="pass existing image files, folders, quoted globs or -",
            )
        if not include_masks and Path(item).is_file() and is_mask_name(item):
            raise BrainsegError(
                f"input {one_line(item)} is a ground-truth mask (*_mask.*), not a scan",
                hint="pass the scan next to it, or --include-masks to predict masks on purpose",
            )


#: Mask formats of image files; the first is the default.
IMAGE_FORMATS = ("tif", "png")


@dataclass
class FileResult:
    """One row of the summary (and one --json line)."""

    path: str
    output: str = ""
    status: str = "ok"  # ok, skipped, error
    tumor_pixels: int | None = None
    tumor_fraction: float | None = None
    max_probability: float | None = None
    has_tumor: bool | None = None
    height: int | None = None
    width: int | None = None
    error: str = ""
    runtime: str = ""  # what ran the model, e.g. "openvino bf16" (brainseg.inference.runtimes)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # one printable UTF-8 line each: a name with a newline must not break the summary
        self.path, self.output, self.error = map(one_line, (self.path, self.output, self.error))

    def row(self) -> dict[str, Any]:
        """The summary columns as a dict (JSON-able)."""
        return {c: getattr(self, c) for c in SUMMARY_COLUMNS}


#: The summary's columns: every field but the notes (warned about, not kept).
SUMMARY_COLUMNS = tuple(f.name for f in fields(FileResult) if f.name != "notes")


@dataclass
class _Outputs:
    mask: Path
    prob: Path | None
    overlay: Path | None

    def all(self) -> list[Path]:
        return [p for p in (self.prob, self.overlay, self.mask) if p is not None]


def check_outputs(item: InputFile, opts: PredictOptions, root: Path) -> _Outputs:
    """OUT/<rel folder>/<stem>_mask.<fmt> (and _prob.tif, _overlay.png) of ``item``, refused
    (even with --force) when one would leave ``root`` (the resolved -o folder: ``rel`` has no
    ``..``, but a link may point out), be the input itself or the input's ground-truth mask."""
    folder, stem = opts.out_dir.joinpath(*item.rel.parent.parts), item.rel.stem
    outs = _Outputs(
        mask=folder / f"{stem}_mask.{opts.fmt}",  # set by ImageKind.check
        prob=folder / f"{stem}_prob.tif" if opts.probabilities else None,
        overlay=folder / f"{stem}_overlay.png" if opts.overlay else None,
    )
    src = item.path.resolve()
    src_name, out_name = one_line(str(item.path)), one_line(str(opts.out_dir))
    for p in outs.all():
        name = one_line(str(p))
        if not _inside(p.parent, root):
            raise BrainsegError(
                f"output {name} would be written outside {out_name} "
                "(a link inside the output folder points elsewhere)",
                hint="remove the link or choose another -o folder",
            )
        dst = p.resolve()
        if dst == src:
            raise BrainsegError(
                f"output {name} is the input file {src_name} itself",
                hint="choose an -o folder outside the data (e.g. -o masks/)",
            )
        if dst.parent == src.parent and dst.stem.lower() == f"{src.stem.lower()}_mask":
            raise BrainsegError(
                f"output {name} is the ground-truth mask name of input {src_name} "
                "(-o points into the data): predictions would overwrite or pass for ground truth",
                hint="choose an -o folder outside the data (e.g. -o masks/); --force never "
                "writes there",
            )
    return outs


def _check_regular(path: Path) -> None:
    """A named input must be a regular file (a FIFO would block the reader forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BrainsegError(f"{path}: no such file", hint="check the path") from None
    except (OSError, ValueError) as exc:
        raise BrainsegError(f"{path}: cannot be read ({exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BrainsegError(
            f"{path} is a {file_kind(st.st_mode)}, not a regular file: predict reads only "
            "regular files",
            hint="pass image files (.tif/.png/.jpg)",
        )


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (resolving any links in its existing part) lies below ``root``."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


@dataclass
class ImageFormat:
    """The pipeline's edges for image files: a one-slice case each, its mask made at the
    image's own size (:func:`brainseg.inference.postprocess.mask_from_output`)."""

    opts: PredictOptions
    size: tuple[int, int] | None
    post: PostSettings
    runtime: str = ""  # what runs the model, for the summary's rows

    def __post_init__(self) -> None:
        self.root = self.opts.out_dir.resolve()

    def read_cost(self, item: object) -> int:
        """Bytes reading ``item`` will hold: its decoded array and the H x W x 3 uint8 copy."""
        if not isinstance(item, InputFile):
            return 0
        d = imageio.declared_size(item.path)
        return 0 if d is None else d.nbytes + 3 * d.pixels

    def prepare(self, item: InputFile | FileResult) -> Prepared | FileResult:
        if isinstance(item, FileResult):
            return item
        try:
            _check_regular(item.path)
            outs = check_outputs(item, self.opts, self.root)
            existing = [p for p in outs.all() if p.exists()]
            if existing:
                if self.opts.skip_existing and len(existing) == len(outs.all()):
                    return self._skipped(item, outs)
                if not self.opts.force and not self.opts.skip_existing:
                    raise BrainsegError(
                        f"{existing[0]} already exists",
                        hint="pass --force to overwrite it or --skip-existing to keep it",
                    )
            # --skip-existing and an interrupted file: redo all of it
            overwrite = self.opts.force or bool(existing)
            loaded = imageio.load_image(item.path)
            image = loaded.array
            x, padded = imageio.to_model_input(image[None], self.size, pad=self.opts.pad)
            held = image.nbytes + x.nbytes
            return Prepared(item, outs, x, padded, image, held, overwrite, loaded.notes)
        except BrainsegError as exc:
            return FileResult(str(item.path), status="error", error=str(exc))
        except Exception as exc:  # never let one odd file stop the run
            return FileResult(
                str(item.path), status="error", error=f"{item.path}: {type(exc).__name__}: {exc}"
            )

    def _skipped(self, item: InputFile, outs: _Outputs) -> FileResult:
        res = FileResult(str(item.path), output=str(outs.mask), status="skipped")
        with contextlib.suppress(Exception):
            m = imageio.read_image(outs.mask)[..., 0] > 0
            res.tumor_pixels = int(m.sum())
            res.height, res.width = m.shape
            res.tumor_fraction = res.tumor_pixels / max(1, m.size)
            res.has_tumor = res.tumor_pixels > 0
        return res

    def finish(self, prep: Prepared, prob: np.ndarray) -> FileResult:
        image, outs, force = prep.data, prep.outputs, prep.overwrite
        h, w = image.shape[:2]
        try:
            prob, mask = postprocess.mask_from_output(
                prob[0], (h, w), self.post.threshold, self.post.min_size, padded=prep.padded
            )
            if outs.prob is not None:
                imageio.write_probability(outs.prob, prob, force=force)
            if outs.overlay is not None:
                channel = None if self.opts.overlay_rgb else 1  # the RGB image, or FLAIR
                imageio.write_overlay(outs.overlay, image, mask, channel=channel, force=force)
            imageio.write_mask(outs.mask, mask, force=force)  # last: its presence = done
        except BrainsegRuntimeError:
            raise  # disk full, unwritable folder: stop the run
        except BrainsegError as exc:
            return FileResult(str(prep.item.path), status="error", error=str(exc))
        pixels = int(np.count_nonzero(mask))
        return FileResult(
            str(prep.item.path),
            output=str(outs.mask),
            status="ok",
            tumor_pixels=pixels,
            tumor_fraction=pixels / float(h * w),
            max_probability=float(prob.max()),  # of what _prob.tif holds (float32)
            has_tumor=pixels > 0,
            height=h,
            width=w,
            runtime=self.runtime,
            notes=prep.notes,
        )


def dedup_inputs(
    files: Iterable[InputFile], opts: PredictOptions
) -> Iterator[InputFile | FileResult]:
    """The inputs as the engine takes them: a bad stdin line or a second writer of one output is
    an error row; stale temporaries are removed once per output folder (never outside -o)."""
    seen: set[str] = set()
    swept: set[PurePosixPath] = set()
    root = opts.out_dir.resolve()
    for f in files:
        if f.error:
            yield FileResult(str(f.path), status="error", error=f.error)
            continue
        if f.rel.parent not in swept:  # once per output folder, before it is written to
            swept.add(f.rel.parent)
            folder = opts.out_dir / f.rel.parent
            if _inside(folder, root):  # never outside -o (a planted link)
                remove_stale_temps(folder)
        key = str(f.rel.parent / f.rel.stem)
        if key in seen:
            yield FileResult(
                str(f.path),
                status="error",
                error=f"{f.path}: another input already writes "
                f"{opts.out_dir / key}_mask.{opts.fmt} in this run",
            )
            continue
        seen.add(key)
        yield f


@dataclass
class PredictResult(InputStats, RunOutcome):
    """What one run did, and what the walk of the inputs left out."""


@dataclass
class ImageKind:
    """Image files as :func:`~brainseg.inference.pipeline.run_cases` takes them."""

    noun = "file"
    columns = SUMMARY_COLUMNS
    key = "path"
    hold_failures = False
    stats: InputStats = field(default_factory=InputStats)  # what the walk left out

    def check(self, opts: PredictOptions) -> PredictOptions:
        fmt = check_choice("--format", opts.fmt or IMAGE_FORMATS[0], IMAGE_FORMATS)
        check_inputs(opts.inputs, opts.include_masks)
        return replace(opts, fmt=fmt)

    def cases(
        self, opts: PredictOptions, shard: tuple[int, int] | None
    ) -> tuple[Iterable[InputFile | FileResult], int | None]:
        files = iter_inputs(opts, self.stats)
        first = next(files, None)
        if first is None:
            masks = "" if opts.include_masks else ", skipping *_mask.* files"
            raise BrainsegError(
                f"no images found in {', '.join(opts.inputs)} (looked for "
                f".tif/.tiff/.png/.jpg/.jpeg{masks})",
                hint="check the paths, quote glob patterns, or pass --include-masks",
            )
        if not first.error:  # -o into the data: refuse up front
            check_outputs(first, opts, opts.out_dir.resolve())

        def chosen(stream: Iterable[InputFile]) -> Iterable[InputFile]:
            return stream if shard is None else islice(stream, shard[0], None, shard[1])

        total = None
        if "-" not in opts.inputs:  # a second, cheap walk (no image is read) for the total
            total = sum(1 for _ in chosen(iter_inputs(opts)))
        return dedup_inputs(chosen(chain([first], files)), opts), total

    def edges(self, opts: PredictOptions, predictor: Predictor) -> ImageFormat:
        post = opts.resolve(predictor.metadata).post
        size = predictor.image_size
        how = "padded to multiples of 32"
        if not opts.pad and size is not None:
            how = f"resized to {size[0]}x{size[1]}"
        console.info(
            f"model {opts.models[0]} ({describe(predictor)}"
            f"{f', ensemble of {len(predictor.paths)}' if len(opts.models) > 1 else ''}"
            f"{', TTA' if opts.tta else ''}): images {how}, threshold {post.threshold:g}, "
            f"min size {post.min_size} (at each image's own size)"
        )
        if post.largest:
            console.info(
                "the model's largest-component rule is per patient volume and is not "
                "applied to independent files"
            )
        return ImageFormat(opts, size, post, predictor.runtime)

    def failed(self, res: FileResult) -> None:
        console.warn(res.error)


def predict_inputs(opts: PredictOptions) -> PredictResult:
    """Predict every input image and write its outputs and the summary."""
    kind = ImageKind()
    done = run_cases(opts, kind)
    return PredictResult(**vars(done), **vars(kind.stats))
