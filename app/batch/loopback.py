"""Run a command where only the loopback interface exists (a private Linux network namespace).

Ray 2.60's GCS, raylet and worker servers listen on every interface whatever node address
they are given, so a Ray cluster that must be reachable from this machine only (the tests'
and the bench's) runs inside a network namespace whose one interface is `lo`. Written here
because Ray has no setting for it; `unshare` and `ip` (util-linux, iproute2) do the work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional, Sequence

ISOLATED_ENV = "LOOMWORK_LOOPBACK_ONLY"  # set inside the namespace, for the code run there


def isolated() -> bool:
    """Whether this process was started by `loopback_only_command`."""
    return os.environ.get(ISOLATED_ENV) == "1"


def loopback_only_command(argv: Sequence[str]) -> Optional[list[str]]:
    """`argv` wrapped to run in a new network namespace with only loopback up, or None when this
    machine cannot make one (not Linux, no unshare/ip, no privilege for a network namespace)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return None
    for flags in (["-n"], ["-r", "-n"]):  # as root; else in a user namespace of our own
        try:
            probe = subprocess.run([unshare, *flags, ip, "link", "set", "lo", "up"],
                                   capture_output=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            script = f'"{ip}" link set lo up && exec env {ISOLATED_ENV}=1 "$@"'
            return [unshare, *flags, "sh", "-c", script, "sh", *argv]
    return None
