"""``brainseg`` as torchrun starts it, plus a fingerprint of each rank's final weights.

tests/test_train_ddp.py launches this file through torchrun's real launcher instead of
``-m brainseg``: it runs the same CLI entry point (:func:`brainseg.cli.app.main`) and, after
training, writes ``<BRAINSEG_TEST_WEIGHTS_DIR>/rank<R>.sha256``: the SHA-256 of that rank's
final state dict (parameters and buffers, in key order). A test-only hook, outside the
package: it wraps ``brainseg.train.loop.setup`` to keep the run object the loop builds.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any


def state_hash(model: Any) -> str:
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    from brainseg.cli.app import main as cli_main
    from brainseg.train import loop

    runs: list[Any] = []
    real_setup = loop.setup

    def keep(cfg: Any, **kwargs: Any) -> Any:
        run = real_setup(cfg, **kwargs)
        runs.append(run)
        return run

    loop.setup = keep
    code = 0
    try:
        cli_main(sys.argv[1:])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = Path(os.environ["BRAINSEG_TEST_WEIGHTS_DIR"])
    (out / f"rank{os.environ['RANK']}.sha256").write_text(state_hash(runs[-1].raw) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
