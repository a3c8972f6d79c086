"""``report.html``: one self-contained page a person opens after ``eval``, ``cv`` or ``train``.

The page holds the summary figures and how they were measured, the per-patient Dice
distribution (a matplotlib PNG), a per-patient table that sorts when a header is clicked
(a few lines of inline vanilla JavaScript) and, for the worst and the median patient, a
montage of their tumour slices with the ground truth (green) and the prediction (red)
outlined. Every image is a ``data:`` URI and a Content-Security-Policy forbids any network
request, so the file can be mailed, archived or opened offline. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainseg import __version__
from brainseg.data.cache import load_dataset
from brainseg.data.imageio import mask_outline
from brainseg.evaluation.metrics import CV_PATIENT_COLUMNS, METRICS, PATIENT_COLUMNS, dice
from brainseg.fsutil import atomic_write_text

#: File name of the report in a run folder.
REPORT_NAME = "report.html"
#: At most this many slices per patient montage (spread evenly over the tumour slices).
MONTAGE_MAX_SLICES = 12
GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
BOTH_COLOR = (255, 255, 0)


# =============================================================================== cases
@dataclass
class PatientCase:
    """The slices of one patient shown in a montage (FLAIR, ground truth, prediction)."""

    label: str  # "worst" | "median"
    patient_id: str
    dice: float
    slice_number: np.ndarray  # S
    flair: np.ndarray  # S x H x W uint8 (channel 1 of kaggle_3m: FLAIR)
    gt: np.ndarray  # S x H x W bool
    pred: np.ndarray  # S x H x W bool


def worst_and_median(per_patient: Sequence[Mapping[str, Any]]) -> list[Any]:
    """``[(label, patient_id, dice)]`` of the lowest and the median patient by Dice (NaN left
    out, ties by patient id); the median of an even count is the lower middle (a real patient)."""
    scored = sorted(
        (float(r["dice"]), str(r["patient_id"]))
        for r in per_patient
        if r.get("dice") is not None and math.isfinite(float(r["dice"]))
    )
    if not scored:
        return []
    out = [("worst", scored[0][1], scored[0][0])]
    mid = scored[(len(scored) - 1) // 2]
    if mid[1] != scored[0][1]:
        out.append(("median", mid[1], mid[0]))
    return out


def pick_cases(
    per_patient: Sequence[Mapping[str, Any]],
    images: np.ndarray,
    rows: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    patient_index: np.ndarray,
    slice_number: np.ndarray,
    patient_ids: Sequence[str],
) -> list[PatientCase]:
    """The worst and median patients' tumour slices (in the truth or the prediction; else the
    middle ones), copied out of the evaluated arrays; ``rows[i]`` is the ``images`` row of
    evaluated slice ``i``."""
    index_of = {p: i for i, p in enumerate(patient_ids)}
    cases = []
    for label, pid, d in worst_and_median(per_patient):
        pos = np.flatnonzero(np.asarray(patient_index) == index_of[pid])
        pos = pos[np.argsort(np.asarray(slice_number)[pos], kind="stable")]
        g, p = np.asarray(gt[pos]) != 0, np.asarray(pred[pos]) != 0
        show = np.flatnonzero(g.any(axis=(1, 2)) | p.any(axis=(1, 2)))
        if show.size == 0:
            mid = len(pos) // 2
            half = MONTAGE_MAX_SLICES // 2
            show = np.arange(max(0, mid - half), min(len(pos), mid + half))
        if show.size > MONTAGE_MAX_SLICES:
            spread = np.linspace(0, show.size - 1, MONTAGE_MAX_SLICES).round().astype(int)
            show = show[np.unique(spread)]
        sel = pos[show]
        cases.append(
            PatientCase(
                label=label,
                patient_id=pid,
                dice=d,
                slice_number=np.asarray(slice_number)[sel].copy(),
                flair=np.asarray(images[np.asarray(rows)[sel], 1]).copy(),
                gt=g[show].copy(),
                pred=p[show].copy(),
            )
        )
    return cases


# =============================================================================== pictures
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        _plt().close(fig)
    return buf.getvalue()


def dice_plot_png(dice: Sequence[float] | np.ndarray, title: str = "") -> bytes:
    """A strip + box plot and a histogram of the per-patient Dice, as PNG bytes."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    v = np.asarray(dice, dtype=np.float64)
    v = v[np.isfinite(v)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4), gridspec_kw={"width_ratios": [1, 2]})
    if v.size:
        ax1.boxplot(v, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, v.size)
        ax1.scatter(1 + jitter, v, s=14, alpha=0.7, color="tab:blue", zorder=3)
        ax1.axhline(v.mean(), color="tab:red", lw=1, ls="--")
        ax2.hist(v, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.axvline(v.mean(), color="tab:red", lw=1, ls="--", label=f"mean {v.mean():.3f}")
        med = float(np.median(v))
        ax2.axvline(med, color="tab:green", lw=1, ls=":", label=f"median {med:.3f}")
        ax2.legend(loc="best", fontsize=8, framealpha=0.9)
    ax1.set(ylim=(-0.02, 1.02), ylabel="Dice")
    ax1.set_xticks([1], ["patients"])
    ax2.set(xlim=(0, 1), xlabel="per-patient Dice", ylabel="patients")
    stats = f": mean {v.mean():.3f}, median {np.median(v):.3f}" if v.size else ""
    fig.suptitle(title or f"Per-patient Dice ({v.size} patients){stats}")
    fig.tight_layout()
    return figure_png(fig)


def outlined(flair: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """FLAIR in grey with the ground truth (green) and prediction (red) outlines; both: yellow."""
    rgb = np.repeat(np.asarray(flair, dtype=np.uint8)[..., None], 3, axis=-1)
    eg, ep = mask_outline(gt), mask_outline(pred)
    rgb[eg] = GT_COLOR
    rgb[ep] = PRED_COLOR
    rgb[eg & ep] = BOTH_COLOR
    return rgb


def montage_png(case: PatientCase, cols: int = 6) -> bytes:
    """The case's slices in a grid, each titled with its slice number and slice Dice."""
    plt = _plt()
    n = len(case.slice_number)
    cols = max(1, min(cols, n))
    nrows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.1 * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, ax in enumerate(axes.ravel()[:n]):
        ax.imshow(outlined(case.flair[j], case.gt[j], case.pred[j]), interpolation="nearest")
        d = dice(case.pred[j], case.gt[j])
        ax.set_title(f"slice {int(case.slice_number[j])}  Dice {d:.2f}", fontsize=7)
    fig.suptitle(
        f"{case.label} patient {case.patient_id}: Dice {case.dice:.3f} "
        "(FLAIR; green: ground truth, red: prediction, yellow: both)",
        fontsize=8,
    )
    fig.tight_layout()
    return figure_png(fig, dpi=80)


def curves_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss and validation Dice per epoch of a train run's metrics.csv rows."""
    plt = _plt()
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss")
    a.legend()
    b.plot(ep, [r["val_dice_slice"] for r in rows], "o-", label="val per-slice")
    b.plot(ep, [r["val_dice_patient"] for r in rows], "o-", label="val per-patient")
    b.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    return figure_png(fig)


# =============================================================================== HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem auto;
max-width:70rem;padding:0 1rem;color:#1d1d1f;line-height:1.4}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:right}
th{background:#f3f3f5}td.t,th.t{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
pre{background:#f6f6f8;padding:.75rem;overflow:auto;font-size:.8rem}
.note{color:#555;font-size:.85rem}
.wide{overflow-x:auto}
"""

_JS = """
(function () {
  function key(td, num) {
    var v = td.getAttribute("data-v");
    if (!num) return v;
    return v === "" ? NaN : parseFloat(v);
  }
  function sortBy(table, th, col) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var num = th.getAttribute("data-type") === "num";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col], num), y = key(b.cells[col], num);
      var xn = num && isNaN(x), yn = num && isNaN(y);
      if (xn || yn) return xn && yn ? a.rowIndex - b.rowIndex : (xn ? 1 : -1);
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return c === 0 ? a.rowIndex - b.rowIndex : (asc ? c : -c);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (t) {
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "click to sort";
      th.addEventListener("click", function () { sortBy(t, th, col); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(t, th, col); }
      });
    });
  });
})();
"""

#: No request leaves the page: images are data: URIs, style and script are inline.
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def esc(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell (NaN / None as an en dash), anything else as text."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return "\u2013"
        small = v != 0 and abs(v) < 0.01
        return f"{v:.3g}" if small or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(value)


def img_tag(png: bytes, alt: str) -> str:
    """An <img> whose source is the PNG itself (a data: URI)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def kv_table(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of labels and values (values escaped)."""
    body = "".join(
        f'<tr><th class="t">{esc(k)}</th><td class="t">{esc(fmt(v))}</td></tr>' for k, v in items
    )
    return f'<table class="kv">{body}</table>'


def grid_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain table (first column left-aligned text)."""
    head = "".join(
        f'<th class="{"t" if i == 0 else ""}">{esc(c)}</th>' for i, c in enumerate(columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"t" if i == 0 else ""}">{esc(fmt(v))}</td>' for i, v in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sort_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int | float | np.integer | np.floating):
        f = float(v)
        return repr(f) if math.isfinite(f) else ""
    return str(v)


def sortable_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], table_id: str) -> str:
    """A table whose rows sort by a column when its header is clicked (again: reversed);
    numbers sort as numbers (``data-v`` holds the full value), NaN last."""
    numeric = {
        c: all(
            isinstance(r.get(c), int | float | np.integer | np.floating) or r.get(c) is None
            for r in rows
        )
        for c in columns
    }
    head = "".join(
        f'<th data-type="{"num" if numeric[c] else "text"}" class="{"" if numeric[c] else "t"}">'
        f"{esc(c)}</th>"
        for c in columns
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td data-v="{esc(_sort_value(r.get(c)))}" class="{"" if numeric[c] else "t"}">'
            f"{esc(fmt(r.get(c)))}</td>"
            for c in columns
        )
        + "</tr>"
        for r in rows
    )
    return (
        f'<div class="wide"><table class="sortable" id="{esc(table_id)}"><thead><tr>{head}'
        f"</tr></thead><tbody>{body}</tbody></table></div>"
    )


