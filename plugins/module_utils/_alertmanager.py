# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Alertmanager's routing tree and receivers, checked before any host changes.

``monitoring_alertmanager_route`` and ``monitoring_alertmanager_receivers`` are written in
Alertmanager's own format, so its documentation applies to them.  :func:`alertmanager_config`
checks what Alertmanager would only reject on the host (``amtool check-config``), or worse
accept and never deliver: a route to a receiver that does not exist, a misspelt
``webhook_config``, a Slack receiver without its URL, a PagerDuty one without its key, an
e-mail one without its relay.  Messages name the receiver and the field, never a value:
URLs and keys are secrets.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

# The receiver kinds this collection checks; the others Alertmanager knows are refused by
# name, so a typo ("webhook_config") is an error here rather than a receiver that is silent.
KINDS = ("webhook_configs", "slack_configs", "pagerduty_configs", "email_configs")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_ROUTE_DURATIONS = ("group_wait", "group_interval", "repeat_interval")
_ROUTE_KEYS = {"receiver", "group_by", "continue", "matchers", "routes", "mute_time_intervals",
               "active_time_intervals", *_ROUTE_DURATIONS}


class AlertmanagerError(ValueError):
    """The routing tree or a receiver is not what Alertmanager needs."""


def _one_of(config: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    return [f for f in fields if config.get(f) not in (None, "")]


def _check_webhook(where: str, config: Mapping[str, Any]) -> None:
    given = _one_of(config, ("url", "url_file"))
    if len(given) != 1:
        raise AlertmanagerError(f"{where} needs exactly one of url (http:// or https://, from vault) or url_file")
    url = config.get("url")
    if url is not None and not re.match(r"^https?://[^\s/]+", str(url)):
        raise AlertmanagerError(f"{where}: url must start with http:// or https:// and name a host")


def _check_slack(where: str, config: Mapping[str, Any]) -> None:
    if len(_one_of(config, ("api_url", "api_url_file"))) != 1:
        raise AlertmanagerError(f"{where} needs exactly one of api_url (the Slack incoming-webhook URL, "
                                "from vault) or api_url_file")
    if not str(config.get("channel") or "").strip():
        raise AlertmanagerError(f"{where} needs channel (for example '#aphrodite-alerts')")


def _check_pagerduty(where: str, config: Mapping[str, Any]) -> None:
    given = _one_of(config, ("routing_key", "routing_key_file", "service_key", "service_key_file"))
    if len(given) != 1:
        raise AlertmanagerError(f"{where} needs exactly one of routing_key (Events API v2 integration key, "
                                "from vault), routing_key_file, service_key or service_key_file"
                                + (f"; it has {', '.join(given)}" if given else ""))


def _check_email(where: str, config: Mapping[str, Any]) -> None:
    for field, hint in (("to", "the address alerts go to"), ("from", "the sender address"),
                        ("smarthost", "the SMTP relay as host:port")):
        if not str(config.get(field) or "").strip():
            raise AlertmanagerError(f"{where} needs {field} ({hint})")
    if not re.match(r"^\[?[^\s\]]+\]?:[0-9]+$", str(config["smarthost"])):
        raise AlertmanagerError(f"{where}: smarthost must be host:port, for example smtp.example.com:587")
    if config.get("auth_password") not in (None, "") and config.get("auth_password_file") not in (None, ""):
        raise AlertmanagerError(f"{where} has both auth_password and auth_password_file; keep one")


_CHECKS = {
    "webhook_configs": _check_webhook,
    "slack_configs": _check_slack,
    "pagerduty_configs": _check_pagerduty,
    "email_configs": _check_email,
}


def validate_receivers(receivers: Any) -> list[dict]:
    """The receivers, checked; each is ``{name, <kind>_configs: [...]}`` in Alertmanager's format."""
    if not isinstance(receivers, Sequence) or isinstance(receivers, (str, bytes)) or not receivers:
        raise AlertmanagerError("monitoring_alertmanager_receivers must be a non-empty list of receivers "
                                "({name, webhook_configs | slack_configs | pagerduty_configs | email_configs})")
    names: set[str] = set()
    for index, receiver in enumerate(receivers):
        if not isinstance(receiver, Mapping) or not str(receiver.get("name") or "").strip():
            raise AlertmanagerError(f"monitoring_alertmanager_receivers[{index}] needs a name")
        name = str(receiver["name"])
        if name in names:
            raise AlertmanagerError(f"receiver {name} is declared twice in monitoring_alertmanager_receivers")
        names.add(name)
        unknown = sorted(set(receiver) - {"name", *KINDS})
        if unknown:
            raise AlertmanagerError(f"receiver {name} has {', '.join(unknown)}; a receiver holds name and "
                                    f"any of {', '.join(KINDS)}")
        for kind in KINDS:
            if kind not in receiver:
                continue
            configs = receiver[kind]
            if not isinstance(configs, Sequence) or isinstance(configs, (str, bytes)) or not configs:
                raise AlertmanagerError(f"receiver {name}: {kind} must be a non-empty list")
            for position, config in enumerate(configs):
                where = f"receiver {name}, {kind}[{position}]"
                if not isinstance(config, Mapping):
                    raise AlertmanagerError(f"{where} must be a mapping")
                _CHECKS[kind](where, config)
                resolved = config.get("send_resolved", True)
                if not isinstance(resolved, bool):
                    raise AlertmanagerError(f"{where}: send_resolved must be true or false")
    return [dict(receiver) for receiver in receivers]


def _check_route(route: Any, names: set[str], where: str, top: bool) -> None:
    if not isinstance(route, Mapping):
        raise AlertmanagerError(f"{where} must be a mapping in Alertmanager's route format")
    unknown = sorted(set(route) - _ROUTE_KEYS)
    if unknown:
        raise AlertmanagerError(f"{where} has {', '.join(unknown)}; a route holds {', '.join(sorted(_ROUTE_KEYS))} "
                                "(match and match_re are deprecated: use matchers)")
    receiver = route.get("receiver")
    if top and not receiver:
        raise AlertmanagerError(f"{where} needs receiver, the name of the receiver every alert goes to by default")
    if receiver and receiver not in names:
        raise AlertmanagerError(f"{where} sends to receiver {receiver}, which monitoring_alertmanager_receivers "
                                f"does not declare (it has {', '.join(sorted(names))})")
    for field in _ROUTE_DURATIONS:
        if field in route and not _DURATION.match(str(route[field])):
            raise AlertmanagerError(f"{where}: {field} {route[field]!r} is no duration; write it like 30s, 5m or 4h")
    if "matchers" in route and (not isinstance(route["matchers"], Sequence) or isinstance(route["matchers"], str)):
        raise AlertmanagerError(f"{where}: matchers must be a list such as ['severity=\"critical\"']")
    for index, child in enumerate(route.get("routes") or []):
        _check_route(child, names, f"{where}.routes[{index}]", top=False)


def alertmanager_config(route: Any, receivers: Any) -> dict:
    """Alertmanager's configuration (route and receivers) after the checks above."""
    checked = validate_receivers(receivers)
    _check_route(route, {r["name"] for r in checked}, "monitoring_alertmanager_route", top=True)
    return {"route": dict(route), "receivers": checked}
