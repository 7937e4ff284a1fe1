"""DDP, ZeroRedundancyOptimizer and FSDP2 with pyopt AdamW: 2 gloo processes."""
import os
import socket
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "dist", "ddp_zero_fsdp.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ddp", "zero", "fsdp"])
def test_two_process_training(mode):
    r = subprocess.run([sys.executable, SCRIPT, mode, str(_free_port())], capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
