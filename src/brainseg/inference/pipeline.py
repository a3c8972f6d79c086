"""The one case pipeline behind ``brainseg predict`` and eval's masks: read ahead, infer in
batches of slices, write behind.

A case is a stack of co-registered slices (S x H x W x 3 uint8): a 2D image is a one-slice
case (as nnU-Net reads 2D images), a volume its axial slices in LPS. What differs between
kinds (reading, post-processing, files written, the summary row) sits at the edges, in a
:class:`CaseFormat`; everything between (thread pools, the memory budget, batching, results
in input order, the writes kept on Ctrl-C) is :class:`Engine`, once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from brainseg import console
from brainseg.errors import BrainsegError
from brainseg.fsutil import (
    atomic_write_bytes,
    check_target,
    folder_lock,
    json_safe,
    make_temp_file,
    remove_stale_temps,
    write_error,
)
from brainseg.inference.predict import load_predictor
from brainseg.inference.runtimes import check_choice
from brainseg.inference.shards import parse_shard
from brainseg.settings import InferenceSettings

#: Bytes of decoded cases predict holds ahead of inference (from the files' declared sizes),
#: and again behind it (waiting to be written): large images are read a few at a time, not
#: 2 x batch + workers at once (six 16000 x 16000 TIFFs reached 11.6 GB). One case larger
#: than this is still read (alone); imageio.MAX_DECODED_BYTES bounds an image.
READ_AHEAD_BYTES = 256 * 1024 * 1024


@dataclass
class PredictOptions(InferenceSettings):
    """One ``brainseg predict`` run: the shared settings plus what to read and write."""

    models: list[Path]  # the model, then any ensemble members (mean probability)
    inputs: list[str]  # files, folders, globs or "-" (paths on stdin)
    out_dir: Path
    fmt: str | None = None  # mask format; None: tif for images, nifti for volumes
    probabilities: bool = False
    overlay: bool = False
    overlay_rgb: bool = False
    summary: str = "csv"  # csv or jsonl
    pad: bool = False
    workers: int = 2
    skip_existing: bool = False
    force: bool = False
    shard: str | None = None
    include_masks: bool = False
    channels: str | None = None  # volume cases; None: volumes.DEFAULT_CHANNELS
    seg_series: str = "flair"  # the contrast whose DICOM series a DICOM SEG refers to
    stdin: Iterable[str] | None = None  # lines of paths (default sys.stdin)
    #: Called with every result as it comes (e.g. the command's --json line).
    on_result: Callable[[Any], None] | None = None
    #: Builds the predictor (tests, eval); None: :class:`brainseg.inference.predict.Predictor`.
    predictor_factory: Callable[..., Any] | None = None
    #: Another engine (:mod:`brainseg.inference.ray_engine`): (predictor, cases, options,
    #: unreported) -> results in input order; None: :class:`Engine` in this process.
    runner: Callable[..., Generator[Any, None, None]] | None = None


R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@dataclass
class Prepared:
    """A case read and checked, waiting for the model: what its writer needs comes along."""

    item: Any  # the input (an InputFile, a volumes.Case)
    outputs: Any  # the files it will write
    model_input: np.ndarray  # S x h x w x 3 uint8 at the model's input size
    padded: bool  # model_input was zero-padded (else resized)
    data: Any  # the case as read (an image, a volume)
    held: int  # bytes held until the case is written
    overwrite: bool = False
    notes: tuple[str, ...] = ()


class CaseFormat(Protocol[R_co]):
    """The edges of the pipeline for one kind of input."""

    def prepare(self, item: Any) -> Prepared | R_co:
        """Read and check one input; a result (error, skipped) when it is not predicted."""

    def finish(self, prep: Prepared, prob: np.ndarray) -> R_co:
        """Write a case's outputs from its S x h x w probabilities at the model's size."""

    def read_cost(self, item: Any) -> int:
        """Bytes reading ``item`` will hold (0 when unknown)."""


@dataclass
class Engine(Generic[R]):
    """Read ahead, infer in batches of slices, write behind; results come in input order."""

    predictor: Any
    fmt: CaseFormat[R]
    workers: int = 2
    # results of the writes in flight when the run stopped (Ctrl-C / SIGTERM): their
    # files are on disk, so the caller still gives them summary rows
    unreported: list[R] = field(default_factory=list)

    def _finish(self, prep: Prepared | R, prob: np.ndarray | None) -> R:
        if isinstance(prep, Prepared):
            assert prob is not None
            return self.fmt.finish(prep, prob)
        return prep

    def run(self, items: Iterable[Any]) -> Iterator[R]:
        bs, workers = self.predictor.batch_size, max(1, self.workers)
        ahead = 2 * bs + workers
        budget = READ_AHEAD_BYTES
        readers = ThreadPoolExecutor(workers, thread_name_prefix="brainseg-read")
        writers = ThreadPoolExecutor(workers, thread_name_prefix="brainseg-write")
        writes: deque[tuple[Future[R], int]] = deque()
        try:
            reads = ordered_map(
                readers, self.fmt.prepare, items, ahead, cost=self.fmt.read_cost, budget=budget
            )
            held = 0  # bytes of the cases waiting to be written
            for group in self._batches(reads, bs, budget):
                probs = self._infer([g for g in group if isinstance(g, Prepared)])
                for g in group:
                    prob = probs.pop(0) if isinstance(g, Prepared) else None
                    n = g.held if isinstance(g, Prepared) else 0
                    writes.append((writers.submit(self._finish, g, prob), n))
                    held += n
                while len(writes) > ahead or (len(writes) > 1 and held > budget):
                    done, n = writes.popleft()
                    held -= n
                    yield done.result()
            while writes:
                yield writes.popleft()[0].result()
        except BaseException:
            # Ctrl-C, a fatal write error or a consumer that stops: do not start queued work;
            # the writes already running finish, and their results are kept
            readers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True, cancel_futures=True)
            self.unreported += [
                f.result() for f, _ in writes if not f.cancelled() and f.exception() is None
            ]
            raise
        finally:
            readers.shutdown()
            writers.shutdown()

    @staticmethod
    def _batches(
        reads: Iterator[Prepared | R], bs: int, budget: int
    ) -> Iterator[list[Prepared | R]]:
        """Groups of cases with up to ``bs`` slices of one shape (fewer when over ``budget`` bytes);
        a case with more slices than ``bs`` is a group of its own."""
        group: list[Prepared | R] = []
        n = held = 0
        shape: tuple[int, ...] | None = None
        for r in reads:
            if isinstance(r, Prepared):
                s = len(r.model_input)
                if n and (r.model_input.shape[1:] != shape or n + s > bs):
                    yield group
                    group, n, held = [], 0, 0
                shape = r.model_input.shape[1:]
                n += s
                held += r.held
            group.append(r)
            if n >= bs or held > budget:
                yield group
                group, n, held = [], 0, 0
        if group:
            yield group

    def _infer(self, preps: list[Prepared]) -> list[np.ndarray]:
        if not preps:
            return []
        x = np.concatenate([p.model_input for p in preps])
        prob = self.predictor.predict_model_size(x)
        cuts = np.cumsum([len(p.model_input) for p in preps])[:-1]
        return list(np.split(prob, cuts))


def ordered_map(
    pool: ThreadPoolExecutor,
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    ahead: int,
    cost: Callable[[Any], int],
    budget: int,
) -> Iterator[Any]:
    """``map(fn, items)`` on ``pool`` with at most ``ahead`` tasks and at most ``budget``
    cost in flight (except one task alone), results in order."""
    pending: deque[tuple[Future[Any], int]] = deque()
    held = 0
    for item in items:
        c = cost(item)
        while pending and (len(pending) >= ahead or held + c > budget):
            done, n = pending.popleft()
            held -= n
            yield done.result()
        pending.append((pool.submit(fn, item), c))
        held += c
    while pending:
        yield pending.popleft()[0].result()


class SummaryWriter:
    """Rows appended as they come under a temporary name renamed at ``close`` (an early stop
    keeps them); an existing summary's rows for files this run did not handle are kept."""

    def __init__(self, path: Path, fmt: str, columns: Sequence[str], key: str = "path") -> None:
        self.path = path
        self.fmt = fmt
        self.columns = list(columns)
        self.key = key  # the column naming what a row is about (a file, a case)
        self._tmp: Path | None = None
        self._f: io.TextIOWrapper | None = None
        self._csv: Any = None
        self._paths: set[str] = set()
        self.rows = 0
        self.last: Any = None  # the result of the last row written

    def write(self, res: Any) -> None:
        row = res.row()
        try:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(self.path.parent)  # a killed run's summary
                self._tmp = make_temp_file(self.path)  # the umask's mode, as every other output
                self._f = open(self._tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115
                if self.fmt == "csv":
                    self._csv = csv.DictWriter(self._f, fieldnames=self.columns)
                    self._csv.writeheader()
            if self.fmt == "csv":
                self._csv.writerow({k: _csv_cell(v) for k, v in row.items()})
            else:
                self._f.write(json.dumps(json_safe(row)) + "\n")
            self._f.flush()
        except OSError as exc:  # disk full: one clear line, not a traceback (tests/faults)
            raise write_error(self.path, exc) from exc
        self._paths.add(row[self.key])
        self.last = res
        self.rows += 1

    def _earlier_rows(self) -> list[Any]:
        """The existing summary's rows of files this run did not handle (none if unreadable)."""
        kept: list[Any] = []
        try:
            with open(self.path, encoding="utf-8", errors="replace", newline="") as old:
                if self.fmt == "csv":
                    for row in csv.DictReader(old):
                        key = row.get(self.key)
                        if key is not None and key not in self._paths:
                            kept.append({c: row.get(c) or "" for c in self.columns})
                    return kept
                for line in old:
                    try:
                        key = json.loads(line).get(self.key)
                    except (ValueError, AttributeError):
                        continue
                    if key is not None and key not in self._paths:
                        kept.append(line.rstrip("\r\n") + "\n")
        except (OSError, csv.Error):
            return []
        return kept

    def close(self) -> Path | None:
        if self._f is None or self._tmp is None:
            return None
        f, self._f = self._f, None
        try:
            for row in self._earlier_rows():  # after this run's rows
                if self.fmt == "csv":
                    self._csv.writerow(row)
                else:
                    f.write(row)
            f.close()
        except OSError as exc:  # the last buffered rows did not fit: keep those on disk
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.replace(self._tmp, self.path)
            raise write_error(self.path, exc) from exc
        os.replace(self._tmp, self.path)
        return self.path


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return repr(v)  # exact: max_probability reads back as the _prob.tif maximum
    return v


#: Summary file formats (``--summary``).
SUMMARY_FORMATS = ("csv", "jsonl")


class CaseKind(Protocol):
    """What a kind of input (image files, volume cases) brings to :func:`run_cases`."""

    noun: str  # "file", "case": the unit of the progress bar and the messages
    key: str  # the summary column naming a row's input
    #: A run in which every case fails writes no summary: each failure was bad input.
    hold_failures: bool

    @property
    def columns(self) -> Sequence[str]:
        """The summary's columns."""

    def check(self, opts: PredictOptions) -> PredictOptions:
        """Refuse this kind's bad options and inputs; the options with its defaults."""

    def cases(
        self, opts: PredictOptions, shard: tuple[int, int] | None
    ) -> tuple[Iterable[Any], int | None]:
        """This shard's inputs (a bad one is its result) and, when cheap, their number."""

    def edges(self, opts: PredictOptions, predictor: Any) -> CaseFormat[Any]:
        """The pipeline's edges for this model (after the run's status line)."""

    def failed(self, res: Any) -> None:
        """Say that one input failed (its row says why too)."""


@dataclass
class RunOutcome:
    """What a run did: results by status (and with tumour), where the summary is."""

    counts: dict[str, int]  # ok, skipped, error, tumor
    summary_path: Path
    written: Path | None  # the summary file, None when no row was written

    @property
    def done(self) -> int:
        return self.counts["ok"] + self.counts["skipped"] + self.counts["error"]


def check_summary(summary_path: Path, opts: PredictOptions) -> None:
    """Refuse a summary that is not a regular file, or one of an earlier run without a flag."""
    check_target(summary_path, force=True)
    if summary_path.exists() and not (opts.force or opts.skip_existing):
        raise BrainsegError(
            f"{summary_path} already exists (an earlier run wrote to {opts.out_dir})",
            hint="pass --skip-existing to resume that run, --force to redo it, "
            "or choose another -o folder",
        )


def run_cases(opts: PredictOptions, kind: CaseKind) -> RunOutcome:
    """One ``brainseg predict`` run: check, load the model, predict this shard's cases, write the
    summary as results come, under the output folder's lock (a failed input is an error row)."""
    if opts.force and opts.skip_existing:
        raise BrainsegError(
            "--force and --skip-existing cannot be used together",
            hint="--skip-existing keeps finished outputs, --force redoes them",
        )
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        raise BrainsegError(
            f"output {opts.out_dir} is a file, not a folder",
            hint="pass a folder to -o (it is created if missing)",
        )
    summary = check_choice("--summary", opts.summary, SUMMARY_FORMATS)
    shard = parse_shard(opts.shard)
    opts = kind.check(replace(opts, summary=summary))
    items, total = kind.cases(opts, shard)
    name = "summary" if shard is None else f"summary-{shard[0]}-of-{shard[1]}"  # --merge's
    summary_path = opts.out_dir / f"{name}.{opts.summary}"
    check_summary(summary_path, opts)
    predictor = load_predictor(opts.models, opts, opts.predictor_factory)
    fmt = kind.edges(opts, predictor)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    # one lock per shard: shards may share -o
    lock = "brainseg-predict" if shard is None else f"brainseg-predict-{shard[0]}-of-{shard[1]}"
    with folder_lock(opts.out_dir, lock, "brainseg predict"):
        check_summary(summary_path, opts)  # an earlier run may have finished meanwhile
        unreported: list[Any] = []  # written while the run stopped: they get their rows too
        if opts.runner is None:
            results = Engine(predictor, fmt, opts.workers, unreported).run(items)
        else:
            results = opts.runner(predictor, items, opts, unreported)
        outcome = _drive(kind, results, unreported, summary_path, total, opts)
        if shard is not None and outcome.done == 0 and not summary_path.exists():
            # an empty shard still leaves its (empty) summary: --merge then knows it ran
            empty = ",".join(kind.columns) + "\r\n" if opts.summary == "csv" else ""
            atomic_write_bytes(summary_path, empty.encode())
    return outcome


def _drive(
    kind: CaseKind,
    results: Iterator[Any],
    unreported: list[Any],
    summary_path: Path,
    total: int | None,
    opts: PredictOptions,
) -> RunOutcome:
    """The loop over results in input order: summary rows, callbacks, warnings, progress;
    on Ctrl-C / SIGTERM every output on disk still gets its row before the summary closes."""
    writer = SummaryWriter(summary_path, opts.summary, kind.columns, key=kind.key)
    # with hold_failures, failures wait for the first success, so a run in which every case
    # fails leaves no summary (each failure was bad input, exit 2)
    held: list[Any] | None = [] if kind.hold_failures else None
    counts = {"ok": 0, "skipped": 0, "error": 0, "tumor": 0}
    warned: set[str] = set()
    pending: Any = None

    def write(res: Any) -> None:
        nonlocal held
        if held is not None and res.status == "error" and not writer.rows:
            held.append(res)
            return
        for r in [*(held or []), res]:
            writer.write(r)
        held = None  # the first row is written: failures need not wait any more

    def tally(res: Any) -> None:
        counts[res.status] += 1
        counts["tumor"] += bool(res.has_tumor)
        if opts.on_result is not None:
            opts.on_result(res)

    try:
        with console.progress(total, "predict", unit=kind.noun) as bar:
            for res in results:
                pending = res
                write(res)
                pending = None
                tally(res)
                if res.status == "error":
                    kind.failed(res)
                for note in getattr(res, "notes", ()):
                    if note not in warned:
                        warned.add(note)
                        console.warn(f"{res.path}: {note} (said once; other files may be too)")
                bar.advance(1, failed=counts["error"])
    except KeyboardInterrupt:
        # the result in hand and the writes in flight (closing the generator lets them
        # finish) are on disk: they get their rows (and --json lines), then the summary
        if isinstance(results, Generator):
            results.close()
        for res in ([pending] if pending is not None else []) + unreported:
            if res is not writer.last:
                write(res)
                tally(res)
        done = counts["ok"] + counts["skipped"] + counts["error"]
        console.warn(
            f"interrupted after {done} {kind.noun}(s); their rows are in {summary_path}; run "
            "the same command with --skip-existing to continue"
        )
        raise
    finally:
        written = writer.close()
    return RunOutcome(counts, summary_path, written)
