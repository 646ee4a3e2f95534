"""``rolling-restart`` and ``upgrade``: what was rolled, where it stopped, what still serves; extra vars; exits."""

from __future__ import annotations

import io
import json

import pytest
from _eventlib import FakeRun, Stream, parse, recorded

from aphrodite_deploy import cli
from aphrodite_deploy.rolling import RollingProgress

ROLL = "Rolling | one replica at a time, the canary node first"
HEALTH = "Wait until each replica answers /health"
REFUSED = "Status code was -1 and not [200]: Request failed: <urlopen error [Errno 111] Connection refused>"
ORDER = [{"replica": "llama-3-1-8b-0", "host": "gpu1", "nodes": 1}, {"replica": "llama-3-1-8b-1", "host": "gpu2", "nodes": 1},
         {"replica": "llama-3-1-8b-2", "host": "gpu3", "nodes": 1}]


def mark(s: Stream, replica: str, host: str, phase: str, **extra: str) -> Stream:
    return s.ok(host, "Note", __engine_rolling_progress=dict(replica=replica, host=host, phase=phase, **extra))


def failed_canary() -> Stream:
    s = Stream().play_start("Rolling | check the request, find the replicas and stage the image")
    s.ok("gpu1", "Report the replicas to roll, in order", aphrodite_rolling_order=ORDER)
    s.play_start(ROLL)
    for phase in ("started", "drained", "restarted"):
        mark(s, "llama-3-1-8b-0", "gpu1", phase)
    s.failed("gpu1", HEALTH, msg="One or more items failed",
             results=[{"failed": True, "_ansible_item_label": "llama-3-1-8b-0", "msg": REFUSED}])
    mark(s, "llama-3-1-8b-0", "gpu1", "failed", task=HEALTH, message=REFUSED)
    s.failed("gpu1", "Stop the roll at the failed replica", msg="llama-3-1-8b-0 on gpu1 failed")
    return s.stats(gpu1={"ok": 30, "failures": 1, "rescued": 1}, gpu2={"ok": 3}, gpu3={"ok": 3})


def run(argv: list[str], events: list[dict], monkeypatch: pytest.MonkeyPatch, status: str = "successful",
        rc: int = 0) -> tuple[int, str, str, FakeRun]:
    fake = FakeRun(events, status=status, rc=rc)
    monkeypatch.setattr(cli, "run_playbook", fake)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_rolling(parse(*argv), out, err)
    return code, out.getvalue(), err.getvalue(), fake


def test_recorded_lab_rolling_restart(monkeypatch):
    code, out, err, fake = run(["rolling-restart", "-i", "inventories/lab", "--replicas", "llama-3-1-8b-0"],
                               recorded("rolling_restart_lab_events.json"), monkeypatch)
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert lines[0] == "Rolling restart: 1 replica(s)"
    assert lines[1].startswith("  ✓ llama-3-1-8b-0  gpu1  canary  drained ")
    assert "· restarted " in lines[1] and "· healthy and warm " in lines[1] and "· back in the pool " in lines[1]
    assert lines[2].startswith("Done in 1m23s: 1 of 1 replica(s) restarted; every replica is back in the pool.")
    assert "  llama-3-1-8b-0 on gpu1 (canary): draining" in err and "  llama-3-1-8b-0: back in the pool" in err
    call, = fake.calls
    assert call["playbook"] == "playbooks/rolling.yml" and call["command"] == "rolling-restart"
    assert call["extravars"] == {"aphrodite_rolling_action": "restart", "aphrodite_rolling_replicas": ["llama-3-1-8b-0"],
                                 "aphrodite_rolling_drain_timeout": 600}


