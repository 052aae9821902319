import pytest

from tests.conftest import BPF_SKIP, OBJECT
from .harness import setup_env, teardown_env


@pytest.fixture(scope="session")
def env():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    try:    # a set-up that fails half-way (a refused program) leaves nothing behind either
        yield setup_env(str(OBJECT))
    finally:
        teardown_env()


@pytest.fixture(params=["bpf", "lpm", "kernel"])
def mode(request):
    return request.param
