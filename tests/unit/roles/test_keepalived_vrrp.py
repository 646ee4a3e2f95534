"""Where keepalived sends VRRP and holds the virtual IP: the interface carrying an address."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter import edge as edge_filter
from ansible_collections.aphrodite.baremetal.plugins.module_utils import _edge

FACTS = {
    "interfaces": ["lo", "eth0", "bond0.100"],
    "lo": {"device": "lo", "ipv4": {"address": "127.0.0.1", "prefix": "8"}},
    "eth0": {"device": "eth0", "ipv4": {"address": "203.0.113.5", "netmask": "255.255.255.0"}},
    # Ansible names the fact of "bond0.100" bond0_100; the device keeps its name.
    "bond0_100": {"device": "bond0.100", "ipv4": {"address": "10.0.0.11", "prefix": "24"},
                  "ipv4_secondaries": [{"address": "10.0.0.200", "prefix": "32"}]},
}


@pytest.mark.parametrize(("address", "expected"), [
    ("10.0.0.11", {"interface": "bond0.100", "prefix": 24}),
    ("10.0.0.200", {"interface": "bond0.100", "prefix": 32}),
    ("203.0.113.5", {"interface": "eth0", "prefix": 24}),
])
def test_interface_and_prefix_of_an_address(address, expected):
    assert _edge.vrrp_interface(FACTS, address) == expected


def test_an_address_the_host_does_not_carry_says_what_to_set():
    with pytest.raises(_edge.EdgeError, match="no interface of this host carries 10.9.9.9; set keepalived_interface"):
        _edge.vrrp_interface(FACTS, "10.9.9.9")


def test_a_host_name_is_refused_with_the_variables_to_fix():
    with pytest.raises(AnsibleFilterError, match="'lb1.example.com' is not one .*aphrodite_bind_address"):
        edge_filter.edge_vrrp_interface(FACTS, "lb1.example.com")
