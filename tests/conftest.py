import pytest
import torch

import vitops
from vitops import _loader


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and _loader.HAS_CUDA_KERNELS


def pytest_collection_modifyitems(config, items):
    if _cuda_ready():
        return
    why = "no CUDA device" if not torch.cuda.is_available() else "vitops was built without CUDA kernels"
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()
