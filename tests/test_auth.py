"""API keys: hashed file format, authentication, admin rights, rotation."""
from __future__ import annotations

import os
import time

import pytest
import yaml

from promptmux.serving.replica.auth import (
    KeyRing,
    Principal,
    generate_key,
    hash_key,
    parse_key_file,
    require_owner_or_admin,
    write_key_file,
)
from promptmux.prompts.errors import PermissionDeniedError, UnauthenticatedError


def bearer(key: str) -> list[tuple[str, str]]:
    return [("application", "promptmux"), ("authorization", f"Bearer {key}")]


def test_keys_are_stored_hashed_and_authenticate_their_tenant(tmp_path):
    path = write_key_file(tmp_path / "keys.yaml", [("acme", "k-acme", False), ("ops", "k-ops", True)])
    text = path.read_text()
    assert "k-acme" not in text and hash_key("k-acme") in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing.from_file(path)
    assert ring.authenticate(bearer("k-acme")) == Principal("acme", admin=False)
    assert ring.authenticate(bearer("k-ops")) == Principal("ops", admin=True)
    assert ring.authenticate([("authorization", "bearer   k-acme ")]).tenant == "acme"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ([("application", "promptmux")], "missing API key"),
        ([("authorization", "k-acme")], "malformed"),
        ([("authorization", "Bearer ")], "malformed"),
        ([("authorization", "Bearer k-wrong")], "unknown API key"),
    ],
)
def test_bad_credentials_are_unauthenticated_and_never_echoed(tmp_path, metadata, message):
    ring = KeyRing.from_file(write_key_file(tmp_path / "keys.yaml", [("acme", "k-acme", False)]))
    with pytest.raises(UnauthenticatedError, match=message) as caught:
        ring.authenticate(metadata)
    assert "k-wrong" not in str(caught.value) and "k-acme" not in str(caught.value)


def test_owner_or_admin_may_administer():
    require_owner_or_admin(Principal("acme"), "acme", "register")
    require_owner_or_admin(Principal("ops", admin=True), "acme", "delete")
    with pytest.raises(PermissionDeniedError, match="tenant 'globex' may not delete prompts of tenant 'acme'"):
        require_owner_or_admin(Principal("globex"), "acme", "delete")


@pytest.mark.parametrize(
    "body, message",
    [
        ("keys: nope", "`keys:` list"),
        ("keys:\n  - tenant: acme\n    sha256: abc\n", "64 hex digits"),
        ("keys:\n  - tenant: 'bad id'\n    sha256: " + "a" * 64, "not a valid tenant id"),
        ("keys:\n  - tenant: acme\n    sha256: " + "a" * 64 + "\n    admin: 'yes'", "true or false"),
        ("keys:\n  - tenant: acme\n    key: secret\n    sha256: " + "a" * 64, "unknown field"),
        ("keys:\n  - {tenant: a, sha256: " + "a" * 64 + "}\n  - {tenant: b, sha256: " + "a" * 64 + "}", "repeats"),
        ("keys: [", "not valid YAML"),
    ],
)
def test_malformed_key_files_are_rejected_with_the_reason(body, message):
    with pytest.raises(ValueError, match=message):
        parse_key_file(body)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m promptmux.serving.replica.auth"):
        KeyRing.from_file(tmp_path / "absent.yaml")


def test_rotation_reloads_changed_file_and_keeps_keys_when_the_new_file_is_broken(tmp_path):
    path = write_key_file(tmp_path / "keys.yaml", [("acme", "old-key", False)])
    ring = KeyRing.from_file(path)
    assert not ring.reload_if_changed()
    write_key_file(path, [("acme", "new-key", False)])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    assert ring.reload_if_changed()
    assert ring.authenticate(bearer("new-key")).tenant == "acme"
    with pytest.raises(UnauthenticatedError):
        ring.authenticate(bearer("old-key"))
    path.write_text("keys: [")
    assert not ring.reload_if_changed()
    assert ring.authenticate(bearer("new-key")).tenant == "acme"


def test_generated_keys_are_random_and_cli_prints_a_matching_entry(capsys):
    from promptmux.serving.replica.auth import main

    assert generate_key() != generate_key() and len(generate_key()) > 40
    main(["acme", "--admin"])
    out = capsys.readouterr().out
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    printed = "\n".join(out.splitlines()[1:])
    (entry,) = yaml.safe_load(printed)["keys"]
    assert entry == {"tenant": "acme", "sha256": hash_key(key), "admin": True}
    assert KeyRing(parse_key_file(printed)).authenticate(bearer(key)).admin  # a whole, valid key file


def test_cli_adds_keys_to_a_key_file_and_keeps_the_others(tmp_path, capsys):
    from promptmux.serving.replica.auth import main

    path = tmp_path / "keys.yaml"
    assert main(["acme", "--add-to", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[-1]
    assert main(["globex", "--admin", "--add-to", str(path)]) == 0
    second = capsys.readouterr().out.splitlines()[-1]
    ring = KeyRing.from_file(path)
    assert len(ring) == 2 and ring.authenticate(bearer(first)).tenant == "acme"
    assert ring.authenticate(bearer(second)).admin and first not in path.read_text()


def test_cli_refuses_to_rewrite_a_key_file_that_does_not_parse(tmp_path, capsys):
    from promptmux.serving.replica.auth import main

    path = tmp_path / "keys.yaml"
    path.write_text("- tenant: acme\n  sha256: abc\n")
    with pytest.raises(SystemExit) as exit_:
        main(["acme", "--add-to", str(path)])
    assert exit_.value.code == 2 and "must be a mapping with a `keys:` list" in capsys.readouterr().err
    assert path.read_text() == "- tenant: acme\n  sha256: abc\n"
