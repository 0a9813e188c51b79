"""What every ``kvtier`` sub-command shares: the config flags and how they become a Config."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from kvtier.config import Config, load_config
from kvtier.errors import ConfigError


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE is JSON when it parses as JSON, else a string."""
    overrides: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(item, "expected KEY=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="JSON config file, nested by section (see docs/configuration.md)")
    common.add_argument("--data-dir", metavar="DIR",
                        help="sets data_dir: the base of every tier's files (default "
                             "$XDG_DATA_HOME/kvtier, i.e. ~/.local/share/kvtier)")
    common.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="set one config key (repeatable); VALUE is JSON, else a string: "
                             "--set tiers.host_ram_budget=2GiB --set model.n_slots=2")
    common.add_argument("--verbose", "-v", action="store_true", help="log at debug level")
    return common


def build_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``--config``, then ``--set`` and ``--data-dir``, then ``extra``."""
    overrides = _parse_set(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    overrides.update(extra or {})
    return load_config(args.config, overrides)
