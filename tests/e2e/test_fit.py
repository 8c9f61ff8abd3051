"""The GPU path's environment, in a child process that imports torch: the suite hides a GPU from CPU tests
and shows it to `gpu` tests. The fit policy and the emulated card without torch: unit/test_fit.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import GPU_ENV, gpu_env

pytestmark = pytest.mark.slow


def test_the_suite_hides_a_gpu_from_cpu_tests_and_shows_it_to_gpu_tests():
    """CPU tests compare exact numbers on the CPU path; on a machine with a GPU their processes must not
    find it (conftest), while `gpu` tests get the environment the machine had."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    code = "import torch, sys; sys.exit(1 if torch.cuda.is_available() else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    assert gpu_env().get("CUDA_VISIBLE_DEVICES") == GPU_ENV.get("CUDA_VISIBLE_DEVICES")
