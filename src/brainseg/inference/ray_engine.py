"""The Ray Data engine of ``brainseg predict`` (``--engine ray``): the same run on a Ray cluster.

The driver does everything the local engine does before and after the model runs, with the
same code (checks, input walk, shards, lock, summary, exit code). Only the middle changes:
the inputs become a Ray Dataset of paths that ``map_batches`` sends to an actor pool (one
model load per actor, one GPU per actor when the cluster has GPUs), and each actor predicts
and writes its files with the local :class:`brainseg.inference.pipeline.Engine`, returning
only the summary rows. Masks are therefore byte for byte the local engine's, and
``--skip-existing`` resumes a killed Ray run. ``ray`` is imported only when asked for.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from brainseg import console
from brainseg.data.volumes import Case
from brainseg.errors import BrainsegError, BrainsegRuntimeError, first_line
from brainseg.inference.batch import FileResult, ImageKind, InputFile, predict_inputs
from brainseg.inference.pipeline import Engine
from brainseg.inference.predict import load_predictor
from brainseg.inference.volume_predict import CaseResult, VolumeKind, predict_volumes
from brainseg.optional import require

#: The engines of ``brainseg predict --engine``.
ENGINES = ("local", "ray")


def check_engine(engine: str, address: str | None) -> str:
    """``--engine`` in lower case; BrainsegError (exit 2) for an unknown one, or ``--address``
    without ``--engine ray``."""
    name = engine.strip().lower()
    if name not in ENGINES:
        raise BrainsegError(
            f"--engine {engine!r} is not one of {', '.join(ENGINES)}",
            hint="--engine local (this process) or --engine ray (a Ray cluster)",
        )
    if address is not None and name != "ray":
        raise BrainsegError(
            "--address is the Ray cluster of --engine ray",
            hint="add --engine ray, or drop --address",
        )
    return name


@dataclass
class RayEngine:
    """Where and how wide to run: ``address`` None starts a local Ray instance; ``workers`` is
    the number of predictor actors (default: one per CPU, or per GPU when there are GPUs)."""

    address: str | None = None
    workers: int | None = None
    #: Files per ``map_batches`` call (per task sent to an actor); None: 4 x --batch-size.
    files_per_task: int | None = None

    def __post_init__(self) -> None:
        require("ray", "--engine ray")  # before any work: one line naming brainseg[ray]
        require("ray.data", "--engine ray")
        if self.workers is not None and self.workers < 1:
            raise BrainsegError(f"--workers {self.workers} must be at least 1")
        if self.address is not None:
            _probe(self.address)  # before any work: ray.init would retry for minutes

    def predict_inputs(self, opts: Any) -> Any:
        """:func:`brainseg.inference.batch.predict_inputs` with the files predicted on Ray."""
        per_task = self.files_per_task or 4 * opts.batch_size
        return predict_inputs(self._on_ray(opts, "image", per_task))

    def predict_volumes(self, opts: Any, on_case: Callable[[Any], None] | None = None) -> Any:
        """:func:`brainseg.inference.volume_predict.predict_volumes` with a case per Ray task."""
        return predict_volumes(self._on_ray(opts, "volume", self.files_per_task or 1), on_case)

    def _on_ray(self, opts: Any, kind: str, per_task: int) -> Any:
        """``opts`` with the cases predicted by the actors (the driver loads the model on the CPU,
        only for its settings and status lines; the actors load it on ``opts.device``)."""

        def run(
            predictor: Any, items: Iterable[Any], run_opts: Any, unreported: Any
        ) -> Iterator[Any]:
            items = list(items)  # checked by the driver (dedup_inputs), in input order
            done = {i: r for i, r in enumerate(items) if isinstance(r, (FileResult, CaseResult))}
            rows = [
                {"i": i, "item": _item_to_json(x)} for i, x in enumerate(items) if i not in done
            ]
            actor_opts = _for_actors(run_opts, workers=1, device=opts.device)
            kwargs = {"kind": kind, "opts": actor_opts, "cwd": os.getcwd()}
            yield from _in_order(self._map(kwargs, rows, per_task, opts.device), done, len(items))

        return replace(opts, device="cpu", runner=run)

    def _map(
        self, kwargs: dict[str, Any], rows: list[dict[str, Any]], per_task: int, device: str
    ) -> Iterator[tuple[int, Any]]:
        """(index, result) of every row, as the actors finish them (any order)."""
        if not rows:
            return
        ray, started = _start(self.address, self.workers)
        try:
            actors, gpus = self._pool(ray, device, len(rows))
            if self.files_per_task is None:  # a small run still gives every actor work
                per_task = max(1, min(per_task, -(-len(rows) // actors)))
            where = f"Ray at {self.address}" if self.address else "a local Ray instance"
            console.info(
                f"engine ray: {actors} predictor actor(s){' with a GPU each' if gpus else ''} "
                f"on {where}, {per_task} file(s) per task"
            )
            ds = ray.data.from_items(rows).map_batches(
                _Worker,
                fn_constructor_kwargs=kwargs,
                batch_size=per_task,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=1,
                num_gpus=gpus,
            )
            try:
                for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for i, blob in zip(out["i"], out["result"], strict=True):
                        res = _result_from_json(blob)
                        if isinstance(res, _Fatal):
                            raise res.error()
                        yield int(i), res
            except (KeyboardInterrupt, GeneratorExit, BrainsegError):
                raise
            except Exception as exc:  # a worker's fatal error (disk full, broken model)
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, BrainsegError):
                    raise cause from None
                raise BrainsegRuntimeError(
                    f"a Ray worker failed: {first_line(cause)}",
                    hint="rerun with --skip-existing to continue; --debug shows the traceback",
                ) from exc
        finally:
            if started:
                ray.shutdown()

    def _pool(self, ray: Any, device: str, rows: int) -> tuple[int, float]:
        """(actors, GPUs per actor): never more actors than inputs."""
        res = ray.cluster_resources()
        cpus = max(1, int(res.get("CPU", 1)))
        gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
        want = self.workers or (gpus or cpus)
        actors = max(1, min(want, gpus or cpus, rows))
        return actors, (1.0 if gpus else 0.0)


def _start(address: str | None, workers: int | None) -> tuple[Any, bool]:
    """Connect to ``address`` or start Ray: (``ray``, whether to disconnect at the end)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # brainseg's own progress line counts the files
    ctx.print_on_execution_start = False
    _quiet_ray()
    if ray.is_initialized():  # a library caller (or a test) connected already
        return ray, False
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BrainsegError(
            f"cannot start or reach {where}: {first_line(exc)}",
            hint="check --address (host:port of the head node, e.g. 10.0.0.1:6379, or auto) "
            "or drop it to start Ray on this machine",
        ) from None
    _quiet_ray()
    return ray, True


