"""What bench/cluster and bench/cluster-scale share: the e2e cluster's settings (e2e/cluster/lib.sh),
kubectl against it, and timestamped progress lines on stderr."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    """Runs a shell command, fails on a non-zero exit, returns its stdout."""
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def lib(var):
    """A variable of e2e/cluster/lib.sh (E2E, KBIN, CSI_STATE, …)."""
    return sh(f'bash -c \'. "{ROOT}/e2e/cluster/lib.sh"; echo ${var}\'').strip()


E2E = lib("E2E")
KUBECTL = [f"{lib('KBIN')}/kubectl", "--kubeconfig", f"{E2E}/kubeconfig"]


def kc(*args, stdin=None, check=True):
    """kubectl against the e2e cluster; exits with its message if it fails (unless check=False)."""
    r = subprocess.run(KUBECTL + list(args), input=stdin, text=True, capture_output=True)
    if check and r.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
