"""Installing brainseg as docs/install.md says, and what a venv without optional packages gets.

The slow test builds the wheel, installs it in a fresh venv with exactly the packages of the
documented CPU-only deployment (no torch), and runs the documented commands there. The fast
tests block one package at a time (``sys.modules[name] = None``, as a venv without it) and
check that the command says in one line what to install, exit 2.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from _tiny import tiny_onnx, write_images

ROOT = Path(__file__).resolve().parents[1]
INSTALL_MD = ROOT / "docs" / "install.md"
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def _deploy_block() -> list[str]:
    """The shell lines of docs/install.md's CPU-only deployment block."""
    text = INSTALL_MD.read_text()
    section = text.split("## CPU-only deployment", 1)[1]
    block = section.split("```", 2)[1]
    return [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]


def _stated_size_mb() -> float:
    text = INSTALL_MD.read_text().split("## CPU-only deployment", 1)[1]
    m = re.search(r"measured size: about (\d+) MB", text, re.IGNORECASE)
    assert m, "docs/install.md must state the deployment venv's measured size"
    return float(m.group(1))


def _du_mb(path: Path) -> float:
    total = sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e6


@pytest.mark.slow
def test_the_documented_cpu_deployment_works_from_a_built_wheel(tmp_path: Path) -> None:
    # the source as a fresh clone has it (tracked and untracked, not ignored files)
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    src = tmp_path / "clone"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    # docs: `pip wheel --no-deps -w dist .`; no build isolation here (no network in tests)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(src / "dist"), str(src)],
        check=True, capture_output=True, cwd=src,
    )  # fmt: skip
    (wheel,) = (src / "dist").glob("brainseg-*.whl")

    env_dir = tmp_path / "deploy"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bindir = env_dir / "bin"
    lines = _deploy_block()
    installs = [ln for ln in lines if ln.startswith("pip install")]
    assert installs and any("--no-deps" in ln for ln in installs), lines
    for line in installs:
        argv = [str(wheel) if a.startswith("dist/brainseg-") else a for a in shlex.split(line)]
        r = subprocess.run(
            [str(bindir / "python"), "-m", *argv], cwd=src, capture_output=True, text=True
        )
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    py = str(bindir / "python")
    absent = subprocess.run(
        [py, "-c", "import importlib.util as u; "
         "print([m for m in ('torch', 'torchvision', 'onnx', 'matplotlib', 'nibabel') "
         "if u.find_spec(m)])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert absent.stdout.strip() == "[]"

    work = tmp_path / "work"
    model = tiny_onnx(work / "model.onnx", image_size=64)
    write_images(work / "scans", 3)
    brainseg = str(bindir / "brainseg")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [brainseg, *args], cwd=work, capture_output=True, text=True, env=ENV, timeout=300
        )

    r = run("--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for name in ("predict", "info", "score", "train", "cache"):
        assert name in r.stdout
    r = run("info", model.name)
    assert r.returncode == 0, r.stderr
    assert "intended use" in r.stdout.lower() or "intended_use" in r.stdout, r.stdout
    r = run("info", model.name, "--json")
    assert r.returncode == 0 and r.stdout.lstrip().startswith("{"), r.stderr
    r = run("predict", model.name, "scans", "-o", "masks")
    assert r.returncode == 0, r.stderr
    assert len(list((work / "masks").rglob("*_mask.tif"))) == 3
    # a volume input there: one line naming what to install, exit 2
    (work / "vol.nii.gz").write_bytes(b"not read")
    r = run("predict", model.name, "vol.nii.gz", "-o", "vmasks")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "pip install nibabel" in r.stderr, r.stderr

    # the size docs/install.md states is the measured one (within 15%)
    stated, measured = _stated_size_mb(), _du_mb(env_dir)
    assert abs(measured - stated) <= 0.15 * stated, f"measured {measured:.0f} MB"


# --------------------------------------------------------------------------- missing packages

BLOCK = (
    "import sys, runpy\n"
    "for m in {mods!r}: sys.modules[m] = None\n"
    "sys.argv = {argv!r}\n"
    "runpy.run_module('brainseg', run_name='__main__')\n"
)


def _without(mods: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = BLOCK.format(mods=mods, argv=["brainseg", *map(str, argv)])
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=ENV,
        timeout=300,
    )  # fmt: skip


def _one_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "internal error" not in r.stderr and "report it" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_info_on_an_onnx_model_needs_only_onnxruntime(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    with_onnx = _without([], ["info", model, "--json"], tmp_path)
    without = _without(["onnx"], ["info", model, "--json"], tmp_path)
    assert with_onnx.returncode == 0, with_onnx.stderr
    assert without.returncode == 0, without.stderr
    assert without.stdout == with_onnx.stdout  # the same card from onnxruntime's modelmeta


def test_info_without_onnx_and_onnxruntime_names_what_to_install(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    r = _without(["onnx", "onnxruntime"], ["info", model], tmp_path)
    _one_line(r, "pip install onnxruntime", "m.onnx")


def test_the_command_without_typer_is_one_line(tmp_path: Path) -> None:
    _one_line(_without(["typer"], ["--help"], tmp_path), "pip install typer rich")


def test_volumes_without_nibabel_name_the_volumes_extra(tmp_path: Path) -> None:
    from _volkit import blob_volume, save_case

    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    save_case(tmp_path / "cases", "c1", blob_volume(shape=(64, 64, 3)))
    r = _without(["nibabel"], ["predict", model, "cases", "-o", "out"], tmp_path)
    _one_line(r, "pip install nibabel SimpleITK", "brainseg[volumes]")


def test_score_without_matplotlib_says_so_before_scoring(
    tmp_path: Path, phantom_root: Path
) -> None:
    r = _without(
        ["matplotlib"],
        ["score", "--pred", phantom_root, "--gt", phantom_root, "--project", tmp_path / "s"],
        tmp_path,
    )
    _one_line(r, "pip install matplotlib")
    assert not (tmp_path / "s").exists()  # refused before any work or folder


def test_eval_without_matplotlib_says_so_before_predicting(
    tmp_path: Path, phantom_root: Path
) -> None:
    model = tiny_onnx(tmp_path / "m.onnx", image_size=64)
    argv = ["eval", model, phantom_root, "--project", tmp_path / "e"]
    r = _without(["matplotlib"], argv, tmp_path)
    _one_line(r, "pip install matplotlib", "brainseg eval")
    assert not (tmp_path / "e").exists()  # refused before any prediction or run folder


def test_no_install_line_in_the_docs_fetches_brainseg_from_pypi() -> None:
    """`brainseg` on PyPI is another project (docs/install.md): every documented install
    line installs from a clone (`.`) or a built wheel, never the name from the index."""
    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if "unrelated" in line:  # the warnings that say not to run it
                continue
            for cmd in re.findall(r"pip install[^`\n]*", line):
                cmd = re.split(r"&&|;|#|\(", cmd)[0]
                if " @ " in cmd:  # a direct reference (a wheel file)
                    continue
                words = [w.strip("'\"") for w in cmd.split()[2:]]
                if any(re.fullmatch(r"brainseg(\[[\w,]+\])?", w) for w in words):
                    bad.append(f"{doc.name}:{n}: {cmd}")
    assert not bad, bad
