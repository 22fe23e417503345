"""`record:` in the sidecar config: defaults, paths, refusals naming the field."""

from __future__ import annotations

import pytest

from monitor.config import ConfigError, SidecarConfig, load_config


def test_record_is_off_by_default_and_its_layers_join_the_tap_plan(tmp_path):
    assert SidecarConfig().record is None
    cfg = SidecarConfig.model_validate({"sources": [{"name": "s", "kind": "sae", "layer": 2, "path": "x"}],
                                        "record": {"dir": str(tmp_path), "layers": [5]}})
    assert cfg.layers() == [2, 5] and cfg.record.sample == 0.05


def test_relative_dir_resolves_against_the_config_file(tmp_path):
    (tmp_path / "fw.yaml").write_text("record: {dir: rec, sample: 1.0, on_rules: [a]}\n")
    cfg = load_config(tmp_path / "fw.yaml")
    assert cfg.record.dir == tmp_path / "rec" and cfg.record.on_rules == ["a"]


@pytest.mark.parametrize("record, field", [
    ("{dir: r, sample: 1.5}", "record.sample"),
    ("{dir: r, shard_bytes: 134217728, max_bytes: 134217728}", "shard_bytes"),
    ("{dir: r, colour: red}", "record.colour"),
    ("{sample: 0.1}", "record.dir"),
])
def test_bad_record_config_names_the_field(tmp_path, record, field):
    (tmp_path / "fw.yaml").write_text(f"record: {record}\n")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        load_config(tmp_path / "fw.yaml")
    assert str(info.value).startswith(str(tmp_path / "fw.yaml"))
