"""Models from the Hugging Face Hub (``hf://OWNER/NAME[@REVISION][/FILE]``) and the folder
``brainseg export --hub-folder`` writes for ``huggingface-cli upload``.

The Hub is a local HTTP server (``FakeHub``) serving folders in the Hub's
``/{repo}/resolve/{revision}/{file}`` layout with the headers huggingface_hub reads (ETag,
X-Repo-Commit, Content-Length; X-Linked-Etag / X-Linked-Size and a Location redirect for a
model file, as the Hub does for LFS files; X-Error-Code on a 404), reached through
``HF_ENDPOINT`` as a Hub mirror is. The real ``huggingface_hub`` client downloads into
``HF_HOME`` under tmp_path; the CLI runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import tifffile
from _tiny import tiny_onnx, write_images
from conftest import run_cli, serve_http

pytest.importorskip("huggingface_hub")

COMMIT_V1 = "1" * 40
COMMIT_V2 = "2" * 40


class FakeHub:
    """What the server serves: repo -> {commit -> folder}, and refs (branch / tag -> commit)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[str] = []

    def add(self, repo: str, folder: Path, commit: str, *refs: str) -> None:
        self.repos.setdefault(repo, {})[commit] = folder
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = commit


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def _error(self, code: str, commit: str | None = None) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool) -> None:
        hub: FakeHub = self.server.state  # type: ignore[attr-defined]
        path = unquote(self.path.split("?")[0])
        hub.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[0] == "cdn":  # where a model file redirects to
            folder = hub.repos[f"{parts[1]}/{parts[2]}"][parts[3]]
            self._send_file(folder / "/".join(parts[4:]), body)
            return
        if len(parts) < 5 or parts[2] != "resolve":
            self._error("RepoNotFound")
            return
        repo, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        if repo not in hub.repos:
            self._error("RepoNotFound")
            return
        commit = hub.refs.get(repo, {}).get(revision, revision)
        if commit not in hub.repos[repo]:
            self._error("RevisionNotFound")
            return
        file = hub.repos[repo][commit] / name
        if not file.is_file():
            self._error("EntryNotFound", commit)
            return
        data = file.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        lfs = file.suffix in (".safetensors", ".onnx")
        if lfs:  # a model file is an LFS file: the Hub redirects to its CDN (another host)
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/cdn/{repo}/{commit}/{name}")
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", "0")
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if body and not lfs:
            self.wfile.write(data)

    def _send_file(self, file: Path, body: bool) -> None:
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)


