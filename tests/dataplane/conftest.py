import pytest

from tests.conftest import BPF_SKIP, OBJECT
from .harness import setup_env, teardown_env


@pytest.fixture(scope="session")
def env():
    if BPF_SKIP:
        pytest.skip(BPF_SKIP)
    e = setup_env(str(OBJECT))
    yield e
    teardown_env(e)


@pytest.fixture(params=["bpf", "lpm", "kernel"])
def mode(request):
    return request.param
