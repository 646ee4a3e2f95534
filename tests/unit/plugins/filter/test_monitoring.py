"""The web_password_hash filter: what Prometheus' basic auth checks the password against."""

from __future__ import annotations

import bcrypt
import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter.monitoring import web_password_hash

PASSWORD = "correct-horse-battery-staple"


def test_the_hash_checks_the_password_and_nothing_else():
    hashed = web_password_hash(PASSWORD, "mon1:aphrodite")
    assert hashed.startswith("$2b$12$") and len(hashed) == 60
    assert bcrypt.checkpw(PASSWORD.encode(), hashed.encode())
    assert not bcrypt.checkpw(b"correct-horse-battery-stapl", hashed.encode())
    assert PASSWORD not in hashed


def test_the_same_seed_gives_the_same_hash_so_a_rerun_changes_nothing():
    assert web_password_hash(PASSWORD, "mon1:aphrodite") == web_password_hash(PASSWORD, "mon1:aphrodite")


def test_another_host_gets_another_salt():
    one, other = web_password_hash(PASSWORD, "mon1:aphrodite"), web_password_hash(PASSWORD, "mon2:aphrodite")
    assert one[:29] != other[:29] and one != other
    assert bcrypt.checkpw(PASSWORD.encode(), other.encode())


@pytest.mark.parametrize("password", ["", "short-password", None, 1234567890123456789, "x" * 73])
def test_a_short_long_or_missing_password_is_refused(password):
    with pytest.raises(AnsibleFilterError, match="16 characters|72 bytes"):
        web_password_hash(password, "mon1:aphrodite")