#: Seconds to wait for a Ray head node's port before saying it cannot be reached (ray.init
#: itself retries for minutes).
CONNECT_TIMEOUT = 10.0


def _probe(address: str) -> None:
    """A ``host:port`` address must accept a TCP connection within :data:`CONNECT_TIMEOUT`
    (``auto`` and ``ray://`` addresses are left to Ray)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        if address.strip().lower() == "auto" or "://" in address:
            return
        raise BrainsegError(
            f"--address {address!r} is not host:port",
            hint="the head node's address as `ray start --head` prints it (e.g. 10.0.0.1:6379), "
            "or auto",
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise BrainsegError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or type(exc).__name__}",
            hint="is `ray start --head` running there, and the port open from this machine?",
        ) from None


def _quiet_ray() -> None:
    """Ray's own INFO / WARNING lines off stderr (``--debug`` leaves them)."""
    if not console.state.debug:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _in_order(
    results: Iterator[tuple[int, Any]], done: dict[int, Any], total: int
) -> Iterator[Any]:
    """Results by index, in input order (``done`` holds those the driver made itself)."""
    nxt = 0
    for i, res in results:
        done[i] = res
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1
    while nxt < total:
        if nxt not in done:
            raise BrainsegRuntimeError(f"the Ray run returned no result for input number {nxt}")
        yield done.pop(nxt)
        nxt += 1


