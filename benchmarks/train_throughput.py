"""Benchmark: training images/s of brainseg's loop against a notebook-style reference.

    python benchmarks/train_throughput.py [--data DIR] [--size 128] [--batch 16] [--json OUT]

Both train UNetVGG16 (same architecture, random init, Adam, BCE loss, batch --batch, the same
training patients, augmentation on, the CPU) for --steps optimiser steps per repetition; the
variants alternate inside every repetition (the order reversed every other one) and the
median images/s of --repeats repetitions is reported, after one untimed warm-up repetition of
each variant (first-call kernel and allocator set-up).

* reference: what most notebooks do: a per-sample ``torch.utils.data.Dataset`` whose
  ``__getitem__`` opens the slice and mask TIFs with tifffile, resizes them with PIL and
  augments them one by one (torchvision.transforms.v2.functional), a ``DataLoader`` with
  --loader-workers worker processes, fp32, contiguous (NCHW) memory. Timed from asking the
  loader for the first batch to the end of the last step (worker start-up included, as in
  every epoch of a notebook).
* brainseg: ``brainseg.train.train`` itself (the library's loop: uint8 tensors in memory,
  batched index_select + augmentation, autocast, channels_last), one short run per
  repetition; images/s is the ``images_per_s`` the loop writes to metrics.csv (training steps
  only, validation and checkpoint writing excluded). Ablation: fp32 or bf16 autocast,
  NCHW or channels_last, and bf16 channels_last with ``--compile`` (torch.compile; its run
  has two epochs and the second one's images/s is reported: the first one compiles).

Target (issue 5): brainseg (bf16 + channels_last) at least 1.3x the reference at 128x128,
batch 16 on this CPU. Prints a table and writes JSON (default
benchmarks/results/train_throughput.json).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    RESULTS,
    load_cached,
    median,
    provenance,
    say,
    show,
    spread,
    train_run,
    write_result,
    write_split,
)

TARGET_RATIO = 1.3
REFERENCE = "reference (Dataset + DataLoader, fp32, NCHW)"


@dataclass(frozen=True)
class Variant:
    """One brainseg configuration of the ablation."""

    name: str
    amp: str  # "off" | "bf16"
    channels_last: bool
    compile: bool = False  # torch.compile (``--compile``): timed on a second epoch


VARIANTS = [
    Variant("brainseg fp32, NCHW", "off", False),
    Variant("brainseg fp32, channels_last", "off", True),
    Variant("brainseg bf16, NCHW", "bf16", False),
    Variant("brainseg bf16, channels_last", "bf16", True),
    Variant("brainseg bf16, channels_last, torch.compile", "bf16", True, True),
]


# --------------------------------------------------------------------------- the reference
class NotebookDataset:
    """The per-sample dataset of a typical notebook: open, decode, resize, augment one slice.

    (A plain class with ``__len__`` / ``__getitem__``: that is all DataLoader needs.)
    """

    def __init__(self, pairs: list[tuple[Path, Path]], size: int, augment: bool) -> None:
        # Import in the parent, as a notebook's first cell does: forked DataLoader workers
        # inherit the modules instead of each importing torchvision again (1.1 s per epoch).
        import tifffile  # noqa: F401
        import torchvision.transforms.v2.functional  # noqa: F401
        from PIL import Image  # noqa: F401

        self.pairs, self.size, self.augment = pairs, size, augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import tifffile
        import torch
        import torchvision.transforms.v2.functional as TF
        from PIL import Image

        image_path, mask_path = self.pairs[i]
        img = tifffile.imread(image_path)
        msk = tifffile.imread(mask_path)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = np.asarray(Image.fromarray(img[..., :3]).resize((self.size,) * 2, Image.BILINEAR))
        msk = np.asarray(Image.fromarray(msk).resize((self.size,) * 2, Image.NEAREST))
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().contiguous()
        y = torch.from_numpy((msk > 127).astype(np.float32))[None]
        if self.augment:
            rng = np.random.default_rng()
            if rng.random() < 0.5:
                x, y = TF.horizontal_flip(x), TF.horizontal_flip(y)
            angle = float(rng.uniform(-15, 15))
            scale = float(rng.uniform(0.9, 1.1))
            x = TF.affine(x, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0])
            y = TF.affine(
                y,
                angle=angle,
                translate=[0, 0],
                scale=scale,
                shear=[0.0, 0.0],
                interpolation=TF.InterpolationMode.NEAREST,
            )
            c = float(rng.uniform(0.9, 1.1))
            b = float(rng.uniform(-0.1, 0.1)) * 255
            x = ((x - x.mean()) * c + x.mean() + b).clamp(0, 255)
        return x.contiguous(), y.contiguous()


class Reference:
    """The notebook training loop: DataLoader with workers, fp32 model, NCHW."""

    def __init__(
        self, pairs: list[tuple[Path, Path]], args: argparse.Namespace, decoder: list[int]
    ) -> None:
        import torch

        from brainseg.model.unet import UNetVGG16

        torch.manual_seed(0)
        self.model = UNetVGG16(decoder_channels=tuple(decoder), encoder_weights=None)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=4e-4)
        self.loader = torch.utils.data.DataLoader(
            NotebookDataset(pairs, args.size, augment=True),  # type: ignore[arg-type]
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.loader_workers,
            drop_last=True,
        )

    def run(self, steps: int) -> float:
        """Images/s over ``steps`` steps (loader start-up included)."""
        import torch.nn.functional as F

        n = 0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.loader):
            if step == steps:
                break
            self.opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(self.model(x), y)
            loss.backward()
            self.opt.step()
            loss.item()
            n += len(x)
        return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- brainseg
def brainseg_run(
    v: Variant, root: Path, split: Path, args: argparse.Namespace, decoder: list[int], tmp: Path
) -> dict[str, float]:
    """One short ``brainseg.train.train`` run; its logged training images/s and wall time."""
    run, rows, wall = train_run(
        root,
        split,
        decoder,
        tmp,
        image_size=args.size,
        epochs=2 if v.compile else 1,  # the first epoch compiles: time the second
        steps_per_epoch=args.steps,
        compile=v.compile,
        batch_size=args.batch,
        amp=v.amp,
        channels_last=v.channels_last,
        device="cpu",
        name="bench",
    )
    row = rows[-1]
    shutil.rmtree(run)  # the checkpoints of a benchmark run are ~0.5 GB
    return {"images_per_s": float(row["images_per_s"]), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kaggle_3m dataset folder")
    ap.add_argument("--size", type=int, default=128, help="image size (default 128)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per repetition")
    ap.add_argument("--repeats", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument(
        "--loader-workers", type=int, default=2, help="DataLoader workers of the reference"
    )
    ap.add_argument(
        "--variants",
        default="all",
        help="comma-separated brainseg variants: fp32-nchw, fp32-cl, bf16-nchw, bf16-cl, "
        "bf16-cl-compile, all",
    )
    ap.add_argument("--json", type=Path, default=RESULTS / "train_throughput.json")
    ap.add_argument(
        "--smoke", action="store_true", help="narrow decoder, 1 step, 1 repeat (smoke test)"
    )
    args = ap.parse_args(argv)
    keys = {"fp32-nchw": 0, "fp32-cl": 1, "bf16-nchw": 2, "bf16-cl": 3, "bf16-cl-compile": 4}
    chosen = (
        VARIANTS
        if args.variants == "all"
        else [VARIANTS[keys[k.strip()]] for k in args.variants.split(",")]
    )
    if args.smoke:
        args.steps, args.repeats = 1, 1
    decoder = [16, 16, 8, 8, 8] if args.smoke else [512, 256, 128, 64, 32]

    import torch

    from brainseg.data import lgg
    from brainseg.train.runtime import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        say("warning: this CPU has no native bf16: bf16 autocast is emulated (slow) here")
    result: dict[str, Any] = {"benchmark": "train_throughput", **provenance()}
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["settings"]["decoder_channels"] = decoder
    result["torch_threads"] = torch.get_num_threads()
    result["cpu_has_native_bf16"] = cpu_has_native_bf16()

    with tempfile.TemporaryDirectory(prefix="brainseg-bench-train-") as td:
        tmp = Path(td)
        root, data = load_cached(args.data, tmp)  # the uint8 cache, before any timing
        per = data.slices_per_patient()
        ids = sorted(per)
        val = [min(ids, key=lambda p: (per[p], p))]  # smallest patient: cheap validation
        split = write_split(tmp / "split.yaml", ids, val)
        ds = lgg.discover(root)
        pairs = [(s.image, s.mask) for s in ds.slices if s.patient not in val]
        n_train = len(pairs)
        result["data"] = {
            "root": str(root),
            "patients": len(ids),
            "train_slices": n_train,
            "val_patient": val[0],
            "source_size": list(data.size),
        }
        say(
            f"{len(ids) - 1} training patients, {n_train} slices {data.size[0]}x{data.size[1]} "
            f"-> {args.size}x{args.size}, batch {args.batch}, {args.steps} steps x "
            f"{args.repeats} repetitions, torch threads {torch.get_num_threads()}"
        )
        ref = Reference(pairs, args, decoder)
        names = [REFERENCE] + [v.name for v in chosen]
        runs: dict[str, list[float]] = {n: [] for n in names}
        walls: dict[str, list[float]] = {v.name: [] for v in chosen}

        def one(name: str, steps: int) -> tuple[float, float]:
            if name == REFERENCE:
                return ref.run(steps), math.nan
            v = next(v for v in chosen if v.name == name)
            r = brainseg_run(v, root, split, args, decoder, tmp)
            return r["images_per_s"], r["wall_s"]

        say("warm-up: one untimed repetition of each variant")
        for name in names:
            one(name, min(2, args.steps))
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else list(reversed(names))
            for name in order:
                ips, wall = one(name, args.steps)
                runs[name].append(ips)
                if name != REFERENCE:
                    walls[name].append(wall)
                say(f"rep {rep + 1}/{args.repeats} {name}: {ips:.2f} img/s")

    base = median(runs[REFERENCE])
    base_best = max(runs[REFERENCE])
    rows = []
    variants: dict[str, Any] = {}
    prev: float | None = None
    for name in names:
        m = median(runs[name])
        variants[name] = {
            "images_per_s": m,
            "runs": runs[name],
            "spread": spread(runs[name]),
            "ratio_vs_reference": m / base,
            "best_images_per_s": max(runs[name]),
            "best_ratio_vs_reference": max(runs[name]) / base_best,
            "train_call_wall_s": walls.get(name),
        }
        step = "" if prev is None or name == REFERENCE else f"{m / prev:.2f}x"
        rows.append(
            [
                name,
                f"{m:.2f}",
                f"{spread(runs[name]):.0%}",
                f"{m / base:.2f}x",
                step,
                f"{max(runs[name]):.2f}",
                f"{max(runs[name]) / base_best:.2f}x",
            ]
        )
        prev = m
    result["variants"] = variants
    best_name = "brainseg bf16, channels_last"
    headline = variants.get(best_name) or variants[names[-1]]
    result["targets"] = {
        "headline_variant": best_name if best_name in variants else names[-1],
        "ratio": headline["ratio_vs_reference"],
        "target": TARGET_RATIO,
        "met": headline["ratio_vs_reference"] >= TARGET_RATIO,
        "best_ratio": headline["best_ratio_vs_reference"],
    }
    show(
        f"training throughput, {args.size}x{args.size}, batch {args.batch}, "
        f"{args.steps} steps, median of {args.repeats} (alternating)",
        [
            "variant",
            "images/s",
            "spread",
            "vs reference",
            "vs row above",
            "best images/s",
            "best vs best",
        ],
        rows,
    )
    t = result["targets"]
    say(
        f"{t['headline_variant']}: {t['ratio']:.2f}x the notebook reference "
        f"(target >= {TARGET_RATIO}x: {'met' if t['met'] else 'MISSED'})"
    )
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
