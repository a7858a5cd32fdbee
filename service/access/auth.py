"""API keys: a JSON file of sha256-hashed keys with scopes, reloaded when it changes.

``{"keys": [{"name": "backend", "sha256": "<hex of sha256(key)>", "scopes": ["recommend",
"events"], "rate_per_s": 100, "burst": 200}]}``. Only hashes are stored, so the file (a
Kubernetes Secret) never holds a usable credential. Keys are looked up by the hash of what the
caller sent: the lookup's timing can only reveal a hash, never a key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

Scope = Literal["recommend", "events"]
SCOPES: tuple[Scope, ...] = ("recommend", "events")
ANONYMOUS = "anonymous"  # the key-name label of calls served without authentication


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="metrics label, not secret")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)
    rate_per_s: float | None = Field(default=None, gt=0, description="None: no rate limit")
    burst: int | None = Field(default=None, ge=1, description="None: one second of rate")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (never the key) and what it may do."""

    name: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None


OPEN = Principal(ANONYMOUS, frozenset(SCOPES))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(path: Path) -> dict[str, Principal]:
    """Hash -> principal; raises ValueError on a malformed file or repeated names/hashes."""
    parsed = KeysFile.model_validate(json.loads(path.read_text()))
    by_hash: dict[str, Principal] = {}
    names: set[str] = set()
    for entry in parsed.keys:
        if entry.sha256 in by_hash or entry.name in names:
            raise ValueError(f"{path}: key {entry.name!r} repeats a name or a hash")
        names.add(entry.name)
        by_hash[entry.sha256] = Principal(
            entry.name, frozenset(entry.scopes), entry.rate_per_s, entry.burst
        )
    return by_hash


def bearer_token(authorization: str | None) -> str | None:
    """The key from ``Bearer <key>`` (scheme case-insensitive, RFC 7235); None if absent."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyStore:
    """The keys file, re-read when its mtime, size or inode changes (checked at most every
    ``reload_s``, on the request path: one stat per second costs nothing). A file that turns
    unreadable keeps the last good keys, so a half-written Secret update locks nobody out."""

    def __init__(self, path: Path, reload_s: float = 1.0) -> None:
        self.path = path
        self.reload_s = reload_s
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._keys = load_keys(path)  # at start a bad file is fatal, not silently open
        self._stamp = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            keys = load_keys(self.path)
        except (OSError, ValueError) as exc:
            log.warning("event=keys_reload_failed path=%s error=%s", self.path, exc)
            return
        self._keys, self._stamp = keys, stamp
        log.info("event=keys_reloaded path=%s keys=%d", self.path, len(keys))

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        self._maybe_reload()
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        principal = self._keys.get(hash_key(token))
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal


class Authenticator:
    """Authorises a call for a scope; with no keys file every call is the open principal."""

    def __init__(self, keys: KeyStore | None) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def authorize(self, authorization: str | None, scope: str) -> Principal:
        if self.keys is None:
            return OPEN
        principal = self.keys.authenticate(authorization)
        if scope not in principal.scopes:
            raise PermissionDenied(f"key {principal.name!r} lacks the {scope!r} scope")
        return principal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ExposureError(RuntimeError):
    """Refusing to serve without keys on an address others can reach."""


def check_exposure(http_host: str, grpc_host: str, has_keys: bool, insecure: bool) -> None:
    """Without a keys file the service runs open only on loopback, unless ``--insecure``."""
    exposed = [h for h in (http_host, grpc_host) if not is_loopback(h)]
    if exposed and not has_keys and not insecure:
        raise ExposureError(
            f"refusing to serve without API keys on {', '.join(sorted(set(exposed)))}: set "
            "THINKAHEAD_AUTH__KEYS_FILE, bind 127.0.0.1, or pass --insecure"
        )