def section(heading: str, body: str, note: str = "") -> str:
    """An <h2> section; ``body`` is HTML already escaped, ``note`` plain text."""
    extra = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section><h2>{esc(heading)}</h2>{extra}{body}</section>"


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole self-contained document."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="note">{esc(subtitle)}</p>'
        + "".join(sections)
        + f'<p class="note">written by brainseg {esc(__version__)}</p>'
        f"<script>{_JS}</script></body></html>\n"
    )


def cases_section(cases: Sequence[PatientCase]) -> str:
    """The worst and median patients' montages."""
    if not cases:
        return section("Worst and median patient", "<p>no patient with a finite Dice</p>")
    parts = (
        f"<h3>{esc(c.label)} patient: {esc(c.patient_id)} (Dice {esc(fmt(c.dice))})</h3>"
        + img_tag(montage_png(c), f"{c.label} patient {c.patient_id}")
        for c in cases
    )
    return section(
        "Worst and median patient",
        "".join(parts),
        note=f"Tumour slices (ground truth or prediction non-empty, at most "
        f"{MONTAGE_MAX_SLICES} per patient, evenly spread); FLAIR channel; green: ground "
        "truth, red: prediction, yellow: both.",
    )


# =============================================================================== eval
_STATS = ("mean", "median", "std", "min", "n")
_STAT_LEVELS = (
    ("per patient", "per_patient"),
    ("per slice (tumour)", "per_slice_tumor"),
    ("per slice (all)", "per_slice_all"),
)


