"""Fixtures for the tools' tests: one built store per session, copied for every test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvtier.cli import main
from tests.tools.stores import CLI_BUDGETS, Built, build_store


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_store(tmp_path_factory.mktemp("template") / "store")


@pytest.fixture
def built(template: Built, tmp_path: Path) -> Built:
    """A fresh copy of the template store (the store is closed, so its files can be copied)."""
    path = tmp_path / "store"
    shutil.copytree(template.path, path)
    return Built(path, template.built_at, template.sequences, template.unnamed, template.tiers,
                 template.placement, template.n_blocks)


class Cli:
    """Runs ``kvtier`` in this process on one store, with the store's budgets."""

    def __init__(self, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.path = path
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        command, rest = args[0], list(args[1:])
        code = main([command, "--data-dir", str(self.path), *CLI_BUDGETS, "--no-progress",
                     *rest])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str, expect: int = 0) -> object:
        code, out, err = self(*args, "--json")
        assert code == expect, err
        return json.loads(out)


@pytest.fixture
def cli(built: Built, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(built.path, capsys)
