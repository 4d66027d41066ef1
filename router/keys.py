"""API keys with roles: who may call the daemon, and what each key may do.

A key has a name (what logs and metrics show: never the key), a role (`admin` may also
load, unload, pull, delete, prune and reload; `user` may only use models) and optionally
the models it may use (others do not exist for it: 404). Keys come from the config file
(`api_keys`, all admins, and `[[keys]]` tables), a key file in the same format
(`key_file`), and systemd credentials (`$CREDENTIALS_DIRECTORY/keys`, a key file, or
`$CREDENTIALS_DIRECTORY/api_key`, one admin key). Only SHA-256 digests are kept; a
presented key is hashed and compared with every digest in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta


class Role(enum.Enum):
    ADMIN = "admin"
    USER = "user"


class KeySection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One `[[keys]]` table: the key itself, or its SHA-256 (hex) so the file holds no secret."""

    name: Annotated[str, Meta(min_length=1)]
    key: Annotated[str, Meta(min_length=8)] | None = None
    key_sha256: Annotated[str, Meta(pattern="^[0-9a-fA-F]{64}$")] | None = None
    role: Role = Role.USER
    models: list[str] | None = None  # None: every model


class KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[KeySection] = []


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes
    role: Role
    models: frozenset[str] | None  # None: every model

    @property
    def owner(self) -> str:
        """What owns the resumable streams and stored responses this key starts."""
        return self.digest.hex()[:16]

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class KeyConfigError(ValueError):
    """A key definition that cannot be used; the message names where it is."""


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def from_sections(sections: Iterable[KeySection], where: str) -> list[Key]:
    out = []
    for s in sections:
        if (s.key is None) == (s.key_sha256 is None):
            raise KeyConfigError(f"{where}: key {s.name!r} needs exactly one of `key` and `key_sha256`")
        raw = digest(s.key) if s.key is not None else bytes.fromhex(s.key_sha256 or "")
        out.append(Key(s.name, raw, s.role, frozenset(s.models) if s.models is not None else None))
    return out


def read_key_file(path: Path) -> list[Key]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return from_sections(msgspec.convert(raw, KeyFile).keys, str(path))
    except OSError as exc:
        raise KeyConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise KeyConfigError(f"key file {path}: {exc}") from exc


def from_credentials(env: dict[str, str] | None = None) -> list[Key]:
    """systemd's LoadCredential=: a key file named `keys`, or one admin key named `api_key`."""
    env = dict(os.environ) if env is None else env
    folder = env.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return []
    out: list[Key] = []
    keys = Path(folder) / "keys"
    if keys.is_file():
        out += read_key_file(keys)
    single = Path(folder) / "api_key"
    if single.is_file():
        value = single.read_text(encoding="utf-8").strip()
        if value:
            out.append(Key("credential", digest(value), Role.ADMIN, None))
    return out


class Keys:
    """The keys the daemon accepts now; a reload replaces them all at once."""

    def __init__(self, keys: list[Key]) -> None:
        self._keys = list(keys)

    def replace(self, keys: list[Key]) -> None:
        self._keys = list(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def find(self, presented: bytes) -> Key | None:
        """The key presented, compared with every digest without stopping early."""
        wanted = digest(presented)
        match = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, wanted):
                match = key
        return match

    def names(self) -> list[str]:
        return [k.name for k in self._keys]
