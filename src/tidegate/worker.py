"""One worker of a `--workers N` server, started by the supervisor (see `supervisor`)."""

import ctypes
import json
import os
import signal

from tidegate.server import serve
from tidegate.supervisor import CONFIG_ENV, OPTIONS_ENV, config_from_env


def _die_with_parent() -> None:
    """Asks Linux for SIGTERM when the supervisor dies, even by SIGKILL: no worker
    outlives its server (prctl PR_SET_PDEATHSIG; nothing elsewhere)."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def main() -> None:
    _die_with_parent()
    if os.getppid() == 1:  # the supervisor died before the request took effect
        return
    config = config_from_env(os.environ[CONFIG_ENV])
    serve(config, worker=True, **json.loads(os.environ[OPTIONS_ENV]))


if __name__ == "__main__":
    main()
