"""How the tools open a store, and read block ids and namespaces given as text.

The tools open a data directory with the tier manager (which takes the directory's exclusive lock,
so a running server makes them fail with :class:`~kvtier.errors.StoreLocked`) and with no
background worker: nothing moves unless a tool moves it. What they see of it is the manager's
:class:`~kvtier.storage.view.StoreView`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from kvtier.config import Config
from kvtier.errors import KvtierError
from kvtier.storage.manager import TierManager
from kvtier.storage.records import BlockId, Namespace


class NoStore(KvtierError):
    """The data directory holds no store (the tools never create one)."""


def open_store(config: Config) -> TierManager:
    """The store of ``config.data_path``, exclusively, without a background worker, and without
    demoting to ``config``'s budgets (which may not be the server's)."""
    if not (config.data_path / "catalog" / "data.mdb").exists():
        raise NoStore(f"no kvtier store at {config.data_path} (give the server's --config or "
                      f"--data-dir)")
    return TierManager(config, background=False, balance_on_open=False)


def parse_block(text: str, namespaces: set[bytes], stored: Collection[BlockId] = ()
                ) -> BlockId:
    """A block id from ``NSPREFIX:SEQUENCE:BLOCK`` (any unambiguous hex prefix of the namespace)
    or ``SEQUENCE:BLOCK`` (when one namespace, or one of the ``stored`` blocks, fits): the
    inverse of :func:`~kvtier.storage.view.block_name`."""
    parts = text.split(":")
    try:
        if len(parts) == 2:
            prefix, sequence, block = "", int(parts[0]), int(parts[1])
        elif len(parts) == 3:
            prefix, sequence, block = parts[0].lower(), int(parts[1]), int(parts[2])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected [NSPREFIX:]SEQUENCE:BLOCK, got {text!r}") from None
    matches = [ns for ns in namespaces if ns.hex().startswith(prefix)]
    if len(matches) > 1 and stored:
        matches = [ns for ns in matches if BlockId(Namespace(ns), sequence, block) in stored]
    if len(matches) != 1:
        what = "no namespace" if not matches else f"{len(matches)} namespaces"
        raise ValueError(f"{what} of this store match {text!r}; give a longer namespace prefix")
    return BlockId(Namespace(matches[0]), sequence, block)


def describe_namespace(description: bytes) -> Any:
    """A namespace's registered fingerprint for display: JSON if it is JSON, else text, else hex."""
    try:
        text = description.decode()
    except UnicodeDecodeError:
        return description.hex()
    try:
        return json.loads(text)
    except ValueError:
        return text
