"""Security: no pickle on any load path, no code from data files, no secrets in output.

A static scan of src/brainseg (the AST, not a grep: comments and strings do not count)
refuses ``torch.load`` without ``weights_only=True``, pickle-family imports,
``np.load(allow_pickle=True)``, unsafe YAML loaders, ``eval``/``exec``, TorchScript /
torch.hub / torch.package loaders, ``extractall``, shell commands and onnxruntime custom-op
libraries. Runtime tests feed brainseg a malicious pickle where a ``.pth`` is expected and
check the payload never runs, and check a Kaggle key never reaches the terminal.
"""

from __future__ import annotations

import ast
import os
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_cli

from brainseg.errors import BrainsegError

SRC = REPO / "src" / "brainseg"

FORBIDDEN_IMPORTS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
FORBIDDEN_CALLS = {
    "eval": "eval() runs code",
    "exec": "exec() runs code",
    "torch.jit.load": "TorchScript archives hold code",
    "torch.hub.load": "torch.hub.load runs a repository's hubconf.py",
    "torch.package.PackageImporter": "torch.package archives hold code",
    "yaml.load": "use yaml.safe_load",
    "yaml.unsafe_load": "use yaml.safe_load",
    "yaml.full_load": "use yaml.safe_load",
    "os.system": "no shell commands",
    "os.popen": "no shell commands",
    "marshal.loads": "marshal loads code objects",
    "register_custom_ops_library": "onnxruntime custom-op libraries are native code",
}


