"""``brainseg eval MODEL CASES`` on NIfTI / DICOM volume cases: predict, then score.

Predict writes every case's mask into the run's ``masks/`` folder and score measures those
files against the true label volumes (``<case>_seg.nii.gz``..., beside the cases or in
``--gt DIR``), so the numbers describe exactly the masks ``brainseg predict`` ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegError
from brainseg.evaluation.dataset import check_model_paths
from brainseg.evaluation.score import ScoreOptions, score_folders, write_score
from brainseg.fsutil import check_run_name, clear_folder, fresh_run_dir
from brainseg.inference.pipeline import PredictOptions
from brainseg.inference.volume_predict import predict_volumes
from brainseg.settings import InferenceSettings


@dataclass
class VolumeEvalJob(InferenceSettings):
    """``brainseg eval`` on volume cases: the shared :class:`~brainseg.settings.InferenceSettings`
    (``None``: the model's), which predict applies, plus what scoring and the run need."""

    models: list[Path]
    data: Path
    gt: Path | None = None  # None: label volumes beside the cases in ``data``
    channels: str | None = None
    tolerance: float = 2.0
    fmt: str | None = None  # the masks' format: nifti (None) or dicom-seg
    seg_series: str = "flair"  # the contrast a DICOM SEG refers to
    project: Path = Path("runs/eval")
    name: str = "exp"
    exist_ok: bool = False
    predictor_factory: Any = None


@dataclass
class VolumeEvalResult:
    """The score of the predicted masks, where they are, and predict's per-case rows."""

    run_dir: Path
    summary: dict[str, Any]
    cases: list[Any] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def run_volume_eval(job: VolumeEvalJob) -> VolumeEvalResult:
    """Predict every case into ``run_dir/masks``, score them, write eval's files; a case that
    cannot be predicted fails the run (a mean over fewer patients would mislead)."""
    check_run_name(job.name)
    check_model_paths(job.models)
    if not job.data.exists():
        raise BrainsegError(
            f"cases {job.data} do not exist", hint="the last path is the folder of volume cases"
        )
    if job.gt is not None and not job.gt.is_dir():
        raise BrainsegError(
            f"--gt {job.gt} is not a folder",
            hint="pass the folder of true label volumes (<case>_seg.nii.gz ...)",
        )
    with fresh_run_dir(job.project, job.name, exist_ok=job.exist_ok) as run_dir:
        masks = clear_folder(run_dir / "masks")  # an --exist-ok run's old masks would be scored
        pred = predict_volumes(
            PredictOptions(
                models=list(job.models),
                inputs=[str(job.data)],
                out_dir=masks,
                channels=job.channels,
                fmt=job.fmt,
                seg_series=job.seg_series,
                force=True,
                predictor_factory=job.predictor_factory,
                **job.inference_settings(),
            )
        )
        bad = [c for c in pred.cases if c.status == "error"]
        if bad:
            raise BrainsegError(
                f"{len(bad)} of {len(pred.cases)} case(s) could not be predicted, so no score is "
                f"reported (first: {bad[0].error})",
                hint="fix or remove those cases, then run eval again",
            )
        gt = job.gt if job.gt is not None else job.data
        score = score_folders(
            ScoreOptions(pred=masks, gt=gt, tolerance=job.tolerance, truth_only=job.gt is None)
        )
        score.summary.update(
            models=[str(m) for m in job.models],
            data=str(job.data),
            gt=str(gt),
            pred=str(masks),
            settings={**pred.settings, "hd95_unit": "pixels"},
            note="the masks scored are the files in pred (brainseg predict's output for these "
            "cases, its post-processing included)",
        )
        return VolumeEvalResult(run_dir, score.summary, pred.cases, write_score(score, run_dir))