def _stats_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    return [
        [f"{metric} {label}", *(summary[key][metric][s] for s in _STATS)]
        for metric in METRICS
        for label, key in _STAT_LEVELS
    ]


def eval_measured(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """How an eval's numbers were measured, as (label, value) pairs."""
    s, c = summary["settings"], summary["counts"]
    at = summary.get("measured_at") or {"size": ("?", "?"), "what": "the masks' own size"}
    if summary.get("split"):
        fold = "" if summary.get("fold") is None else f", fold {summary['fold']}"
        protocol = f"single split: subset {summary['subset']}{fold} of {summary['split']}"
    else:
        protocol = "no split: every patient of the data (optimistic if the model trained on some)"
    model_in = at.get("model_input")
    items: list[tuple[str, Any]] = [
        ("protocol", protocol),
        ("patients / slices", f"{c['patients']} / {c['slices']} ({c['tumor_slices']} with tumour)"),
        (
            "model(s)",
            ", ".join(summary["models"])
            + (" (ensemble: mean probability)" if summary.get("ensemble") else ""),
        ),
        ("data", summary["data"]),
        ("measured at", f"{at['size'][0]}x{at['size'][1]}: {at['what']}"),
        ("model input size", f"{model_in[0]}x{model_in[1]}" if model_in else "padded to x32"),
        ("threshold", f"{s['threshold']:g} (from the {s.get('threshold_source', 'model')})"),
        (
            "post-processing",
            f"min-size {s['min_size']} px, "
            f"{'largest 3D component per patient' if s['largest'] else 'all components kept'}",
        ),
        ("test-time augmentation", bool(s.get("tta"))),
        ("brainseg", summary.get("brainseg_version")),
        ("created", summary.get("created")),
    ]
    tuned = summary.get("tune")
    if tuned:
        b = tuned["best"]
        best = f"threshold {b['threshold']:g}, min-size {b['min_size']}, largest {b['largest']}"
        gain = f"Dice {b['dice']:.4f} (gain {tuned['gain']:+.4f})"
        items.append(("--tune", f"best {best}: {gain}; {tuned['note']}"))
    return items


def overlap_warning(overlap: dict[str, Any], n_scored: int) -> str:
    """The one line eval warns with when it scores patients a model trained on."""
    by = overlap["by_model"]
    n = len({p for ids in by.values() for p in ids})
    return (
        f"{n} of the {n_scored} scored patients were training patients of "
        f"{len(by)} of the {len(overlap['members'])} model(s) ({', '.join(by)}): these "
        "figures are not held out and are optimistic (score patients none of the models "
        "trained on, e.g. --subset val --fold K with fold K's model)"
    )


def eval_html(
    summary: Mapping[str, Any],
    per_patient: Sequence[Mapping[str, Any]],
    cases: Sequence[PatientCase],
    dice_png: bytes | None = None,
) -> str:
    """The eval report page (see :func:`write_eval_report`)."""
    pp = summary["per_patient"]["dice"]
    g, d = summary["global"], summary["detection"]
    headline = (
        f"mean per-patient Dice {fmt(pp['mean'])} (median {fmt(pp['median'])}, "
        f"{pp['n']} patients); global Dice {fmt(g['dice'])}; slice detection sensitivity "
        f"{fmt(d['sensitivity'])}, specificity {fmt(d['specificity'])}"
    )
    dice = [float(r["dice"]) for r in per_patient]
    warning = ""
    if summary.get("trained_on_scored_patients"):  # issue 21: never silently optimistic
        text = overlap_warning(summary["training_overlap"], summary["counts"]["patients"])
        warning = (
            '<p class="not-held-out" style="color:#a00;border:2px solid #a00;padding:.5rem">'
            f"<strong>Not held out:</strong> {esc(text)}; patients: "
            f"{esc(', '.join(summary['trained_on_scored_patients']))}</p>"
        )
    sections = [
        section(
            "Summary",
            warning
            + f"<p><strong>{esc(headline)}</strong></p>"
            + grid_table(["metric", *_STATS], _stats_rows(summary)),
        ),
        section("How it was measured", kv_table(eval_measured(summary))),
        section("Per-patient Dice", img_tag(dice_png or dice_plot_png(dice), "per-patient Dice")),
        section(
            "Patients",
            sortable_table(PATIENT_COLUMNS, per_patient, "patients"),
            note="Click a column header to sort (click again to reverse).",
        ),
        cases_section(cases),
    ]
    c = summary["counts"]
    return page(
        f"brainseg eval: {c['patients']} patients",
        f"{', '.join(summary['models'])} on {summary['data']}",
        sections,
    )


def write_eval_report(result: Any, run_dir: Path) -> Path:
    """``run_dir/report.html`` of a :class:`brainseg.evaluation.dataset.EvalResult`."""
    plot = run_dir / "dice_per_patient.png"
    text = eval_html(
        result.summary,
        result.report.per_patient,
        result.cases,
        plot.read_bytes() if plot.is_file() else None,
    )
    return atomic_write_text(run_dir / REPORT_NAME, text)


# =============================================================================== cv
def _ci(st: Mapping[str, Any]) -> str:
    lo, hi = st.get("ci95") or [None, None]
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _cv_block_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    blocks = (("before", "before tuning"), ("after", "after tuning"), ("buda", "buda"))
    stats = [(label, summary[key]["per_patient_dice"]) for key, label in blocks if summary.get(key)]
    return [
        [label, st["mean"], _ci(st), st["median"], st["std"], st["min"], st["n"]]
        for label, st in stats
    ]


def _group_rows(groups: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    return [[g, st["mean"], _ci(st), st["median"], st["min"], st["n"]] for g, st in groups.items()]


def cv_measured(summary: Mapping[str, Any], size: Sequence[int] | None) -> list[tuple[str, Any]]:
    """How a cv's numbers were measured, as (label, value) pairs."""
    after, tuning, boot = summary["after"]["settings"], summary["tuning"], summary["bootstrap"]
    n_test = summary.get("test_patients_not_evaluated")
    not_evaluated = f" ({n_test} test patients not evaluated)" if n_test else ""
    items: list[tuple[str, Any]] = [
        (
            "protocol",
            f"{summary['folds']}-fold patient-level cross-validation; each patient "
            "predicted by the one fold model that did not train on it (out of fold)",
        ),
        ("checkpoint", f"{summary['selection']['select']}: {summary['selection']['label']}"),
        ("patients / slices", f"{summary['patients']} / {summary['slices']}{not_evaluated}"),
        ("data", summary["data"]),
        (
            "measured at",
            f"{size[0]}x{size[1]}: the images' own size" if size else "the images' own size",
        ),
        ("threshold (after tuning)", f"{after['threshold']:g}"),
        (
            "post-processing (after tuning)",
            f"min-size {after['min_size']} px, largest 3D "
            f"component {'on' if after['largest'] else 'off'}",
        ),
        ("tuning", f"{tuning['note']} (objective: {tuning['objective']})"),
        (
            "confidence intervals",
            f"{boot['method']}, {boot['resamples']} resamples, seed "
            f"{boot['seed']}, level {boot['level']}",
        ),
        ("reporting protocol", summary.get("protocol")),
        ("brainseg", summary.get("brainseg_version")),
        ("created", summary.get("created")),
    ]
    if summary.get("buda"):
        items.append(("buda protocol", summary["buda"]["protocol"]))
    return items


def cv_html(
    summary: Mapping[str, Any],
    per_patient: Sequence[Mapping[str, Any]],
    cases: Sequence[PatientCase],
    size: Sequence[int] | None = None,
) -> str:
    """The cv report page (see :func:`write_cv_report`)."""
    st = summary["after"]["per_patient_dice"]
    headline = (
        f"out-of-fold mean per-patient Dice {fmt(st['mean'])} (95% CI {_ci(st)}, median "
        f"{fmt(st['median'])}, {st['n']} patients), {summary['selection']['label']}"
    )
    cols = CV_PATIENT_COLUMNS + (["dice_buda"] if summary.get("buda") else [])
    stat_cols = ["per-patient Dice", "mean", "95% CI", "median", "std", "min", "n"]
    group_cols = ["mean", "95% CI", "median", "min", "n"]
    sections = [
        section(
            "Summary",
            f"<p><strong>{esc(headline)}</strong></p>"
            + grid_table(stat_cols, _cv_block_rows(summary))
            + "<h3>per fold (after tuning)</h3>"
            + grid_table(["fold", *group_cols], _group_rows(summary["after"]["per_fold"]))
            + "<h3>per institution (after tuning)</h3>"
            + grid_table(["site", *group_cols], _group_rows(summary["after"]["per_institution"])),
        ),
        section("How it was measured", kv_table(cv_measured(summary, size))),
        section(
            "Per-patient Dice",
            img_tag(dice_plot_png([float(r["dice"]) for r in per_patient]), "per-patient Dice"),
        ),
        section(
            "Patients",
            sortable_table(cols, per_patient, "patients"),
            note="dice_before: threshold 0.5, no post-processing; dice and the other "
            "metrics: after tuning. Click a column header to sort.",
        ),
        cases_section(cases),
    ]
    return page(
        f"brainseg cv: {summary['folds']} folds, {summary['patients']} patients",
        f"{summary['cv_dir']} on {summary['data']}",
        sections,
    )


def write_cv_report(result: Any) -> Path:
    """``cv_dir/report.html`` of a :class:`brainseg.train.cv.CVResult` (images from the cache)."""
    plan, oof = result.plan, result.oof
    ds = load_dataset(plan.data, skip_bad=bool(plan.train.get("skip_bad", False)))
    cases = []
    if oof.rows is not None:
        cases = pick_cases(
            result.per_patient,
            ds.images,
            oof.rows,
            oof.gt,
            result.masks["after"],
            oof.patient_index,
            oof.slice_number,
            oof.patient_ids,
        )
    text = cv_html(result.summary, result.per_patient, cases, ds.size)
    return atomic_write_text(Path(plan.cv_dir) / REPORT_NAME, text)