def test_upgrade_that_fails_at_the_canary_says_what_serves(monkeypatch):
    code, out, err, _ = run(["upgrade", "-i", "inv", "--image", "engine:broken"], failed_canary().events, monkeypatch,
                            status="failed", rc=2)
    assert code == cli.EXIT_FAILED
    assert out.splitlines()[0] == "Upgrade to engine:broken: 3 replica(s)"
    assert f'  ✗ llama-3-1-8b-0  gpu1  canary  failed at "{HEALTH}": {REFUSED} (after drained 1.0 s · restarted 1.0 s)' in out
    assert f'Stopped at the first failure: llama-3-1-8b-0 on gpu1 failed at "{HEALTH}": {REFUSED}' in out
    assert "llama-3-1-8b-0 stays out of the pool (maintenance on every load balancer)." in out
    assert "Not touched, still serving: llama-3-1-8b-1, llama-3-1-8b-2." in out
    assert "roll back: upgrade --image <the previous image>" in out
    assert f'  llama-3-1-8b-0: FAILED at "{HEALTH}": {REFUSED}' in err


def test_failed_upgrade_as_json(monkeypatch):
    code, out, _, _ = run(["upgrade", "-i", "inv", "--image", "engine:broken", "--json"], failed_canary().events,
                          monkeypatch, status="failed", rc=2)
    payload = json.loads(out)
    assert code == 4 and payload["result"] == "failed" and payload["exit_status"] == 4
    roll = payload["roll"]
    assert roll["canary"] == "llama-3-1-8b-0" and roll["untouched"] == ["llama-3-1-8b-1", "llama-3-1-8b-2"]
    assert roll["failed"]["replica"] == "llama-3-1-8b-0" and roll["failed"]["failed_task"] == HEALTH
    assert roll["failed"]["steps"] == {"drained": 1.0, "restarted": 1.0}
    assert payload["hosts"]["gpu1"]["rescued"] == 1 and payload["image"] == "engine:broken"


def test_a_replica_rolled_before_the_failure_is_named_as_serving(monkeypatch):
    s = Stream().play_start(ROLL)
    s.ok("gpu1", "Report the replicas to roll, in order", aphrodite_rolling_order=ORDER)
    for phase in ("started", "drained", "restarted", "healthy", "done"):
        mark(s, "llama-3-1-8b-0", "gpu1", phase)
    for phase in ("started", "drained"):
        mark(s, "llama-3-1-8b-1", "gpu2", phase)
    mark(s, "llama-3-1-8b-1", "gpu2", "failed", task="Wait until no load balancer has a request on the replica",
         message="Task failed after 300 retries")
    code, out, _, _ = run(["rolling-restart", "-i", "inv"], s.events, monkeypatch, status="failed", rc=2)
    assert code == 4
    assert "Restarted before the failure and serving again: llama-3-1-8b-0." in out
    assert "Not touched, still serving: llama-3-1-8b-2." in out


def test_a_failure_before_any_replica_touched_nothing(monkeypatch):
    s = Stream().play_start("Rolling | check the request, find the replicas and stage the image")
    s.failed("gpu2", "Pull the engine image", msg="pull access denied for engine, repository does not exist")
    s.stats(gpu1={"ok": 3}, gpu2={"ok": 2, "failures": 1})
    code, out, _, _ = run(["upgrade", "-i", "inv", "--image", "engine:9"], s.events, monkeypatch, status="failed", rc=2)
    assert code == 4
    assert "Stopped before a replica failed: gpu2: Pull the engine image: pull access denied" in out
    assert "No replica was touched." in out


def test_upgrade_passes_the_image_and_its_archive(monkeypatch, tmp_path):
    archive = tmp_path / "engine.tar"
    archive.write_bytes(b"")
    _, _, _, fake = run(["upgrade", "-i", "inv", "--image", "engine:2", "--image-archive", str(archive),
                         "--health-timeout", "20", "--drain-timeout", "30", "--replicas", "a, b"], [], monkeypatch)
    assert fake.calls[0]["extravars"] == {
        "aphrodite_rolling_action": "upgrade", "aphrodite_rolling_replicas": ["a", "b"],
        "aphrodite_rolling_drain_timeout": 30, "engine_health_delay": 2, "engine_health_retries": 10,
        "engine_image": "engine:2", "engine_image_archive": str(archive.resolve())}
    _, _, _, fake = run(["upgrade", "-i", "inv", "--image", "engine:2", "--health-timeout", "900"], [], monkeypatch)
    extravars = fake.calls[0]["extravars"]
    assert (extravars["engine_health_delay"], extravars["engine_health_retries"]) == (5, 180)
    assert extravars["engine_image_archive"] == ""  # pull the new image, not the inventory's archive


