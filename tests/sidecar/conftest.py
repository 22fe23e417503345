"""Fixtures shared by the sidecar's rule tests."""

import pytest

from monitor.config import SourceConfig
from monitor.encode.stage import Dictionaries
from tests.support.dictionaries import write_probe_bank, write_saelens_jumprelu

D = 64  # the width the rule tests' planted SAE and probe bank are written at


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    """The planted SAE (source `sae`) and probe bank (`probes`) on layer 1, as the compiler sees them."""
    tmp = tmp_path_factory.mktemp("dicts")
    return Dictionaries([
        SourceConfig(name="sae", kind="sae", layer=1, path=write_saelens_jumprelu(tmp / "sae", D)),
        SourceConfig(name="probes", kind="probes", layer=1, path=write_probe_bank(tmp / "p.safetensors", D)),
    ])
