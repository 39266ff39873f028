"""``--ray ADDRESS`` against a running Ray cluster (a real head node started with ``ray
start --head`` on this machine, with token authentication, no mock): the prune runs on it,
writes what one process writes, and leaves the cluster running; a wrong token is one line
and exit 2.  Its own module: ``ray stop`` ends every Ray process
of the machine, so it must not share a module with a runtime a fixture keeps."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_ray import same_weights

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=600)


@pytest.mark.skipif(not RAY.is_file(), reason="the ray command is not installed beside this interpreter")
def test_cli_ray_runs_on_a_cluster_at_an_address(tmp_path):
    base = ["models/mnist_cnn.onnx", "--calib", "models/data/calib", "--target-macs", "0.5", "-q", "--batch-size", "16"]
    plain = _cli(base[0], str(tmp_path / "plain.onnx"), *base[1:])
    assert plain.returncode == 0, plain.stderr
    port = _free_port()
    # A short temp folder: Ray's sockets live in its session folder (AF_UNIX paths: 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="opr-c-", dir="/tmp"))
    # Ray authenticates with a shared token (on by default for local clusters since 2.59):
    # the cluster and onnxprune get the same one, as on a real cluster.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                           f"--temp-dir={tmp}", "--disable-usage-stats"], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, **auth))
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        without = _cli(base[0], str(tmp_path / "no.onnx"), *base[1:], "--ray", f"127.0.0.1:{port}",
                       env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
        lines = [line for line in without.stderr.splitlines() if line.strip()]
        assert without.returncode == 2 and len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0], without.stderr[-2000:]
        run = _cli(base[0], str(tmp_path / "ray.onnx"), *base[1:], "--ray", f"127.0.0.1:{port}", "--workers", "2",
                   env=auth)
        assert run.returncode == 0, run.stderr
        assert run.stderr.strip() == ""
        status = subprocess.run([str(RAY), "status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=120, env=dict(os.environ, **auth))
        assert status.returncode == 0, "the cluster onnxprune used is still up: it did not shut down someone else's runtime"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=180)
        shutil.rmtree(tmp, ignore_errors=True)
    same_weights(tmp_path / "ray.onnx", tmp_path / "plain.onnx")
