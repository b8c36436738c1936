import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set before
# triton.jit decorates anything, so before hf_flash (or its kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def torch_path_on_cpu():
    """Model-level tests: on CPU the torch path (the kernels have their own interpreter tests, and a few model tests
    force them); on a GPU the Triton kernels and CUDA graphs, as users get them, for the tests that move their model
    there. Modules opt in with ``pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")``."""
    if DEVICE == "cuda":
        yield
        return
    from hf_flash import ops  # imported late: TRITON_INTERPRET must be set first (above)

    with ops.use_backend("torch"):
        yield


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible draw per test: fresh inputs, replayable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="session")
def _verify_cached_launches():
    """On a GPU, every launch that skips Triton's binding (``hf_flash.kernels.launch``) is checked against the kernel
    Triton's binder picks, in every test."""
    if DEVICE != "cuda":
        yield
        return
    from hf_flash import kernels

    kernels.verify_cached_launches = True
    yield
    kernels.verify_cached_launches = False
