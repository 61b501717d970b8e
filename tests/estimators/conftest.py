import numpy as np
import pytest


def simulate_2pl(n_subjects: int, n_items: int, dims: int, seed: int):
    """Responses drawn from a known multidimensional 2PL: returns (Y, a, b, theta)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_subjects, dims))
    a = np.abs(rng.normal(1.0, 0.4, size=(n_items, dims)))
    b = rng.normal(0.0, 1.2, size=n_items)
    p = 1 / (1 + np.exp(-(theta @ a.T - b)))
    y = (rng.random(p.shape) < p).astype(float)
    return y, a, b, theta


@pytest.fixture(scope="session")
def simulated_1d():
    return simulate_2pl(900, 40, 1, seed=0)


@pytest.fixture(scope="session")
def simulated_2d():
    return simulate_2pl(750, 80, 2, seed=1)
