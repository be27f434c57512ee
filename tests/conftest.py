import os

import pytest
from hypothesis import HealthCheck, settings

from array_backends import backend_params, load_backend

# Fixed, derandomised property tests in CI so that a run is reproducible and fast.
settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(params=backend_params())
def backend(request):
    """Each array backend in turn; absent libraries and devices are skipped."""
    return load_backend(request.param)


@pytest.fixture(scope="session")
def mnist1d_dir(tmp_path_factory):
    """One folder per test session for the generated MNIST-1D (about 20 s to make, then cached)."""
    return tmp_path_factory.mktemp("mnist1d")
