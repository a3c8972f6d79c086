"""Path safety: archive members that try to leave the folder (``..``, absolute paths, links,
drive letters, backslashes), predict outputs that could escape ``-o`` through an input's
path (``../x``, absolute, globs, stdin, symlinked folders), and symlink loops in input
folders (predict and the dataset reader must finish, each file once).
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from _reliability import count_case, scale
from _tiny import encode, image, tiny_onnx
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import time_limit

from brainseg.data.download import safe_extract
from brainseg.errors import BrainsegError

# --------------------------------------------------------------------------- archives

_PARTS = ["..", ".", "", "a", "b", "C:", "c:\\x", "..\\..", "\\", "~", "x\x00y", "…"]


def _zip(members: list[tuple[str, int | None]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, b"../../outside" if mode == stat.S_IFLNK | 0o777 else b"data")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = "../../outside"
                tf.addfile(ti)
            else:
                ti.size = 4
                tf.addfile(ti, io.BytesIO(b"data"))
    return buf.getvalue()


#: Deep enough that any chain of ``..`` a generated name can hold (5 parts, ``..\\..`` counts
#: twice) still lands inside the sandbox, where the snapshot sees it.
_DEPTH = 12
_ABSOLUTE = [Path("/etc/x"), Path("/x"), Path("/tmp/evil")]


def _sandbox(base: Path) -> tuple[Path, Path]:
    """``(sandbox, dest)``: dest buried ``_DEPTH`` folders deep, with bystander files around."""
    sandbox = base / "sandbox"
    deep = sandbox.joinpath(*[f"l{i}" for i in range(_DEPTH)])
    deep.mkdir(parents=True)
    for i, folder in enumerate([sandbox, deep, deep.parent]):
        (folder / f"bystander{i}").write_bytes(b"untouched")
    return sandbox, deep / "dest"


def _snapshot(sandbox: Path, dest: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``sandbox`` outside ``dest``: kind, size, content hash, mtime."""
    import hashlib

    out: dict[str, tuple[object, ...]] = {}
    for p in sorted(sandbox.rglob("*")):
        if p == dest or dest in p.parents:
            continue
        st_ = p.lstat()
        data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        mtime = st_.st_mtime_ns if p.is_file() else None  # a folder's changes as dest appears
        out[str(p.relative_to(sandbox))] = (stat.S_IFMT(st_.st_mode), st_.st_size, data, mtime)
    return out


def _extract_in_sandbox(archive_bytes: bytes, base: Path) -> tuple[Path, BaseException | None]:
    """Run safe_extract with cwd inside the sandbox; assert nothing outside dest changed,
    whether it raised or not. Returns ``(dest, the BrainsegError or None)``."""
    sandbox, dest = _sandbox(base)
    archive = sandbox / "archive"
    archive.write_bytes(archive_bytes)
    before = _snapshot(sandbox, dest)
    absent = [p for p in _ABSOLUTE if not p.exists()]
    cwd = os.getcwd()
    err: BaseException | None = None
    try:
        os.chdir(dest.parent)  # a name written relative to the cwd would land in the sandbox
        safe_extract(archive, dest)
    except BrainsegError as exc:
        err = exc
    finally:
        os.chdir(cwd)
    assert _snapshot(sandbox, dest) == before  # on both paths: no byte outside dest
    assert [p for p in absent if p.exists()] == []  # and no absolute path was written
    if dest.exists():
        real = os.path.realpath(dest)
        for p in dest.rglob("*"):
            assert os.path.realpath(p).startswith(real + os.sep), p
            assert not p.is_symlink(), p
    return dest, err


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=scale(150))
@given(
    names=st.lists(
        st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5).map("/".join)
        | st.sampled_from(["/etc/x", "//x", "C:/x", "\\\\server\\x", "a/../../x", "a/./b"]),
        min_size=1,
        max_size=4,
    ),
    kinds=st.lists(st.sampled_from(["file", "dir", "symlink", "fifo", "hardlink"]), max_size=4),
    tar=st.booleans(),
)
def test_archive_members_never_land_outside(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], kinds: list[str], tar: bool
) -> None:
    base = tmp_path_factory.mktemp("x")
    kinds = kinds + ["file"] * (len(names) - len(kinds))
    if tar:
        tkind = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "symlink": tarfile.SYMTYPE,
            "fifo": tarfile.FIFOTYPE,
            "hardlink": tarfile.LNKTYPE,
        }
        data = _tar([(n, tkind[k]) for n, k in zip(names, kinds, strict=False)])
    else:
        zmode = {
            "file": stat.S_IFREG | 0o644,
            "dir": stat.S_IFDIR | 0o755,
            "symlink": stat.S_IFLNK | 0o777,
            "fifo": stat.S_IFIFO | 0o644,
            "hardlink": None,
        }
        data = _zip([(n, zmode[k]) for n, k in zip(names, kinds, strict=False)])
    with time_limit(30):
        _dest, err = _extract_in_sandbox(data, base)
    count_case("safe_extract: hostile member names and types", "error" if err else "ok")


