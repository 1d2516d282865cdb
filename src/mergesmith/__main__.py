"""`python -m mergesmith`. Python puts the working directory first on the import path for `-m` (unless -P or -I):
drop it before anything else is imported, so a torch.py or click.py there is never run. (A mergesmith.py there,
or a standard-library name, is imported by Python itself before this file runs: in a folder you do not trust, use
the `mergesmith` command or `python -I -m mergesmith`.)"""

import os
import sys


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed while we run: Python put "" in its place
        return ""


if __name__ == "__main__":
    isolated = sys.flags.isolated or getattr(sys.flags, "safe_path", False)  # -I, -P: nothing was put there
    if not isolated and sys.path and sys.path[0] in ("", _cwd()):
        del sys.path[0]

    from mergesmith.cli import main

    main()