def _name(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain, ``f`` for a name, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _const(call: ast.Call, key: str) -> Any:
    for kw in call.keywords:
        if kw.arg == key:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return "<absent>"


def scan(path: Path) -> list[str]:
    """The security problems in one source file, as ``file:line: what`` strings."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for m in mods:
                if m and m.split(".")[0] in FORBIDDEN_IMPORTS:
                    found.append(f"{rel}:{node.lineno}: imports {m}")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        short = name.split(".")[-1]
        if name.endswith("torch.load") and _const(node, "weights_only") is not True:
            found.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
        numpy_load = short == "load" and name.split(".")[0] in ("np", "numpy")
        if numpy_load and _const(node, "allow_pickle") not in (False, "<absent>"):
            found.append(f"{rel}:{node.lineno}: np.load with allow_pickle")
        if name in FORBIDDEN_CALLS or short == "register_custom_ops_library":
            found.append(f"{rel}:{node.lineno}: {name}: {FORBIDDEN_CALLS.get(name, short)}")
        if short == "extractall":
            found.append(f"{rel}:{node.lineno}: extractall (use data.download.safe_extract)")
        if short in ("run", "Popen", "call", "check_call", "check_output") and (
            _const(node, "shell") not in (False, "<absent>")
        ):
            found.append(f"{rel}:{node.lineno}: subprocess with shell=True")
    return found


def test_the_scanner_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np, tarfile\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "yaml.load('x')\neval('1')\ntarfile.open('x').extractall()\n"
        "import subprocess\nsubprocess.run('ls', shell=True)\ntorch.jit.load('m.pt')\n"
        "torch.load('ok', weights_only=True)\nnp.load('ok')\nyaml.safe_load('ok')\n",
        encoding="utf-8",
    )
    found = scan(bad)
    assert len(found) == 9, found


def test_no_pickle_or_code_loading_anywhere_in_the_package() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in scan(f)]
    assert problems == [], "\n".join(problems)


# --------------------------------------------------------------------------- runtime


class _Payload:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil_pth(tmp_path: Path) -> tuple[Path, Path]:
    """A torch-style .pth whose pickle runs ``os.mkdir(marker)`` when loaded unsafely."""
    import torch

    marker = tmp_path / "PWNED"
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({"features.0.weight": _Payload(marker)}, path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    return path, marker


def test_malicious_pth_as_encoder_weights_never_runs(evil_pth: tuple[Path, Path]) -> None:
    from brainseg.model.unet import UNetVGG16

    path, marker = evil_pth
    with pytest.raises(BrainsegError):
        UNetVGG16(encoder_weights=str(path))
    assert not marker.exists()
    r = run_cli(["download", "vgg16", "--from-file", path])  # the hash check refuses it first
    assert r.returncode == 2 and not marker.exists(), r.stderr


def test_malicious_pth_never_runs_in_the_weights_check(evil_pth: tuple[Path, Path]) -> None:
    from brainseg.model.weights import check_vgg_state_dict

    path, marker = evil_pth
    with pytest.raises(BrainsegError, match="loads safely"):
        check_vgg_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_pickles_named_as_models_are_refused(
    evil_pth: tuple[Path, Path], tmp_path: Path, suffix: str
) -> None:
    path, marker = evil_pth
    fake = tmp_path / f"model{suffix}"
    fake.write_bytes(path.read_bytes())
    (tmp_path / "scans").mkdir()
    r = run_cli(["predict", fake, tmp_path / "scans", "-o", tmp_path / "out"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


class _Refuse(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def refusing_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/lgg.zip"
    httpd.shutdown()
    httpd.server_close()


def test_the_kaggle_key_never_reaches_the_terminal(refusing_server: str, tmp_path: Path) -> None:
    from brainseg.data.download import KaggleCredentials

    key = "s3cr3t-kaggle-key-0123456789"
    assert key not in repr(KaggleCredentials("me", key, "env"))
    env = {
        "KAGGLE_USERNAME": "me",
        "KAGGLE_KEY": key,
        "NO_PROXY": "*",
        "HTTP_PROXY": "",
        "http_proxy": "",
    }
    for debug in ([], ["--debug"]):
        r = run_cli(
            [
                *debug,
                "download",
                "lgg",
                "--url",
                refusing_server,
                "--kaggle-auth",
                "--dest",
                tmp_path,
            ],
            env=env,
        )
        assert r.returncode == 1, r.stderr
        assert "401" in r.stderr
        assert key not in r.stderr + r.stdout  # not even in --debug tracebacks


# --------------------------------------------------------------------------- hostile ONNX models


def _onnx_variant(path: Path, *, meta: dict[str, str] | None = None, pool: bool = False) -> Path:
    """tests/_tiny.py's model with its brainseg metadata entries replaced by ``meta`` (raw
    strings), or with a 2x2 max-pool after the convolution (output half the input size)."""
    import onnx
    from _tiny import tiny_onnx
    from onnx import helper

    tiny_onnx(path)
    model = onnx.load(str(path))
    if meta is not None:
        for entry in model.metadata_props:
            if entry.key in meta:
                entry.value = meta[entry.key]
    if pool:
        graph = model.graph
        graph.node[0].output[0] = "conv"
        graph.node.append(
            helper.make_node("MaxPool", ["conv"], ["logits"], kernel_shape=[2, 2], strides=[2, 2])
        )
    onnx.save(model, str(path))
    return path


def _meta_json(**changes: Any) -> str:
    import json

    base = {"image_size": 64, "threshold": 0.5, "normalization": "imagenet", "format_version": 1}
    return json.dumps({**base, **changes})


@pytest.mark.parametrize(
    ("case", "kwargs", "message"),
    [
        ("config-list", {"meta": {"brainseg": _meta_json(config=[1, 2])}}, "config in its"),
        ("metrics-string", {"meta": {"brainseg": _meta_json(metrics="x")}}, "metrics in its"),
        (
            "postprocess-list",
            {"meta": {"brainseg": _meta_json(postprocess=[1])}},
            "postprocess in its",
        ),
        (
            "nested-5000",
            {"meta": {"brainseg": _meta_json()[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"}},
            "nested too deeply",
        ),
        (
            "nested-100",
            {"meta": {"brainseg": _meta_json()[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}"}},
            "nested more than 32 levels",
        ),
        ("image-size-16384", {"meta": {"brainseg": _meta_json(image_size=16384)}}, "image_size"),
        ("output-half-size", {"pool": True}, "the model's output is"),
    ],
)
def test_hostile_onnx_models_are_one_line_errors(
    tmp_path: Path, case: str, kwargs: dict[str, Any], message: str
) -> None:
    """issue 22: metadata whose config / metrics / postprocess is a list or a string, nested
    thousands deep (RecursionError), an image_size of 16384 (6 GiB for two 64x64 images)
    and a graph whose output is smaller than its input were "internal error" exits or
    accepted. Each is now one line naming the file, exit 2."""
    from _tiny import write_images

    model = _onnx_variant(tmp_path / f"{case}.onnx", **kwargs)
    write_images(tmp_path / "scans", 2)
    runs = [["predict", model, tmp_path / "scans", "-o", tmp_path / "out"]]
    if case != "output-half-size":  # the graph's output size shows only when it runs
        runs.append(["info", model])
    for args in runs:
        r = run_cli(args)
        assert r.returncode == 2, (args[0], r.stderr)
        assert message in r.stderr and str(model) in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr


YAML_READERS = ("safe_load", "safe_load_all", "load", "load_all", "compose", "parse")


def test_every_yaml_read_goes_through_the_one_loader() -> None:
    """issue 22: --config used yaml.safe_load with no limits (an alias bomb hung) while the
    split reader refused the same file. Only brainseg/yamlio.py may parse YAML."""
    found = []
    for f in sorted(SRC.rglob("*.py")):
        if f.name == "yamlio.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            name = _name(node.func) if isinstance(node, ast.Call) else ""
            if name.startswith("yaml.") and name.split(".")[-1] in YAML_READERS:
                found.append(f"{f.relative_to(SRC)}:{node.lineno}: {name}")
    assert found == [], found
