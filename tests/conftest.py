"""Suite-wide settings.

Torch's intra-op thread pool slows down 10-30x when the machine's cores are shared (CI runners, a busy laptop),
so the test process runs torch on one thread; tests that need more threads (determinism, fork safety) raise it
themselves and restore it. Subprocesses started by tests inherit OMP_NUM_THREADS=1 unless a test says otherwise.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
