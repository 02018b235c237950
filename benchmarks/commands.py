"""The one way the benchmark scripts run a semvec command: `semvec ARGS --json` in a fresh process,
as a user runs it, from the repository root. Scripts beside this one import it by name (a script's
own folder is first on its import path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def semvec(*args: str, env: dict | None = None) -> dict:
    """The command's JSON summary; on failure the script stops with the command and its stderr's end."""
    done = subprocess.run([sys.executable, "-m", "semvec.cli", *args, "--json"], cwd=REPO,
                          capture_output=True, text=True,
                          env=env if env is not None else {**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"semvec {' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