@dataclass
class _Fatal:
    """An error that stops the run, carried back as a result (Ray would retry an exception)."""

    message: str
    hint: str | None = None
    exit_code: int = 1

    @classmethod
    def of(cls, exc: BaseException) -> _Fatal:
        if isinstance(exc, BrainsegError):
            return cls(exc.message, exc.hint, exc.exit_code)
        return cls(f"a Ray worker failed: {type(exc).__name__}: {first_line(exc)}")

    def error(self) -> BrainsegError:
        return BrainsegError(self.message, self.hint, exit_code=self.exit_code)


# Rows and results cross to and from the actors as JSON, never as pickles: brainseg loads no
# pickle anywhere (docs/security.md). Paths keep undecodable bytes as surrogate escapes.


def _item_to_json(item: InputFile | Case) -> str:
    if isinstance(item, InputFile):
        fields = {"path": os.fsdecode(item.path), "rel": str(item.rel), "error": item.error}
        return json.dumps(fields)
    four_d = None if item.four_d is None else os.fsdecode(item.four_d)
    sources = {k: os.fsdecode(v) for k, v in item.sources.items()}
    return json.dumps({"id": item.id, "four_d": four_d, "sources": sources, "error": item.error})


def _item_from_json(text: str) -> InputFile | Case:
    d = json.loads(text)
    if "rel" in d:
        return InputFile(Path(d["path"]), PurePosixPath(d["rel"]), d["error"])
    four_d = None if d["four_d"] is None else Path(d["four_d"])
    sources = {k: Path(v) for k, v in d["sources"].items()}
    return Case(d["id"], four_d, sources, d["error"])


def _result_to_json(res: Any) -> str:
    kind = "fatal" if isinstance(res, _Fatal) else "file" if isinstance(res, FileResult) else "case"
    return json.dumps({"kind": kind, "fields": asdict(res)})


def _result_from_json(text: str) -> Any:
    d = json.loads(text)
    fields = d["fields"]
    if d["kind"] == "fatal":
        return _Fatal(**fields)
    if d["kind"] == "file":
        return FileResult(**{**fields, "notes": tuple(fields.get("notes") or ())})
    return CaseResult(**fields)


def _for_actors(opts: Any, **changes: Any) -> Any:
    """The options without what neither pickles nor means anything in an actor."""
    return replace(opts, stdin=None, on_result=None, runner=None, predictor_factory=None, **changes)


def _enter(cwd: str) -> None:
    """Work in the driver's folder, so relative inputs, -o and the summary's paths mean what
    they mean to the driver (every node must see the same paths: a shared file system)."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        import socket

        raise BrainsegRuntimeError(
            f"Ray worker on {socket.gethostname()} cannot enter the driver's folder {cwd}: "
            f"{exc.strerror}",
            hint="every Ray node needs the inputs and -o at the same paths (a shared file system)",
        ) from None


class _Worker:
    """One Ray actor: the model loaded once (a :class:`~brainseg.inference.predict.Predictor`),
    and the local engine with the kind's edges, which reads, predicts and writes each task's
    image files or volume cases."""

    def __init__(self, kind: str, opts: Any, cwd: str) -> None:
        self.fatal: _Fatal | None = None
        try:
            _enter(cwd)
            predictor = load_predictor(opts.models, opts)
            edges = (ImageKind if kind == "image" else VolumeKind)().edges(opts, predictor)
            self.engine = Engine(predictor, edges, opts.workers)
        except Exception as exc:  # a device or model this node cannot use
            self.fatal = _Fatal.of(exc)

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        """A task's output columns: ``i`` and each row's result (or the fatal error) as JSON."""
        import numpy as np

        fatal = self.fatal
        if fatal is None:
            try:
                out = list(self.engine.run([_item_from_json(text) for text in task["item"]]))
            except Exception as exc:  # disk full, a broken model: stop the run, one line
                fatal = _Fatal.of(exc)
        if fatal is not None:
            out = [fatal] * len(task["i"])
        results = [_result_to_json(r) for r in out]
        return {"i": task["i"], "result": np.array(results, dtype=object)}