def hub_env(home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_TOKEN": "",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    """acme/tiny: v1 (threshold 0.3) and main (threshold 0.7), model.onnx only."""
    fake = FakeHub()
    for commit, threshold, refs in ((COMMIT_V1, 0.3, ("v1",)), (COMMIT_V2, 0.7, ("main",))):
        folder = tmp_path / "hub-repos" / "acme" / "tiny" / commit
        tiny_onnx(folder / "model.onnx", threshold=threshold)
        fake.add("acme/tiny", folder, commit, *refs)
    return fake


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    write_images(folder, 4, fmt="tif")
    return folder


def _masks(out: Path) -> dict[str, np.ndarray]:
    found = {p.name: tifffile.imread(p) for p in sorted(out.glob("*_mask.tif"))}
    assert found, f"no masks in {out}"
    return found


def _same_masks(a: Path, b: Path) -> None:
    ma, mb = _masks(a), _masks(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)


def _one_line_error(res: object, code: int, *words: str) -> str:
    err = res.stderr  # type: ignore[attr-defined]
    assert res.returncode == code, err  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def _card_threshold(res: object) -> float:
    assert res.returncode == 0, res.stderr  # type: ignore[attr-defined]
    return float(json.loads(res.stdout)["preprocessing"]["threshold"])  # type: ignore[attr-defined]


def test_predict_hf_gives_the_masks_of_the_local_file(
    hub: FakeHub, images: Path, tmp_path: Path
) -> None:
    with serve_http(HubHandler, hub) as url:
        env = hub_env(tmp_path / "hf", url)
        res = run_cli(["predict", "hf://acme/tiny", images, "-o", tmp_path / "a"], env=env)
        assert res.returncode == 0, res.stderr
    local = hub.repos["acme/tiny"][COMMIT_V2] / "model.onnx"
    res = run_cli(["predict", local, images, "-o", tmp_path / "b"])
    assert res.returncode == 0, res.stderr
    _same_masks(tmp_path / "a", tmp_path / "b")
    # the default file: model.safetensors is looked for first, then model.onnx
    asked = [r for r in hub.requests if r.startswith("HEAD /acme/tiny/resolve")]
    assert asked[0].endswith("/main/model.safetensors") and asked[-1].endswith("/model.onnx")
    # the file sits in huggingface_hub's cache under HF_HOME
    cached = list((tmp_path / "hf" / "hub").glob("models--acme--tiny/snapshots/*/model.onnx"))
    assert [p.parent.name for p in cached] == [COMMIT_V2]


def test_revision_pinning(hub: FakeHub, tmp_path: Path) -> None:
    with serve_http(HubHandler, hub) as url:
        env = hub_env(tmp_path / "hf", url)
        info = lambda ref: run_cli(["info", ref, "--json"], env=env)  # noqa: E731
        assert _card_threshold(info("hf://acme/tiny")) == pytest.approx(0.7)
        assert _card_threshold(info("hf://acme/tiny@main/model.onnx")) == pytest.approx(0.7)
        assert _card_threshold(info("hf://acme/tiny@v1/model.onnx")) == pytest.approx(0.3)
        assert _card_threshold(info(f"hf://acme/tiny@{COMMIT_V1}")) == pytest.approx(0.3)


def test_unknown_revision_repo_and_file_are_one_line_errors(hub: FakeHub, tmp_path: Path) -> None:
    with serve_http(HubHandler, hub) as url:
        env = hub_env(tmp_path / "hf", url)
        res = run_cli(["info", "hf://acme/tiny@nope"], env=env)
        _one_line_error(res, 2, "nope", "acme/tiny", "hint:")
        res = run_cli(["info", "hf://acme/tiny/other.onnx"], env=env)
        _one_line_error(res, 2, "other.onnx", "acme/tiny", "hint:")
        res = run_cli(["info", "hf://acme/missing"], env=env)
        _one_line_error(res, 2, "acme/missing", "hint:")
        # not a model file name: refused before anything is downloaded
        n = len(hub.requests)
        res = run_cli(["info", "hf://acme/tiny/README.md"], env=env)
        _one_line_error(res, 2, "README.md")
        assert len(hub.requests) == n
        res = run_cli(["info", "hf://acme"], env=env)
        _one_line_error(res, 2, "hf://acme", "OWNER/NAME")


def test_cache_serves_when_the_server_is_gone(hub: FakeHub, images: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    with serve_http(HubHandler, hub) as url:
        ref = "hf://acme/tiny@v1/model.onnx"
        res = run_cli(["predict", ref, images, "-o", tmp_path / "a"], env=hub_env(home, url))
        assert res.returncode == 0, res.stderr
    # the server has stopped: offline mode reads the cache, no request is made
    offline = hub_env(home, url, offline=True)
    res = run_cli(["predict", ref, images, "-o", tmp_path / "b"], env=offline)
    assert res.returncode == 0, res.stderr
    _same_masks(tmp_path / "a", tmp_path / "b")
    # without HF_HUB_OFFLINE the unreachable server falls back to the cache too
    assert _card_threshold(run_cli(["info", ref, "--json"], env=hub_env(home, url))) == 0.3
    # a file never downloaded: one line, exit 1 (a runtime failure, not bad input)
    res = run_cli(["info", "hf://acme/tiny@main/model.onnx"], env=offline)
    _one_line_error(res, 1, "hf://acme/tiny@main/model.onnx", "HF_HUB_OFFLINE", "hint:")
    res = run_cli(["info", "hf://acme/tiny@main/model.onnx"], env=hub_env(home, url))
    _one_line_error(res, 1, "hf://acme/tiny@main/model.onnx", "hint:")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "Git LFS"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>\n", "text file"),
    ],
)
def test_corrupt_file_is_refused(content: bytes, words: str, images: Path, tmp_path: Path) -> None:
    fake = FakeHub()
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(content)
    fake.add("acme/broken", folder, COMMIT_V1, "main")
    with serve_http(HubHandler, fake) as url:
        env = hub_env(tmp_path / "hf", url)
        res = run_cli(["predict", "hf://acme/broken", images, "-o", tmp_path / "o"], env=env)
        _one_line_error(res, 2, "hf://acme/broken", words)
        assert not list((tmp_path / "o").glob("*_mask.tif"))


def test_eval_and_export_take_hf(hub: FakeHub, phantom_root: Path, tmp_path: Path) -> None:
    local = hub.repos["acme/tiny"][COMMIT_V2] / "model.onnx"
    with serve_http(HubHandler, hub) as url:
        env = hub_env(tmp_path / "hf", url)
        summaries = []
        for model, name in (("hf://acme/tiny", "hub"), (local, "local")):
            args = ["eval", model, phantom_root, "--project", tmp_path / "runs", "--name", name]
            res = run_cli([*args, "--json"], env=env)
            assert res.returncode == 0, res.stderr
            summaries.append(json.loads(res.stdout))
        assert summaries[0]["per_patient"] == summaries[1]["per_patient"]
        assert summaries[0]["per_patient"]["dice"]["mean"] > 0
        # export resolves hf:// too (here to the repository's ONNX file, which it refuses)
        res = run_cli(["export", "hf://acme/tiny", "-o", tmp_path / "x.onnx"], env=env)
        _one_line_error(res, 2, "is an ONNX model; export takes a .safetensors checkpoint")
        assert any(r.endswith("/main/model.onnx") for r in hub.requests)


# --------------------------------------------------------------------------- --hub-folder


def _checkpoint_with_card(dest: Path, phantom_root: Path) -> Path:
    """A small checkpoint whose card says: single split, 4 training + 2 validation patients."""
    from test_export import _checkpoint

    from brainseg.model import card as mc
    from brainseg.model.checkpoint import copy_with_metadata, read_metadata

    src = _checkpoint(dest.with_name("raw.safetensors"), phantom_root)
    meta = read_metadata(src)
    split = {
        "kind": "single patient-level split",
        "fold": None,
        "train_patients": 4,
        "val_patients": 2,
        "test_patients": 0,
        "val_patient_ids": ["P5", "P6"],
        "train_patient_ids": ["P1", "P2", "P3", "P4"],
        "dataset_hash": "abc",
    }
    card = mc.with_card(meta, selection="best", split=split)[mc.CARD_KEY]
    return copy_with_metadata(src, dest, {mc.CARD_KEY: card})


def _front_matter(readme: Path) -> dict[str, object]:
    import yaml

    text = readme.read_text()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    assert "# brainseg UNet-VGG16" in body  # the model card follows
    doc = yaml.safe_load(head)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.slow  # one torch -> ONNX export (~20 s on 2 shared cores)
def test_hub_folder_round_trip(phantom_root: Path, images: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint_with_card(tmp_path / "ckpt" / "best.safetensors", phantom_root)
    folder = tmp_path / "to-upload"
    res = run_cli(["export", ckpt, "--hub-folder", folder, "--verify-data", phantom_root])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.safetensors",
    ]  # fmt: skip
    meta = _front_matter(folder / "README.md")
    assert meta["library_name"] == "brainseg"
    assert meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] and meta["datasets"]
    results = meta["model-index"][0]["results"]  # type: ignore[index]
    dice = [m for r in results for m in r["metrics"] if m["type"] == "dice"]
    assert [m["value"] for m in dice] == [0.71]  # the checkpoint's own figure, not invented
    args = results[0]["dataset"]["args"]
    assert args == {"protocol": "held-out", "patients": 2, "checkpoint": "best"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_file"] == "model.safetensors" and config["onnx_file"] == "model.onnx"
    # brainseg info reads the folder
    res = run_cli(["info", folder, "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["eval_metrics"]["val_dice_patient"] == 0.71
    # served as a Hub repo, the folder predicts what the local checkpoint predicts
    fake = FakeHub()
    fake.add("acme/exported", folder, COMMIT_V1, "main")
    with serve_http(HubHandler, fake) as url:
        env = hub_env(tmp_path / "hf", url)
        for ref, out in (("hf://acme/exported", "a"), ("hf://acme/exported/model.onnx", "c")):
            res = run_cli(["predict", ref, images, "-o", tmp_path / out], env=env)
            assert res.returncode == 0, res.stderr
    res = run_cli(["predict", ckpt, images, "-o", tmp_path / "b"])
    assert res.returncode == 0, res.stderr
    _same_masks(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "hf" / "hub" / "models--acme--exported").is_dir()


def test_front_matter_figures_come_from_the_card() -> None:
    from brainseg.export.hubfolder import front_matter

    # no split recorded: the figure without a patient count (never an invented one)
    card = {"eval_metrics": {"val_dice_patient": 0.5, "val_loss": 0.2}, "training": {}}
    res = front_matter(card)["model-index"][0]["results"]
    assert res[0]["dataset"]["args"] == {"protocol": "held-out"}
    assert [m["value"] for m in res[0]["metrics"]] == [0.5]
    # an ensemble's cross-validation figure: protocol cv, the patients of the cv
    card = {
        "eval_metrics": {
            "cv_out_of_fold_dice_patient_before_tuning": None,
            "cv_out_of_fold_dice_patient_after_tuning": 0.8,
        },
        "evaluation": {"patients": 6},
        "training": {"checkpoint": "last"},
    }
    res = front_matter(card)["model-index"][0]["results"]
    assert res[0]["dataset"]["args"] == {"protocol": "cv", "patients": 6, "checkpoint": "last"}
    assert [m["value"] for m in res[0]["metrics"]] == [0.8]
    # no figure at all: no model-index (the Hub needs metrics in one)
    assert "model-index" not in front_matter({"eval_metrics": {}})


def test_hub_folder_refuses_to_overwrite_and_o_together(tmp_path: Path) -> None:
    folder = tmp_path / "up"
    folder.mkdir()
    (folder / "README.md").write_text("mine\n")
    ckpt = tmp_path / "m.safetensors"
    res = run_cli(["export", ckpt, "--hub-folder", folder])
    _one_line_error(res, 2, "already holds README.md", "--force")
    res = run_cli(["export", ckpt, "--hub-folder", tmp_path / "new", "-o", tmp_path / "x.onnx"])
    _one_line_error(res, 2, "give one of them")
    res = run_cli(["export", ckpt])
    _one_line_error(res, 2, "--output", "--hub-folder")
    assert (folder / "README.md").read_text() == "mine\n"


@pytest.mark.parametrize(
    ("ref", "repo", "revision", "filename"),
    [
        ("hf://acme/tiny", "acme/tiny", None, None),
        ("hf://models/acme/tiny@v1", "acme/tiny", "v1", None),
        ("hf://acme/tiny@refs/pr/3/fold0/model.onnx", "acme/tiny", "refs/pr/3", "fold0/model.onnx"),
        (
            Path("hf://acme/tiny@main/model.onnx"),
            "acme/tiny",
            "main",
            "model.onnx",
        ),  # hf:/ in a Path
    ],
)
def test_parse_ref(ref: object, repo: str, revision: str | None, filename: str | None) -> None:
    from brainseg.model.hub import parse_ref

    got = parse_ref(ref)  # type: ignore[arg-type]
    assert (got.repo_id, got.revision, got.filename) == (repo, revision, filename)


@pytest.mark.parametrize(
    "ref", ["hf://acme", "hf://acme/tiny@", "hf://datasets/acme/x", "hf://acme/tiny/../x.onnx"]
)
def test_malformed_ref_is_exit_2(ref: str) -> None:
    from brainseg.errors import BrainsegError
    from brainseg.model.hub import parse_ref

    with pytest.raises(BrainsegError, match="hf://OWNER/NAME"):
        parse_ref(ref)


def test_without_huggingface_hub_one_line_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from brainseg.errors import BrainsegError
    from brainseg.model.hub import download, parse_ref

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(BrainsegError, match=r"brainseg\[hub\]") as exc:
        download(parse_ref("hf://acme/tiny"))
    assert "\n" not in str(exc.value)
