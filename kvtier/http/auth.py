"""API keys and tenants: which tenant a request's bearer token names.

Keys come from ``server.api_key`` (or ``KVTIER_API_KEY``: the ``default`` tenant), the
``server.api_keys`` table and the ``server.api_keys_file``. A presented token is looked up by its
SHA-256 digest, so neither the lookup nor a comparison takes time that depends on how much of a
real key it matches.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvtier.config import TENANT_PATTERN, Config
from kvtier.engine.api import DEFAULT_TENANT
from kvtier.errors import ConfigError

API_KEY_ENV = "KVTIER_API_KEY"
_TENANT = re.compile(TENANT_PATTERN)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Tenants by the digest of their key; empty: no key is required (one ``default`` tenant)."""

    tenants: dict[bytes, str]

    @property
    def required(self) -> bool:
        return bool(self.tenants)

    def tenant_of(self, token: str) -> str | None:
        """The tenant whose key ``token`` is, else None."""
        return self.tenants.get(_digest(token))


def read_keys_file(path: str) -> list[tuple[str, str]]:
    """``TENANT KEY`` lines of ``path``; blank lines and ``#`` comments are skipped."""
    key_name = "server.api_keys_file"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key_name, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(key_name, f"{path} is not UTF-8 text") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ConfigError(key_name, f"{path}:{number}: expected 'TENANT KEY'")
        if not _TENANT.fullmatch(fields[0]):
            raise ConfigError(key_name, f"{path}:{number}: a tenant name is 1 to 64 letters, "
                                        "digits, '_' or '-'")
        pairs.append((fields[0], fields[1]))
    return pairs


def api_keys_of(config: Config) -> ApiKeys:
    """Every configured key and its tenant; a tenant may have several keys, a key one tenant."""
    server = config.server
    pairs: list[tuple[str, str]] = []
    single = server.api_key or os.environ.get(API_KEY_ENV, "")
    if single:
        pairs.append((DEFAULT_TENANT, single))
    pairs += server.api_keys.items()
    if server.api_keys_file:
        pairs += read_keys_file(server.api_keys_file)
    tenants: dict[str, str] = {}
    for tenant, key in pairs:
        if tenants.setdefault(key, tenant) != tenant:
            raise ConfigError("server.api_keys", f"one key is given to the tenants "
                                                 f"{tenants[key]!r} and {tenant!r}")
    return ApiKeys({_digest(key): tenant for key, tenant in tenants.items()})
