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