def test_each_kind_of_escape_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    cases = {
        "dotdot": _zip([("ok.txt", None), ("a/../../evil", None)]),
        "absolute": _zip([("ok.txt", None), ("/tmp/evil", None)]),
        "drive": _zip([("ok.txt", None), ("C:/evil", None)]),
        "backslash": _zip([("ok.txt", None), ("..\\..\\evil", None)]),
        "zip symlink": _zip([("ok.txt", None), ("link", stat.S_IFLNK | 0o777)]),
        "tar symlink": _tar([("ok.txt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)]),
        "tar hardlink": _tar([("ok.txt", tarfile.REGTYPE), ("link", tarfile.LNKTYPE)]),
        "tar device": _tar([("ok.txt", tarfile.REGTYPE), ("dev", tarfile.CHRTYPE)]),
    }
    for case, data in cases.items():
        dest, err = _extract_in_sandbox(data, tmp_path / case)
        assert isinstance(err, BrainsegError) and "unsafe archive" in err.message, case
        assert "nothing was extracted" in err.message, case
        assert not dest.exists() or not any(dest.iterdir()), case  # not even ok.txt


def test_a_link_already_in_the_destination_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside, target_is_directory=True)
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip([("sub/evil.txt", None)]))
    with pytest.raises(BrainsegError, match="outside"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- predict outputs


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx(tmp_path_factory.mktemp("model") / "m.onnx")


def _written(out: Path) -> list[str]:
    real = os.path.realpath(out)
    files = []
    for p in out.rglob("*"):
        if p.is_file():
            assert os.path.realpath(p).startswith(real + os.sep), f"{p} escaped {out}"
            files.append(str(p.relative_to(out)))
    return sorted(files)


def test_predict_outputs_stay_in_the_output_folder(model: Path, tmp_path: Path) -> None:
    """Inputs named with ``..``, absolute paths, globs with ``..`` and stdin paths."""
    outside = tmp_path / "elsewhere" / "deep"
    outside.mkdir(parents=True)
    (outside / "x.png").write_bytes(encode(image(1), "png"))
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "y.png").write_bytes(encode(image(2), "png"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    forms = [
        ["../../elsewhere/deep/x.png"],
        [str(outside / "x.png")],
        ["../../elsewhere/*/x.png"],
        ["../../elsewhere/deep"],
        ["-"],
    ]
    for i, args in enumerate(forms):
        out = tmp_path / "work" / f"out{i}"
        r = run_cli(
            ["predict", model, *args, "-o", out, "--json"],
            cwd=work,
            input="../../elsewhere/deep/x.png\n" + str(work / "y.png") + "\n",
        )
        assert r.returncode == 0, (args, r.stderr)
        rows = [json.loads(x) for x in r.stdout.splitlines()]
        assert rows and all(x["status"] == "ok" for x in rows), rows
        files = _written(out)
        assert files and all(not f.startswith("..") for f in files), files
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert all("/work/out" in p for p in new), [p for p in new if "/work/out" not in p]


def test_symlinked_folders_inside_the_output_are_refused(model: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans" / "sub"
    scans.mkdir(parents=True)
    (scans / "a.png").write_bytes(encode(image(3), "png"))
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)  # planted in the output
    r = run_cli(["predict", model, tmp_path / "scans", "-o", out])
    assert r.returncode == 2 and "outside" in r.stderr, r.stderr  # refused before any write
    assert list(outside.iterdir()) == []


def test_symlink_loops_in_inputs_finish_and_list_each_file_once(
    model: Path, tmp_path: Path
) -> None:
    scans = tmp_path / "scans"
    (scans / "a" / "b").mkdir(parents=True)
    for i, folder in enumerate([scans, scans / "a", scans / "a" / "b"]):
        (folder / f"s{i}.png").write_bytes(encode(image(i), "png"))
    (scans / "loop").symlink_to(scans, target_is_directory=True)  # -> itself
    (scans / "a" / "b" / "up").symlink_to(scans / "a", target_is_directory=True)  # -> parent
    (scans / "a" / "self").symlink_to(scans / "a" / "self")  # a link to itself
    (scans / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with time_limit(120):
        r = run_cli(["predict", model, scans, "-o", tmp_path / "out", "--json"], timeout=120)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    ok = sorted(Path(x["path"]).name for x in rows if x["status"] == "ok")
    assert ok == ["s0.png", "s1.png", "s2.png"], rows  # each real file once
    assert [Path(x["path"]).name for x in rows if x["status"] == "error"] == ["dangling.png"]
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_dataset_with_symlink_loops_is_read_without_hanging(
    phantom_root: Path, tmp_path: Path
) -> None:
    import shutil

    from brainseg.data.cache import load_dataset

    root = tmp_path / "kaggle_3m"
    shutil.copytree(phantom_root, root)
    patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (patient / "loop").symlink_to(root, target_is_directory=True)
    (root / "again").symlink_to(root, target_is_directory=True)
    with time_limit(120):
        try:
            data = load_dataset(root, cache_dir=tmp_path / "cache", skip_bad=True)
        except BrainsegError as exc:  # refusing is fine; hanging or crashing is not
            assert "again" in exc.message or "loop" in exc.message
            return
    assert len(data.patient_ids) >= 6


# --------------------------------------------------------------------------- run folders


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", ["score", "eval"])
def test_run_folders_never_leave_the_project(
    model: Path, phantom_root: Path, tmp_path: Path, command: str
) -> None:
    """`--name ..`, `--name /abs/path` etc. are refused (exit 2, one line) before any work,
    by eval and score as by train; nothing is written anywhere."""
    work = tmp_path / "work"
    masks = work / "masks"
    masks.mkdir(parents=True)
    (masks / "p_1_mask.png").write_bytes(encode(image(1)[..., 0] * 0, "png"))
    before = _tree(tmp_path)
    if command == "score":
        args = ["score", "--pred", masks, "--gt", masks]
    else:
        args = ["eval", model, phantom_root, "--device", "cpu"]
    # ("/" is covered in test_fsutil: here, before the fix, it would write into the real /)
    for name in ["..", ".", "a/b", str(tmp_path / "elsewhere"), ""]:
        r = run_cli([*args, "--project", "proj", "--name", name, "--exist-ok"], cwd=work)
        assert r.returncode == 2, (name, r.stderr)
        assert "run name must be a plain folder name" in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr
        assert _tree(tmp_path) == before, (name, r.stderr)


# --------------------------------------------------------------------------- device targets


def test_split_never_replaces_a_device_fifo_or_link_and_writes_to_stdout(
    phantom_root: Path, tmp_path: Path
) -> None:
    from test_fsutil import _kind, _special_targets

    targets = _special_targets(tmp_path)
    before = {k: _kind(p) for k, p in targets.items()}
    for name, target in targets.items():
        r = run_cli(["split", phantom_root, "-o", target, "--force"], cwd=tmp_path, timeout=120)
        assert r.returncode == 2, (name, r.stderr)
        assert "not a regular file" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    assert {k: _kind(p) for k, p in targets.items()} == before
    assert (tmp_path / "real.yaml").read_text() == "mine"
    r = run_cli(["split", phantom_root, "-o", tmp_path / "s.yaml", "--seed", "3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["split", phantom_root, "-o", "-", "--seed", "3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (tmp_path / "s.yaml").read_text()  # the YAML and nothing else
    assert "patients" in r.stderr  # the table went to stderr
    assert not (tmp_path / "-").exists()
