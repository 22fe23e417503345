"""Engine tests: small SAEs (d_in 32, d_sae 96), one torch thread (the CI box is shared)."""

import os
import pytest
import torch

torch.set_num_threads(1)

D_IN, D_SAE = 32, 96


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# The interpreted-kernel module only runs in a process started with TRITON_INTERPRET=1;
# test_kernels.py starts that process, so an ordinary run does not collect (or skip) it.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["test_kernels_interpreted.py"]
