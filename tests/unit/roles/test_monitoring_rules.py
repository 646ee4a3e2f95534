"""The alert rules, rendered from the role's template as Ansible renders them, pass
``promtool check rules`` and fire in promtool's unit tests (roles/monitoring/files/tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "monitoring"
TEMPLATE = ROLE / "templates" / "etc" / "prometheus" / "rules" / "aphrodite.rules.yml.j2"
RULE_TESTS = sorted((ROLE / "files" / "tests").glob("*.yml"))
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
# The role's per-alert durations; monitoring_alert_for (empty by default) overrides them.
ALERT_FOR = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__monitoring_alert_for_defaults"]


def render(**overrides) -> str:
    """The rules file as the template module writes it (trim_blocks, like Ansible)."""
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["comment"] = lambda text: "#\n# " + text + "\n#"
    variables = {**DEFAULTS, **overrides}
    variables["__monitoring_alert_for"] = {**ALERT_FOR, **variables["monitoring_alert_for"]}
    return env.from_string(TEMPLATE.read_text()).render(ansible_managed="Ansible managed", **variables)


def _rules(text: str) -> dict:
    return {rule["alert"]: rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/bootstrap.sh (it installs the Debian package prometheus)"
    return path


@pytest.fixture()
def rules_dir(tmp_path) -> Path:
    (tmp_path / "aphrodite.rules.yml").write_text(render())
    for test in RULE_TESTS:
        shutil.copy(test, tmp_path / test.name)
    return tmp_path


def test_rendered_rules_pass_promtool_check(promtool, rules_dir):
    proc = subprocess.run([promtool, "check", "rules", "aphrodite.rules.yml"], cwd=rules_dir,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules(render()))} rules found" in proc.stdout


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_alert_rules_pass_their_promtool_unit_tests(promtool, rules_dir, test_file):
    proc = subprocess.run([promtool, "test", "rules", test_file.name], cwd=rules_dir,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_tests_catch_a_changed_threshold(promtool, rules_dir):
    """The unit tests pin the default thresholds: a rules file with another one fails them."""
    (rules_dir / "aphrodite.rules.yml").write_text(render(monitoring_alert_kv_cache_usage=0.97))
    proc = subprocess.run([promtool, "test", "rules", RULE_TESTS[0].name], cwd=rules_dir,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "AphroditeKVCacheNearlyFull" in proc.stdout + proc.stderr


def test_every_alert_fires_in_some_unit_test():
    fired = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            fired |= {check["alertname"] for check in case.get("alert_rule_test", []) if check.get("exp_alerts")}
    assert set(_rules(render())) == fired


def test_the_issues_alerts_are_all_there():
    assert set(_rules(render())) >= {
        "AphroditeReplicaDown", "AphroditeLBBackendDown", "AphroditeKVCacheNearlyFull",
        "AphroditeRequestsWaitingGrowing", "AphroditeTTFTHigh", "AphroditeGPUXidError",
        "AphroditeGPUTemperatureHigh", "AphroditeTLSCertificateExpiring", "AphroditeDiskNearlyFull",
        "AphroditeExporterDown"}


def test_kv_cache_alert_is_above_90_percent_for_5_minutes_by_default():
    rule = _rules(render())["AphroditeKVCacheNearlyFull"]
    assert rule["expr"] == "aphrodite:kv_cache_usage_perc > 0.9"
    assert rule["for"] == "5m"


@pytest.mark.parametrize(("variable", "value", "alert", "fragment"), [
    ("monitoring_alert_ttft_p95_seconds", 2.5, "AphroditeTTFTHigh", "> 2.5"),
    ("monitoring_alert_kv_cache_usage", 0.8, "AphroditeKVCacheNearlyFull", "> 0.8"),
    ("monitoring_alert_waiting_requests", 32, "AphroditeRequestsWaitingGrowing", "> 32"),
    ("monitoring_alert_gpu_temperature_celsius", 80, "AphroditeGPUTemperatureHigh", "> 80"),
    ("monitoring_alert_cert_expiry_days", 30, "AphroditeTLSCertificateExpiring", "< 30 * 86400"),
    ("monitoring_alert_disk_free_ratio", 0.2, "AphroditeDiskNearlyFull", "< 0.2"),
])
def test_thresholds_come_from_variables(variable, value, alert, fragment):
    assert fragment in _rules(render(**{variable: value}))[alert]["expr"]
    assert fragment not in _rules(render())[alert]["expr"]


@pytest.mark.parametrize("alert", sorted(_rules(render())))
def test_every_alert_says_what_is_wrong_and_how_bad(alert):
    rule = _rules(render())[alert]
    assert rule["labels"]["severity"] in {"critical", "warning", "none"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_with_a_duration_has_one_in_the_roles_table():
    """__monitoring_alert_for_defaults names exactly the alerts that wait before firing."""
    waiting = {name for name, rule in _rules(render()).items() if "for" in rule}
    assert waiting == set(ALERT_FOR)


def test_an_alert_duration_overrides_only_its_alert_and_reaches_the_description():
    rules = _rules(render(monitoring_alert_for={"AphroditeReplicaDown": "20s"}))
    assert rules["AphroditeReplicaDown"]["for"] == "20s"
    assert "for 20s" in rules["AphroditeReplicaDown"]["annotations"]["description"]
    assert rules["AphroditeLBServerDown"]["for"] == ALERT_FOR["AphroditeLBServerDown"]


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_a_stopped_replica_is_delivered_within_3_minutes_with_the_defaults():
    """Worst case from the stop to Alertmanager sending it: the scrape that fails, the
    evaluation that sees it, the rule's for:, the route's group_wait."""
    worst = (_seconds(DEFAULTS["monitoring_scrape_interval"]) + _seconds(DEFAULTS["monitoring_evaluation_interval"])
             + _seconds(ALERT_FOR["AphroditeReplicaDown"]) + _seconds(DEFAULTS["monitoring_alertmanager_route"]["group_wait"]))
    assert worst <= 170, f"{worst} s leaves no margin under 3 minutes"
