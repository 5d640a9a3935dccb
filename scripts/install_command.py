"""Install the ``qjscore`` command for this checkout into the running Python's environment.

    .venv/bin/python scripts/install_command.py        # what `make build` runs

What an editable install (``pip install -e .``) gives, without its build: a ``.pth`` file
that puts this checkout on the environment's path (so ``python -m clients.cli`` and the
packages import from anywhere) and a ``qjscore`` launcher beside the interpreter. The
compiled extensions are built in place by ``setup.py build_ext --inplace`` alone, once, and
nothing prints setuptools' editable-install warning box on every fresh set-up.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = "qianjiang-score"


def main() -> int:
    try:  # an editable install from before: its path hook would shadow nothing, but two are one too many
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        pass
    else:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", DIST], check=True)
    paths = sysconfig.get_paths()
    Path(paths["purelib"], "qianjiang-score.pth").write_text(f"{ROOT}\n")
    launcher = Path(paths["scripts"], "qjscore")
    # The guard: worker processes started with "spawn" (Dask's) import the launcher again.
    launcher.write_text(f"#!{sys.executable}\nimport sys\n\nfrom clients.cli import main\n\n"
                        "if __name__ == \"__main__\":\n    sys.exit(main())\n")
    launcher.chmod(0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main())
