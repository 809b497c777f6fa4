import warnings

import torch

# transformers warns once per kernel that it falls back to its PyTorch implementation on CPU.
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
# The test models are tiny: threads only add synchronisation (and stall badly on a busy machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when asked for (``-m slow``): the default suite stays within its budget."""
    import pytest

    if config.getoption("markexpr"):  # an explicit -m expression decides
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
