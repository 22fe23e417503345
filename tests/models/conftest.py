import pytest


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted SmolLM2-135M-Instruct folder: fetched once per machine (`featurewatch model fetch`)
    into the user's cache, then reused."""
    from monitor.models.fetch import fetch

    return str(fetch("smollm2"))
