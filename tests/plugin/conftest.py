import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from tests.plugin.tiny_model import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def hf(tiny_model):
    from tests.plugin.helpers import HFReference

    return HFReference(tiny_model)
