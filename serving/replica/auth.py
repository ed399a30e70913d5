"""API keys: which tenant a call acts for, and whether it may administer a tenant's prompts.

Keys live in a YAML file, hashed (a leaked file grants nothing):

    keys:
      - tenant: acme          # tenant id
        sha256: 9f86d0...     # hex sha256 of the bearer token
        admin: false          # admin keys may administer every tenant's prompts

Clients send the metadata `authorization: Bearer <key>`. Tokens are never logged and never
echoed in error messages. The file is re-read when it changes (Kubernetes updates mounted
Secrets in place), so keys rotate without a restart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from promptmux.prompts.ids import ID_RULE, is_valid_id

from promptmux.prompts.errors import PermissionDeniedError, UnauthenticatedError

log = logging.getLogger(__name__)

_HEX64 = frozenset("0123456789abcdef")
_BEARER = "bearer "


@dataclass(frozen=True)
class Principal:
    """Who a call acts for."""

    tenant: str
    admin: bool = False


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_key() -> str:
    """A fresh random API key (256 bits)."""
    return "pmx_" + secrets.token_urlsafe(32)


def require_owner_or_admin(principal: Principal, owner: str, action: str) -> None:
    """Prompt administration needs the owning tenant's key or an admin key."""
    if principal.tenant != owner and not principal.admin:
        raise PermissionDeniedError(
            f"tenant {principal.tenant!r} may not {action} prompts of tenant {owner!r}; "
            f"use {owner!r}'s API key or an admin key"
        )


class KeyRing:
    """The accepted keys, by hash."""

    def __init__(self, principals: Mapping[str, Principal], source: Path | None = None) -> None:
        self._principals = dict(principals)
        self.source = source
        self._stamp = _file_stamp(source) if source else None
        self._failed_stamp: tuple[int, int] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyRing":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"API key file {str(path)!r} does not exist; create it with a first key "
                f"(`python -m promptmux.serving.replica.auth TENANT --add-to {path}`) or point --api-keys-file, "
                "serving.api_keys_file or $PROMPTMUX_API_KEYS_FILE at an existing one"
            ) from None
        return cls(parse_key_file(text, str(path)), source=path)

    def __len__(self) -> int:
        return len(self._principals)

    def authenticate(self, metadata: Iterable[tuple[str, str]]) -> Principal:
        """The principal named by the call's `authorization: Bearer <key>` metadata."""
        header = next((value for key, value in metadata if key.lower() == "authorization"), None)
        if header is None:
            raise UnauthenticatedError(
                "missing API key: send the metadata `authorization: Bearer <api key>` with every call"
            )
        if not header[: len(_BEARER)].lower() == _BEARER or not header[len(_BEARER) :].strip():
            raise UnauthenticatedError(
                "malformed authorization metadata; expected `Bearer <api key>`"
            )
        principal = self._principals.get(hash_key(header[len(_BEARER) :].strip()))
        if principal is None:
            raise UnauthenticatedError(
                "unknown API key; check the key, or ask the operator to add its sha256 to the key file"
            )
        return principal

    def reload_if_changed(self) -> bool:
        """Re-read the source file if it changed. A broken file keeps the current keys."""
        if self.source is None:
            return False
        stamp = _file_stamp(self.source)
        if stamp == self._stamp:
            return False
        try:
            principals = parse_key_file(self.source.read_text(), str(self.source))
        except (OSError, ValueError) as error:
            # Mid-rotation or a typo: keep serving with the keys we have, say so once per
            # version of the file, and try again when it changes. Messages name no key.
            if stamp != self._failed_stamp:
                self._failed_stamp = stamp
                log.error("API key file %s could not be reloaded; still using the %d keys loaded before (%s)",
                          self.source, len(self._principals), error)
            return False
        self._principals, self._stamp, self._failed_stamp = principals, stamp, None
        log.info("API key file %s reloaded: %d keys", self.source, len(principals))
        return True


def parse_key_file(text: str, where: str = "API key file") -> dict[str, Principal]:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from None
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where} must be a mapping with a `keys:` list of {{tenant, sha256, admin}} entries")
    principals: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: keys[{i}] must be a mapping with tenant, sha256 and admin")
        unknown = set(entry) - {"tenant", "sha256", "admin"}
        if unknown:
            raise ValueError(f"{where}: keys[{i}] has unknown field(s) {sorted(unknown)}; expected tenant, sha256, admin")
        tenant, digest, admin = entry.get("tenant"), str(entry.get("sha256", "")).lower(), entry.get("admin", False)
        if not is_valid_id(tenant):
            raise ValueError(f"{where}: keys[{i}].tenant={tenant!r} is not a valid tenant id ({ID_RULE})")
        if len(digest) != 64 or not set(digest) <= _HEX64:
            raise ValueError(
                f"{where}: keys[{i}].sha256 must be the 64 hex digits of the key's sha256 "
                "(store hashes, never keys in clear)"
            )
        if not isinstance(admin, bool):
            raise ValueError(f"{where}: keys[{i}].admin must be true or false, got {admin!r}")
        if digest in principals:
            raise ValueError(f"{where}: keys[{i}] repeats a key hash already listed; each key maps to one tenant")
        principals[digest] = Principal(tenant=tenant, admin=admin)
    return principals


def write_key_file(path: str | Path, entries: Iterable[tuple[str, str, bool]]) -> Path:
    """Write a key file from (tenant, key in clear, admin) entries; only hashes are stored."""
    return _write_hashed(path, [{"tenant": t, "sha256": hash_key(k), "admin": a} for t, k, a in entries])


def add_key(path: str | Path, tenant: str, key: str, admin: bool = False) -> Path:
    """Add one key to a key file, creating the file if it is missing. The file's other keys
    stay; a file that does not parse is left as it is (ValueError)."""
    path = Path(path)
    existing = path.read_text() if path.exists() else "keys: []"
    parse_key_file(existing, str(path))  # refuse to rewrite a broken file
    entries = (yaml.safe_load(existing) or {}).get("keys") or []
    return _write_hashed(path, [*entries, {"tenant": tenant, "sha256": hash_key(key), "admin": admin}])


def _write_hashed(path: str | Path, entries: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump({"keys": entries}, handle, sort_keys=False)
    os.replace(temp, path)
    return path


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def main(argv: list[str] | None = None) -> int:
    """Make a new key: `python -m promptmux.serving.replica.auth TENANT [--admin] [--add-to FILE]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Make an API key and the key-file entry that accepts it.")
    parser.add_argument("tenant")
    parser.add_argument("--admin", action="store_true", help="let the key administer every tenant's prompts")
    parser.add_argument("--add-to", type=Path, metavar="FILE",
                        help="add the key to this key file (created if missing) instead of printing its entry")
    args = parser.parse_args(argv)
    if not is_valid_id(args.tenant):
        parser.error(f"invalid tenant id {args.tenant!r}: expected {ID_RULE}")
    key = generate_key()
    if args.add_to:
        try:
            add_key(args.add_to, args.tenant, key, args.admin)
        except ValueError as error:
            parser.error(f"{error}; fix the file, or name a new one")
        print(f"# added a key for tenant {args.tenant!r} to {args.add_to}; give it to the client (shown once):")
        print(key)
        return 0
    print(f"# give this key to the client (it is shown once): {key}")
    print("# the key file's entry (a file holds a `keys:` list of these; --add-to FILE writes it for you):")
    print(yaml.safe_dump({"keys": [{"tenant": args.tenant, "sha256": hash_key(key), "admin": args.admin}]},
                         sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
