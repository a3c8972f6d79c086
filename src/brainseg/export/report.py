"""What an export wrote and how it compares with PyTorch: :class:`ExportReport` and its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainseg.errors import BrainsegRuntimeError


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how the ONNX model compares with PyTorch."""

    path: Path
    variant: str  # fp32, fp16 or int8
    opset: int
    exporter: str  # dynamo or torchscript
    size_mb: float
    image_size: tuple[int, int]  # the training size: every Dice here is at this size
    data_source: str  # what the verification inputs were
    checks: list[dict[str, Any]] = field(default_factory=list)
    int8: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # advice that is not a warning
    seconds: float = 0.0
    written: bool = True
    members: int = 0  # fold models merged into the file (0: a single checkpoint)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (``--json``)."""
        return {
            "output": str(self.path),
            "written": self.written,
            "ensemble_members": self.members,
            "variant": self.variant,
            "opset": self.opset,
            "exporter": self.exporter,
            "size_mb": round(self.size_mb, 3),
            "image_size": list(self.image_size),
            "dice_image_size": list(self.image_size),
            "verified_on": self.data_source,
            "checks": self.checks,
            "int8": self.int8,
            "warnings": self.warnings,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
        }

    @property
    def size_text(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}"


class ExportCheckFailed(BrainsegRuntimeError):
    """``--strict``: the verification found problems; nothing was written (exit 1)."""

    def __init__(self, report: ExportReport) -> None:
        super().__init__(
            f"export verification failed under --strict ({len(report.warnings)} problem(s), "
            f"first: {report.warnings[0]}); {report.path} was not written",
            hint="see the warnings above; drop --strict to write the file anyway",
        )
        self.report = report


def report_rows(report: ExportReport) -> tuple[list[str], list[list[Any]]]:
    """The verification table: one row per ONNX variant compared with PyTorch."""
    second = report.checks[0]["second_size"] if report.checks else ["?", "?"]
    cols = [
        "model",
        "MB",
        f"max |Δlogit| at {report.size_text}",
        f"max |Δlogit| at {second[0]}x{second[1]}",
        "mask Dice vs torch",
        "ms/slice",
    ]
    rows = [
        [
            c["model"],
            f"{c['size_mb']:.1f}",
            f"{c['max_abs_diff']:.2e}",
            f"{c['max_abs_diff_2nd_size']:.2e}",
            c["mask_dice_vs_torch"],
            f"{c['ms_per_slice']:.1f}",
        ]
        for c in report.checks
    ]
    return cols, rows


def report_title(report: ExportReport) -> str:
    ref = f"PyTorch, mean of {report.members} fold models" if report.members else "PyTorch"
    return (
        f"ONNX vs {ref} ({report.data_source}; mask Dice at the training size {report.size_text})"
    )


def int8_title(report: ExportReport) -> str:
    return (
        "int8 vs fp32: mean per-patient Dice on the validation patients at the training size "
        f"{report.size_text}"
    )


def precision_title(report: ExportReport) -> str:
    own = (report.int8 or {}).get("own_size") or {}
    size = "x".join(map(str, own.get("size", [])))
    return f"cost of each precision: mean per-patient Dice at the images' own size {size}"


def precision_rows(report: ExportReport) -> tuple[list[str], list[list[Any]]] | None:
    """Each precision's per-patient Dice at the images' own size and its cost vs fp32."""
    own = (report.int8 or {}).get("own_size") or {}
    if not own.get("patient_dice"):
        return None
    dice, cost, used = own["patient_dice"], own["dice_cost"], own["runtimes"]
    rows = [[k, used[k], dice[k], cost.get(k, 0.0)] for k in ("fp32", "bf16", "int8") if k in dice]
    return ["precision", "runtime", "patient Dice", "cost vs fp32"], rows


def int8_rows(report: ExportReport) -> tuple[list[str], list[list[Any]]] | None:
    """The int8 Dice table (per-patient Dice on the validation patients), if int8."""
    q = report.int8
    if not q:
        return None
    cols = [
        "patients",
        "slices",
        "Dice fp32",
        "Dice int8",
        "loss",
        "int8 vs fp32 masks",
        f"|loss| <= {q['tolerance']}",
        "CPU int8 path",
    ]
    return cols, [
        [
            q["validation_patients"],
            q["validation_slices"],
            q["patient_dice_fp32"],
            q["patient_dice_int8"],
            q["dice_loss"],
            q["mask_dice_int8_vs_fp32"],
            "yes" if q["within_tolerance"] else "NO",
            q["cpu_int8_path"],
        ]
    ]