def test_a_missing_image_archive_exits_1_before_any_run(monkeypatch, tmp_path):
    code, out, err, fake = run(["upgrade", "-i", "inv", "--image", "e:1", "--image-archive", str(tmp_path / "no.tar")],
                               [], monkeypatch)
    assert code == cli.EXIT_ERROR and fake.calls == []
    assert "image archive" in err and "does not exist" in err


def test_upgrade_needs_an_image():
    with pytest.raises(SystemExit) as exc:
        parse("upgrade", "-i", "inv")
    assert exc.value.code == 2


def test_success_reminds_to_pin_the_image_in_the_inventory(monkeypatch):
    s = Stream().play_start(ROLL)
    for phase in ("started", "drained", "restarted", "healthy", "done"):
        mark(s, "llama-3-1-8b-0", "gpu1", phase)
    code, out, _, _ = run(["upgrade", "-i", "inv", "--image", "engine:2"], s.events, monkeypatch)
    assert code == 0
    assert "Set engine_image: engine:2 in the inventory" in out


def test_interrupted_roll_says_a_replica_may_be_drained(monkeypatch):
    s = Stream().play_start(ROLL)
    mark(s, "llama-3-1-8b-0", "gpu1", "started")
    code, out, _, _ = run(["rolling-restart", "-i", "inv"], s.events, monkeypatch, status="canceled", rc=254)
    assert code == cli.EXIT_INTERRUPTED
    assert "Interrupted: a replica may be left drained" in out


def test_progress_lines_follow_the_markers():
    out = io.StringIO()
    progress = RollingProgress(out)
    for event in failed_canary().events:
        progress(event)
    lines = out.getvalue().splitlines()
    assert lines[:6] == ["· Rolling | check the request, find the replicas and stage the image", f"· {ROLL}",
                         "  llama-3-1-8b-0 on gpu1 (canary): draining", "  llama-3-1-8b-0: drained",
                         "  llama-3-1-8b-0: restarted", f"  ✗ gpu1: {HEALTH}: llama-3-1-8b-0: {REFUSED}"]


def test_recorded_lab_upgrade_to_an_image_that_never_answers_health(monkeypatch):
    code, out, _, _ = run(["upgrade", "-i", "inventories/lab", "--image", "aphrodite-standin:lab-broken-health"],
                          recorded("upgrade_unhealthy_lab_events.json"), monkeypatch, status="failed", rc=2)
    assert code == cli.EXIT_FAILED
    lines = out.splitlines()
    assert lines[0] == "Upgrade to aphrodite-standin:lab-broken-health: 2 replica(s)"
    assert lines[1].startswith(f'  ✗ llama-3-1-8b-0  gpu1  canary  failed at "{HEALTH}": {REFUSED} (after drained ')
    assert f'Stopped at the first failure: llama-3-1-8b-0 on gpu1 failed at "{HEALTH}"' in out
    assert "Not touched, still serving: llama-3-1-8b-1." in out
    payload = json.loads(run(["upgrade", "-i", "inventories/lab", "--image", "x", "--json"],
                             recorded("upgrade_unhealthy_lab_events.json"), monkeypatch, status="failed", rc=2)[1])
    assert payload["roll"]["planned"] == ["llama-3-1-8b-0", "llama-3-1-8b-1"]
    assert payload["roll"]["untouched"] == ["llama-3-1-8b-1"]
    assert payload["hosts"]["gpu1"]["failed"] == 1 and payload["hosts"]["gpu1"]["rescued"] == 1


def test_a_roll_refused_by_preflight_exits_2(monkeypatch):
    s = Stream().play_start("Preflight | plan the fleet from GPU facts")
    s.failed("localhost", "Check the plan", msg="the plan is infeasible: llama-70b needs 4 GPUs per node")
    s.stats(localhost={"ok": 1, "failures": 1})
    code, out, _, _ = run(["rolling-restart", "-i", "inv"], s.events, monkeypatch, status="failed", rc=2)
    assert code == cli.EXIT_INFEASIBLE
    assert "llama-70b needs 4 GPUs per node" in out
