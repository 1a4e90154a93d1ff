"""``nirvana keys`` against a configured database: create, list, shared pool, revoke, and clean errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nirvana.cli import _mount_subcommands, app


def test_keys_lifecycle(new_database: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _mount_subcommands()
    monkeypatch.setenv("NIRVANA_DATABASE_URL", new_database())
    run = CliRunner().invoke
    data = ["--data-dir", str(tmp_path)]

    made = run(app, ["keys", "create", "--tenant", "acme", "--name", "ci", *data])
    assert made.exit_code == 0, made.output
    key = made.output.strip()
    listed = [json.loads(line) for line in run(app, ["keys", "list", "--tenant", "acme", *data]).output.splitlines()]
    assert [k["prefix"] for k in listed] == [key[:10]]
    assert key not in json.dumps(listed)  # only the hash and prefix are stored

    assert run(app, ["keys", "shared-pool", "acme", "--on", *data]).exit_code == 0
    assert run(app, ["keys", "shared-pool", *data]).output.split() == ["acme"]
    assert run(app, ["keys", "shared-pool", "acme", "--off", *data]).exit_code == 0
    assert run(app, ["keys", "shared-pool", *data]).output.split() == []

    revoked = run(app, ["keys", "revoke", key[:10], *data])
    assert revoked.exit_code == 0 and "revoked 1" in revoked.output, revoked.output
    assert json.loads(run(app, ["keys", "list", *data]).output.splitlines()[0])["revoked"]

    assert run(app, ["keys", "create", "beta", *data]).exit_code == 0  # positional TENANT, as in the README
    assert {k["tenant"] for k in map(json.loads, run(app, ["keys", "list", *data]).output.splitlines())} == {
        "acme",
        "beta",
    }
    assert run(app, ["keys", "create", *data]).exit_code == 2  # no tenant
    assert run(app, ["keys", "create", "a", "--tenant", "b", *data]).exit_code == 2  # two different tenants
    bad = run(app, ["keys", "create", "--tenant", "acme", "--role", "root", *data])
    assert bad.exit_code == 2 and "role" in bad.output, bad.output
    assert run(app, ["keys", "shared-pool", "acme", *data]).exit_code == 2  # neither --on nor --off
