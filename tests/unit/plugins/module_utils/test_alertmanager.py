"""Alertmanager's route and receivers: what passes, and what fails with a message that names
the fix but never a URL or a key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter.monitoring import alertmanager_config as filter_config
from ansible_collections.aphrodite.baremetal.plugins.module_utils._alertmanager import (
    AlertmanagerError,
    alertmanager_config,
)

SECRET = "https://hooks.slack.example/services/T000/B000/secret-token-value"
ROUTE = {"receiver": "team", "group_by": ["alertname"], "group_wait": "30s",
         "routes": [{"receiver": "pager", "matchers": ['severity="critical"']}]}
RECEIVERS = [
    {"name": "team", "slack_configs": [{"api_url": SECRET, "channel": "#alerts", "send_resolved": True}]},
    {"name": "pager", "pagerduty_configs": [{"routing_key": "secret-routing-key"}]},
    {"name": "mail", "email_configs": [{"to": "oncall@example.com", "from": "am@example.com",
                                        "smarthost": "smtp.example.com:587", "auth_password": "pw"}]},
    {"name": "hook", "webhook_configs": [{"url": "http://10.0.0.5:9095/alerts"}]},
    {"name": "null"},
]


def test_a_complete_configuration_passes_unchanged():
    assert alertmanager_config(ROUTE, RECEIVERS) == {"route": ROUTE, "receivers": RECEIVERS}


def _with(index: int, **changes) -> list:
    receivers = [dict(r) for r in RECEIVERS]
    receivers[index] = {**receivers[index], **changes}
    return receivers


@pytest.mark.parametrize(("route", "receivers", "message"), [
    (ROUTE, [], "must be a non-empty list of receivers"),
    (ROUTE, [{"slack_configs": []}], r"receivers\[0\] needs a name"),
    (ROUTE, RECEIVERS + [{"name": "team"}], "receiver team is declared twice"),
    (ROUTE, _with(3, webhook_config=[{"url": "http://x:1/"}]),
     "receiver hook has webhook_config; a receiver holds name and any of webhook_configs"),
    (ROUTE, _with(3, webhook_configs=[]), "receiver hook: webhook_configs must be a non-empty list"),
    (ROUTE, _with(3, webhook_configs=[{}]), r"receiver hook, webhook_configs\[0\] needs exactly one of url"),
    (ROUTE, _with(3, webhook_configs=[{"url": "10.0.0.5:9095/alerts"}]), "url must start with http:// or https://"),
    (ROUTE, _with(3, webhook_configs=[{"url": "http://h/", "send_resolved": "yes"}]), "send_resolved must be true or false"),
    (ROUTE, _with(0, slack_configs=[{"channel": "#a"}]), r"receiver team, slack_configs\[0\] needs exactly one of api_url"),
    (ROUTE, _with(0, slack_configs=[{"api_url": SECRET}]), "needs channel"),
    (ROUTE, _with(1, pagerduty_configs=[{}]), r"pagerduty_configs\[0\] needs exactly one of routing_key"),
    (ROUTE, _with(1, pagerduty_configs=[{"routing_key": "a", "service_key": "b"}]), "it has routing_key, service_key"),
    (ROUTE, _with(2, email_configs=[{"to": "a@b"}]), r"email_configs\[0\] needs from"),
    (ROUTE, _with(2, email_configs=[{"to": "a@b", "from": "c@d", "smarthost": "smtp.example.com"}]),
     "smarthost must be host:port"),
    ({"group_by": ["alertname"]}, RECEIVERS, "monitoring_alertmanager_route needs receiver"),
    ({"receiver": "slack"}, RECEIVERS, "sends to receiver slack, which monitoring_alertmanager_receivers does not declare"),
    ({**ROUTE, "routes": [{"receiver": "pagerduty"}]}, RECEIVERS, r"route.routes\[0\] sends to receiver pagerduty"),
    ({**ROUTE, "group_wait": "30 seconds"}, RECEIVERS, "group_wait '30 seconds' is no duration"),
    ({**ROUTE, "match": {"severity": "critical"}}, RECEIVERS, "match and match_re are deprecated: use matchers"),
    ({**ROUTE, "matchers": 'severity="critical"'}, RECEIVERS, "matchers must be a list"),
])
def test_bad_input_names_the_fix(route, receivers, message):
    with pytest.raises(AlertmanagerError, match=message) as caught:
        alertmanager_config(route, receivers)
    assert SECRET not in str(caught.value) and "secret-routing-key" not in str(caught.value)


def test_the_filter_raises_ansibles_error_without_the_secret():
    with pytest.raises(AnsibleFilterError, match="needs channel") as caught:
        filter_config(ROUTE, _with(0, slack_configs=[{"api_url": SECRET}]))
    assert SECRET not in str(caught.value)


def test_the_roles_default_is_valid():
    """On by default, the role's own route and receivers must pass its own check."""
    defaults = yaml.safe_load((Path(__file__).resolve().parents[4] / "roles/monitoring/defaults/main.yml").read_text())
    assert defaults["monitoring_alertmanager_enabled"] is True
    alertmanager_config(defaults["monitoring_alertmanager_route"], defaults["monitoring_alertmanager_receivers"])
