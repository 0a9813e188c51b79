import json

import pytest

from kvtier.config import load_config, parse_size
from kvtier.errors import ConfigError


def test_defaults_are_valid_and_documented_values():
    config = load_config()
    assert config.model.block_size == 256
    assert config.server.listen == "127.0.0.1:8080"
    assert (config.eviction.alpha, config.eviction.beta, config.eviction.gamma) == (0.6, 0.3, 0.1)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"block_size": 128},
                                "tiers": {"host_ram_budget": "64MiB", "nfs_path": "/mnt/x"}}))
    config = load_config(path, {"model.block_size": 64, "data_dir": str(tmp_path)})
    assert config.model.block_size == 64
    assert config.tiers.host_ram_budget == 64 * 1024**2
    assert str(config.cold_path) == "/mnt/x"
    assert config.cool_path == tmp_path / "cool"
    assert config.warm_path == tmp_path / "warm"


@pytest.mark.parametrize("data, key", [
    ({"model": {"blok_size": 1}}, "model.blok_size"),
    ({"nope": 1}, "nope"),
    ({"model": {"block_size": "big"}}, "model.block_size"),
    ({"model": {"block_size": 100}}, "model.block_size"),
    ({"tiers": {"host_ram_budget": "lots"}}, "tiers.host_ram_budget"),
    ({"tiers": {"host_ram_budget": -5}}, "tiers.host_ram_budget"),
    ({"tiers": {"warm_format": "q2"}}, "tiers.warm_format"),
    ({"eviction": {"alpha": -1}}, "eviction.alpha"),
    ({"server": {"listen": "nowhere"}}, "server.listen"),
    ({"model": 5}, "model"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, data, key):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key


def test_bad_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.json")


def test_sizes():
    assert parse_size("1.5GiB", "k") == int(1.5 * 1024**3)
    assert parse_size("10 MB", "k") == 10_000_000
    assert parse_size(42, "k") == 42
    with pytest.raises(ConfigError):
        parse_size(True, "k")


def test_every_key_is_documented():
    import dataclasses
    from pathlib import Path

    from kvtier.config import Config

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    missing = [k for k in keys(Config()) if f"`{k}`" not in doc]
    assert missing == []
