"""The sidecar's own config file goes through the same bounded YAML loader as rules files."""

import os

import pytest

from monitor.config import ConfigError, load_config

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(8))


@pytest.mark.parametrize("content, reason", [
    (BOMB.encode(), "alias"),
    (b"model_name: \xff\xfe\n", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "deep"),
], ids=["alias-bomb", "not-utf8", "deep-nesting"])
def test_hostile_config_is_refused_with_a_short_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "featurewatch.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and reason.lower() in message.lower()
    assert len(message) < 400


def test_config_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "featurewatch.yaml"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(path)


def test_invalid_field_echoes_a_short_value(tmp_path):
    path = tmp_path / "featurewatch.yaml"
    path.write_text("model_name: [" + ", ".join(["x"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "model_name" in str(info.value) and len(str(info.value)) < 400
