"""kaggle_3m patients as cases of the one pipeline: the masks ``brainseg eval`` scores.

A patient folder is one case, its slices stacked in slice order, so the post-processing is
the patient-volume rule eval has always measured (:func:`brainseg.inference.postprocess.apply`).
Each slice's mask is written as ``OUT/<patient>/<slice>_mask.tif`` (uint8 0/255), with
``probabilities`` its ``_prob.tif`` (float32); ``OUT/summary.csv`` has a row per patient.

Slices are read by the training cache's reader (:func:`brainseg.data.lgg.decode_slice`), so
eval sees the pixels training saw; one that cannot be read fails its patient, or with
``skip_bad`` is left out (and named in the patient's row, so scoring leaves it out too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from brainseg.data import imageio, lgg
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import one_line
from brainseg.inference import postprocess
from brainseg.inference.pipeline import PredictOptions, Prepared
from brainseg.settings import PostSettings


@dataclass
class PatientResult:
    """One patient's row of the summary."""

    patient: str
    status: str = "ok"  # ok, error
    slices: int | None = None
    tumor_pixels: int | None = None
    tumor_slices: int | None = None
    max_probability: float | None = None
    #: Slices left out with ``skip_bad`` (their file stems) and why.
    left_out: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str = ""

    def __post_init__(self) -> None:
        self.error = one_line(self.error)

    def row(self) -> dict[str, Any]:
        return {
            **{c: getattr(self, c) for c in SUMMARY_COLUMNS},
            "left_out": ";".join(self.left_out),
        }

    @property
    def has_tumor(self) -> bool:
        return bool(self.tumor_pixels)


#: The summary's columns: every field but the problems (eval reports them).
SUMMARY_COLUMNS = tuple(f.name for f in fields(PatientResult) if f.name != "problems")


def probability_file(out_dir: Path, s: lgg.SliceFile) -> Path:
    """``OUT/<patient>/<slice>_prob.tif`` (float32, what eval --tune searches on)."""
    return out_dir / s.patient / f"{s.image.stem}_prob.tif"


@dataclass
class PatientFormat:
    """The pipeline's edges for kaggle_3m patients (see the module docstring)."""

    opts: PredictOptions
    size: tuple[int, int] | None
    post: PostSettings
    skip_bad: bool

    def read_cost(self, item: lgg.Patient) -> int:
        """Bytes a patient holds once read: its slices and their copy at the model's size."""
        first = imageio.declared_size(item.slices[0].image) if item.slices else None
        return 0 if first is None else 2 * len(item.slices) * 3 * first.pixels

    def prepare(self, item: lgg.Patient) -> Prepared | PatientResult:
        kept: list[lgg.SliceFile] = []
        images: list[np.ndarray] = []
        left_out: list[str] = []
        problems: list[str] = []
        for s in item.slices:
            res = lgg.decode_slice(s)
            if isinstance(res, list):
                if not self.skip_bad:
                    return PatientResult(
                        item.id,
                        status="error",
                        error="; ".join(
                            f"{item.folder / Path(p.file).name}: {p.message}" for p in res
                        )
                        + f" ({lgg.SKIP_HINT})",
                    )
                left_out.append(s.image.stem)
                problems += [str(p) for p in res]
                continue
            kept.append(s)
            images.append(res[0])
        if not images:  # --skip-bad left every slice out: the patient is not scored
            return PatientResult(item.id, slices=0, left_out=left_out, problems=problems)
        if len({im.shape for im in images}) > 1:
            sizes = sorted({f"{im.shape[0]}x{im.shape[1]}" for im in images})
            return PatientResult(
                item.id,
                status="error",
                error=f"patient {item.id}: slices of different sizes ({', '.join(sizes)})",
            )
        stack = np.stack(images)
        x, padded = imageio.to_model_input(stack, self.size, pad=self.opts.pad)
        data = (kept, stack.shape[1:3], left_out, problems)
        return Prepared(item, None, x, padded, data, stack.nbytes + x.nbytes)

    def finish(self, prep: Prepared, prob: np.ndarray) -> PatientResult:
        kept, size, left_out, problems = prep.data
        post = self.post
        try:
            prob = postprocess.proba_at_size(prob, size, padded=prep.padded)
            mask = postprocess.apply(prob, post.threshold, post.min_size, post.largest)
            out = self.opts.out_dir
            for s, m, p in zip(kept, mask, prob, strict=True):
                if self.opts.probabilities:
                    imageio.write_probability(probability_file(out, s), p, force=True)
                imageio.write_mask(out / s.patient / f"{s.image.stem}_mask.tif", m, force=True)
        except BrainsegRuntimeError:
            raise  # disk full: stop the run
        except BrainsegError as exc:
            return PatientResult(prep.item.id, status="error", error=exc.message)
        return PatientResult(
            prep.item.id,
            slices=len(kept),
            tumor_pixels=int(np.count_nonzero(mask)),
            tumor_slices=int(np.count_nonzero(mask.any(axis=(1, 2)))),
            max_probability=float(prob.max()),
            left_out=left_out,
            problems=problems,
        )


class PatientKind:
    """kaggle_3m patients (chosen by eval) as the pipeline's run takes them."""

    noun = "patient"
    columns = SUMMARY_COLUMNS
    key = "patient"
    hold_failures = True

    def __init__(self, patients: Sequence[lgg.Patient], skip_bad: bool = False) -> None:
        self.patients = list(patients)
        self.skip_bad = skip_bad

    def check(self, opts: PredictOptions) -> PredictOptions:
        return opts

    def cases(
        self, opts: PredictOptions, shard: tuple[int, int] | None
    ) -> tuple[list[lgg.Patient], int]:
        chosen = self.patients if shard is None else self.patients[shard[0] :: shard[1]]
        return chosen, len(chosen)

    def edges(self, opts: PredictOptions, predictor: Any) -> PatientFormat:
        post = opts.resolve(dict(predictor.metadata)).post
        return PatientFormat(opts, predictor.image_size, post, self.skip_bad)

    def failed(self, res: PatientResult) -> None:
        pass  # eval stops on the first failed patient (a mean over fewer patients misleads)
