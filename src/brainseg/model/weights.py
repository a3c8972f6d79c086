"""torchvision's ImageNet VGG16(-BN) weights: ``brainseg download vgg16`` installs them into
the torch hub cache, hash-checked and loaded safely, so training can start offline."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from brainseg import console as con
from brainseg.data.download import DownloadOptions, DownloadResult
from brainseg.data.http import (
    DEFAULT_BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    check_url,
    http_fetch,
    sha256_file,
)
from brainseg.errors import BrainsegError, BrainsegRuntimeError
from brainseg.fsutil import atomic_path
from brainseg.model.unet import imagenet_weights_path, load_vgg_features, vgg16_weights_url


def install_vgg16(opts: DownloadOptions) -> DownloadResult:
    """The ``brainseg download vgg16`` job: install the weights ``opts`` name, say where."""
    path = download_vgg16(
        bn=opts.bn,
        from_file=opts.from_file,
        url=opts.url,
        force=opts.force,
        retries=opts.retries,
        backoff=opts.backoff,
        timeout=opts.timeout,
    )
    return DownloadResult(path, extra={"encoder": "vgg16_bn" if opts.bn else "vgg16"})


def expected_hash_prefix(file_name: str) -> str:
    """The sha256 prefix torch.hub encodes in names like ``vgg16-397923af.pth``."""
    stem = file_name.rsplit("-", 1)[-1].split(".", 1)[0] if "-" in file_name else ""
    if len(stem) < 8 or not re.fullmatch("[0-9a-f]+", stem):
        raise BrainsegRuntimeError(f"{file_name} has no sha256 prefix after its last '-'")
    return stem


def check_vgg_state_dict(path: Path, bn: bool = False) -> int:
    """Load ``path`` safely as a torchvision VGG16(-BN) state dict (every ``features.*`` key and
    shape checked); return the number of those tensors."""
    return len(load_vgg_features(path, "vgg16_bn" if bn else "vgg16"))


def download_vgg16(
    bn: bool = False,
    from_file: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    force: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Install torchvision's ImageNet VGG16(-BN) weights under torchvision's own file name in
    the torch hub cache; return the path. Whatever the source, the sha256 must start with the
    hex in that name and the file must load safely; a valid installed file is kept as is."""
    if url and from_file:
        raise BrainsegError("--url and --from-file cannot be used together")
    if url is not None:
        check_url(url)
    encoder = "vgg16_bn" if bn else "vgg16"
    tv_url, target = vgg16_weights_url(encoder), imagenet_weights_path(encoder)
    prefix = expected_hash_prefix(target.name)
    what = "VGG16-BN" if bn else "VGG16"
    if target.exists() and not force:
        if sha256_file(target).startswith(prefix):
            con.info(f"{target} is already installed (sha256 {prefix}...)")
            return target
        raise BrainsegError(
            f"{target} exists but its sha256 does not start with {prefix}",
            hint="pass --force to replace it",
        )
    if from_file is not None:
        _copy_vgg16(Path(from_file), target, prefix, bn, tv_url)
    else:
        src_url = url or tv_url
        con.info(f"downloading {src_url} to {target}")
        http_fetch(
            src_url,
            target,
            None,
            prefix,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            sleep=sleep,
            from_file_hint="--from-file PATH",
        )
        try:
            check_vgg_state_dict(target, bn)
        except BrainsegError:
            target.unlink(missing_ok=True)
            raise
    con.info(f"installed {what} ImageNet weights at {target}")
    return target


def _copy_vgg16(src: Path, target: Path, prefix: str, bn: bool, tv_url: str) -> None:
    """Check a ``--from-file`` weights file (hash prefix, safe load) and copy it into place."""
    name, what = target.name, "VGG16-BN" if bn else "VGG16"
    if not src.is_file():
        raise BrainsegError(
            f"--from-file {src} does not exist or is not a file",
            hint=f"give torchvision's {name}",
        )
    actual = sha256_file(src)
    if not actual.startswith(prefix):
        raise BrainsegError(
            f"{src} has sha256 {actual}, but torchvision's {what} file {name} must start "
            f"with {prefix}",
            hint=f"this is not torchvision's ImageNet {what} file "
            f"(download {tv_url}{'' if bn else '; --bn for VGG16-BN'})",
        )
    check_vgg_state_dict(src, bn)
    if not (target.exists() and src.resolve() == target.resolve()):
        with atomic_path(target, force=True) as tmp:
            shutil.copyfile(src, tmp)
