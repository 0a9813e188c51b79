import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from kvtier.config import Config, load_config, parse_size
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
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from keys(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    documented = list(keys(Config))
    assert len(documented) == 54
    assert [k for k in documented if f"`{k}`" not in doc] == []


@pytest.mark.parametrize("overrides, key", [
    ({"model.block_size": 64.0}, "model.block_size"),
    ({"model.n_slots": True}, "model.n_slots"),
    ({"model.context_size": 0}, "model.context_size"),
    ({"model.context_size": 128}, "model.context_size"),
    ({"model.cache_type_k": "q3"}, "model.cache_type_k"),
    ({"tiers.host_ram_budget": "512KiB"}, "tiers.host_ram_budget"),
    ({"eviction.hit_half_life_s": 0}, "eviction.hit_half_life_s"),
    ({"model.nope": 1}, "model.nope"),
    ({"model": {"n_slots": 2}}, "model"),
])
def test_bad_overrides_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_types_are_strict_but_numbers_are_numbers():
    config = load_config(None, {"eviction.alpha": 1, "model.context_size": 0,
                                "tiers.gpu_vram_budget": "2GiB"})
    assert config.eviction.alpha == 1.0 and isinstance(config.eviction.alpha, float)
    assert config.tiers.gpu_vram_budget == 2 * 1024**3
    assert Config.model_validate(config.to_dict()) == config


def test_assignments_are_checked():
    config = load_config()
    config.server.shutdown_grace_s = 0.5
    with pytest.raises(ValueError):
        config.model.n_slots = "two"
    with pytest.raises(ConfigError) as info:
        config.model.context_size = 100
    assert info.value.key == "model.context_size"


def test_the_command_line_sets_keys():
    from kvtier.cli import build_parser
    from kvtier.cli.common import build_config

    args = build_parser().parse_args([
        "serve", "--set", "model.n_slots=2", "--set", "tiers.host_ram_budget=2GiB",
        "--set", 'server.api_key="123"', "--data-dir", "/d", "--listen", "0.0.0.0:9000"])
    config = build_config(args, {"server.listen": args.listen})
    assert config.model.n_slots == 2 and config.tiers.host_ram_budget == 2 * 1024**3
    assert config.server.api_key == "123" and config.data_dir == "/d"
    assert config.server.listen == "0.0.0.0:9000"
