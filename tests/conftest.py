"""Suite-wide set-up: one torch thread per pytest-xdist worker.

`make test` runs two workers on a 2-core machine; with torch's default of one thread per core,
two in-process tests would run four busy threads on two cores and both would slow down.
A test that needs another count sets it itself (and restores it).
"""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
