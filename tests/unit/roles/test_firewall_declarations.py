"""The firewall reads other roles' ports with their defaults: those defaults must stay the owners'.

Role defaults are invisible to a play that does not run the role (``--tags firewall``,
``--limit``, the firewall play itself), so every declaration that reads a port from a
variable carries the owning role's default.  When the owning role exists, the two must
agree; until it exists, the check is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ansible_collections.aphrodite.baremetal.plugins.module_utils._firewall import merge_declarations

ROOT = Path(__file__).resolve().parents[3]
ROLES = ROOT / "roles"
FIREWALL = ROLES / "firewall"
PRIVATE = yaml.safe_load((FIREWALL / "vars" / "main.yml").read_text())
ROLE_FILES = sorted(ROLES.glob("*/meta/firewall.yml"))


def _role_declarations() -> dict:
    return {path.parent.parent.name: yaml.safe_load(path.read_text()) for path in ROLE_FILES}


def _variable_references() -> list:
    """(where, variable, default) of every declaration in force that reads a port from a variable."""
    references = []
    sources = [("roles/firewall/vars/main.yml", d) for d in PRIVATE["__firewall_fallback_openings"]]
    for role, content in _role_declarations().items():
        sources += [(f"roles/{role}/meta/firewall.yml", d) for d in (content or {}).get("openings", [])]
    for where, declaration in sources:
        port = declaration.get("port")
        if isinstance(port, dict) and "var" in port:
            references.append(pytest.param(where, port["var"], port.get("default"),
                                           id=f"{declaration['name']}:{port['var']}"))
    return references


def _owner(variable: str) -> Path | None:
    """The role a variable belongs to: the longest role name that prefixes it (STYLE: <role>_*)."""
    owners = [role for role in ROLES.iterdir() if role.is_dir() and variable.startswith(role.name + "_")]
    return max(owners, key=lambda role: len(role.name), default=None)


@pytest.mark.parametrize(("where", "variable", "default"), _variable_references())
def test_fallback_default_is_the_owning_roles_default(where, variable, default):
    owner = _owner(variable)
    if owner is None:
        pytest.skip(f"no role owns {variable} yet")
    defaults_file = owner / "defaults" / "main.yml"
    defaults = (yaml.safe_load(defaults_file.read_text()) or {}) if defaults_file.exists() else {}
    assert variable in defaults, (
        f"{where} reads the port from {variable}, which roles/{owner.name}/defaults/main.yml does not define; "
        f"name the variable the role uses"
    )
    assert defaults[variable] == default, (
        f"{where} falls back to {variable}={default!r}, but roles/{owner.name} defaults it to "
        f"{defaults[variable]!r}; make them equal"
    )


def test_the_contracted_ports_are_read_from_their_owners_variables():
    wanted = {"haproxy-frontend": ("haproxy_frontend_port", 443), "haproxy-peers": ("haproxy_peers_port", 10000),
              "haproxy-metrics": ("haproxy_metrics_port", 8405), "node-exporter": ("monitoring_node_exporter_port", 9100)}
    fallbacks = {d["name"]: d for d in PRIVATE["__firewall_fallback_openings"]}
    for name, (variable, default) in wanted.items():
        assert fallbacks[name]["port"] == {"var": variable, "default": default}, name
    assert fallbacks["nfs"]["port"] == 2049 and fallbacks["nfs"]["from"] == {"groups": ["gpu_nodes"]}
    assert fallbacks["vrrp"]["proto"] == "vrrp" and fallbacks["vrrp"]["from"] == {"peers": True}


def test_every_declaration_in_the_collection_is_valid_and_unique():
    declarations = merge_declarations(PRIVATE["__firewall_fallback_openings"], _role_declarations(), [])
    names = [d["name"] for d in declarations]
    assert len(names) == len(set(names))


def test_the_helper_uses_the_roles_paths():
    helper = (FIREWALL / "files" / "usr" / "local" / "sbin" / "aphrodite-firewall").read_text()
    assert f"NAME={PRIVATE['__firewall_table']}\n" in helper
    assert f"CONFIRMED={PRIVATE['__firewall_confirmed']}\n" in helper
    assert f"SELF={PRIVATE['__firewall_helper']}\n" in helper
    unit = (FIREWALL / "templates" / "etc" / "systemd" / "system" / "aphrodite-firewall.service.j2").read_text()
    assert PRIVATE["__firewall_unit"] == "aphrodite-firewall.service"
    assert "ExecStart=/usr/sbin/nft -f {{ __firewall_confirmed }}" in unit
    # Nothing the role ships may flush the whole ruleset: it would delete Docker's tables.
    for path in FIREWALL.rglob("*"):
        if path.is_file():
            assert not re.search(r"^\s*flush\s+ruleset", path.read_text(), re.M), path


def test_the_rule_set_always_keeps_established_connections_and_loopback():
    template = (FIREWALL / "templates" / PRIVATE["__firewall_template"]).read_text()
    input_chain = template.split("chain input {", 1)[1].split("}", 1)[0]
    lines = [line.strip() for line in input_chain.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "type filter hook input priority filter; policy drop;"
    assert lines[1] == "ct state established,related accept"
    assert 'iif "lo" accept' in lines
    assert "type filter hook forward priority filter - 10; policy accept;" in template
    assert template.startswith("{{ ansible_managed | comment }}")
