import numpy as np
import pytest

import propagation


def scheme_cases():
    """Every registered scheme with its default parameters, plus a non-default alpha."""
    cases = []
    for name, info in propagation.schemes().items():
        cases.append(pytest.param(name, {}, id=name))
        if "alpha" in info.params:
            cases.append(pytest.param(name, {"alpha": 0.3}, id=f"{name}-alpha0.3"))
    return cases


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    # Tests on the outputs of whole figure or training scripts (the module fixtures
    # ``quick_out`` run every script once) take tens of seconds: `make test-fast` skips them.
    for item in items:
        if "quick_out" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    # Under pytest-xdist (make test runs two workers on two cores) each worker keeps to one
    # torch thread, so that two workers do not fight over the cores with four.
    import os
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
