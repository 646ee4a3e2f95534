"""``aphrodite-deploy deploy``: progress, the summary table, drift, failures and exit statuses, from event streams."""

from __future__ import annotations

import io
import json

import pytest
from _eventlib import ROOT, FakeRun, Stream, parse

from aphrodite_deploy import cli
from aphrodite_deploy.events import RunLog, StageMap, playbook_plays, result_message
from aphrodite_deploy.progress import Progress

PREFLIGHT = "Preflight | plan the fleet from GPU facts"
ENGINES = "Engines | image, environment and new replicas"
COMMON = "Base layer of every host"
# Plays of site.yml: the "N" of "stage k/N".
TOTAL = StageMap.from_playbook(ROOT / "site.yml").total


def converged() -> Stream:
    s = Stream().play_start(PREFLIGHT).task("Read the GPUs of each node")
    s.ok("gpu1", "Read the GPUs of each node").ok("gpu2", "Read the GPUs of each node")
    s.play_start(COMMON).task("Install base packages")
    for host in ("lb1", "gpu1", "gpu2"):
        s.ok(host, "Install base packages")
    s.play_start(ENGINES).task("Run the engine container of each replica")
    s.ok("gpu1", "Run the engine container of each replica").skipped("gpu2", "Run the engine container of each replica")
    return s.stats(gpu1={"ok": 3}, gpu2={"ok": 2, "skipped": 1}, lb1={"ok": 1})


def run(argv: list[str], fake: FakeRun, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "run_playbook", fake)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run_deploy(parse(*argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_converged_run_prints_a_table_per_host_and_exits_0(monkeypatch):
    fake = FakeRun(converged().events)
    code, out, err = run(["deploy", "-i", "inventories/lab"], fake, monkeypatch)
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["HOST", "OK", "CHANGED", "FAILED", "UNREACHABLE", "SKIPPED", "RESCUED", "IGNORED"]
    assert lines[1].split() == ["gpu1", "3", "0", "0", "0", "0", "0", "0"]
    assert lines[2].split() == ["gpu2", "2", "0", "0", "0", "1", "0", "0"]
    assert "deploy: converged in 1m23s: 3 host(s), 0 changed." in out
    assert "Artefacts: /tmp/artifacts/ident" in out
    call, = fake.calls
    assert call["playbook"] == "site.yml" and call["check"] is False and call["vault_args"] == []
    assert call["inventory"] == "inventories/lab" and call["command"] == "deploy"
    assert call["project_dir"] == ROOT


def test_progress_names_each_stage_and_host_off_a_terminal(monkeypatch):
    code, _out, err = run(["deploy", "-i", "inventories/lab"], FakeRun(converged().events), monkeypatch)
    assert code == 0
    lines = err.splitlines()
    assert lines[0] == f"deploy: stage 1/{TOTAL} preflight · {PREFLIGHT} ..."
    assert lines[1].startswith("✓ preflight: gpu1 ok=1 changed=0 · gpu2 ok=1 changed=0 (")
    assert lines[2] == f"deploy: stage 2/{TOTAL} common · {COMMON} ..."
    assert lines[-1].startswith("✓ engines: gpu1 ok=1 changed=0 · gpu2 ok=0 changed=0 (")


def test_live_progress_draws_a_bar_per_stage_and_host():
    out = io.StringIO()
    progress = Progress(out, StageMap.from_playbook(ROOT / "site.yml"), live=True, title="deploy", clock=iter(range(1000)).__next__)
    s = Stream().play_start(ENGINES).task("Check Docker").task("Run the engine container of each replica")
    s.ok("gpu1", "Check Docker").ok("gpu1", "Run the engine container of each replica", changed=True).ok("gpu2", "Check Docker")
    for event in s.events:
        progress(event)
    screen = out.getvalue()
    assert "  gpu1  [" + "#" * 20 + "]  task 2/2  ok 2  changed 1" in screen
    assert "  gpu2  [" + "#" * 10 + "-" * 10 + "]  task 1/2  ok 1  changed 0" in screen
    assert "\x1b[" in screen  # redrawn in place
    assert f"deploy: stage 1/{TOTAL} engines · " + ENGINES in screen
    progress.close()
    assert out.getvalue().rstrip().splitlines()[-1].startswith("\x1b[4F\x1b[J✓ engines: gpu1 ok=2 changed=1 · gpu2 ok=1 changed=0")


def test_failures_and_unreachable_hosts_exit_4_with_the_reason(monkeypatch):
    s = Stream().play_start(ENGINES).task("Wait for the new replicas")
    s.failed("gpu1", "Wait for the new replicas", results=[
        {"failed": True, "_ansible_item_label": "llama-3-1-8b-0", "msg": "Status code was -1 and not [200]"}],
        msg="One or more items failed")
    s.failed("gpu2", "Probe", ignore_errors=True, msg="ignored on purpose")
    s.unreachable("lb1", "Gathering Facts", "Failed to connect to the host via ssh: Connection timed out")
    s.stats(gpu1={"ok": 4, "failures": 1}, gpu2={"ok": 5, "ignored": 1}, lb1={"dark": 1})
    code, out, err = run(["deploy", "-i", "inv"], FakeRun(s.events, status="failed", rc=2), monkeypatch)
    assert code == cli.EXIT_FAILED
    assert "  gpu1 failed: engines: Wait for the new replicas: llama-3-1-8b-0: Status code was -1 and not [200]" in out
    assert "  lb1 unreachable: engines: Gathering Facts: Failed to connect to the host via ssh" in out
    assert "ignored on purpose" not in out
    assert "deploy: failed after 1m23s: gpu1, lb1 (unreachable)." in out
    assert "✗ gpu1 failed in engines: Wait for the new replicas" in err
    payload = json.loads(run(["deploy", "-i", "inv", "--json"], FakeRun(s.events, "failed", 2), monkeypatch)[1])
    assert payload["result"] == "failed" and payload["exit_status"] == 4
    assert payload["hosts"]["gpu2"]["ignored"] == 1 and payload["hosts"]["lb1"]["unreachable"] == 1
    assert [(f["host"], f["unreachable"]) for f in payload["failures"]] == [("gpu1", False), ("lb1", True)]


def test_check_reports_drift_per_host_and_exits_3(monkeypatch):
    s = Stream().play_start(PREFLIGHT).ok("gpu1", "Read the GPUs of each node")
    s.play_start(ENGINES).task("Run the engine container of each replica")
    s.ok("gpu1", "Run the engine container of each replica", changed=True, results=[
        {"changed": True, "_ansible_item_label": "llama-3-1-8b-0"}, {"changed": False, "_ansible_item_label": "x"}])
    s.ok("gpu1", "Write the engine environment file", changed=True, censored="hidden (no_log)")
    s.ok("gpu2", "Run the engine container of each replica")
    s.stats(gpu1={"ok": 3, "changed": 2}, gpu2={"ok": 1})
    fake = FakeRun(s.events)
    code, out, _ = run(["deploy", "-i", "inv", "--check", "--limit", "gpu_nodes", "--tags", "engines"], fake, monkeypatch)
    assert code == cli.EXIT_DRIFT
    assert fake.calls[0]["check"] is True and fake.calls[0]["limit"] == "gpu_nodes" and fake.calls[0]["tags"] == "engines"
    drift = out[out.index("Drift"):].splitlines()
    assert drift[:5] == ["Drift (what deploy would change):",
                         "  gpu1: 2 task(s) would change",
                         "    engines: Run the engine container of each replica [llama-3-1-8b-0]",
                         "    engines: Write the engine environment file",
                         "  gpu2: no change"]
    assert "deploy --check: drift on 1 of 2 host(s) (2 task(s) would change)" in out
    payload = json.loads(run(["deploy", "-i", "inv", "--check", "--json"], FakeRun(s.events), monkeypatch)[1])
    assert payload["result"] == "drift" and payload["exit_status"] == 3
    assert payload["drift"]["gpu1"][0] == {"stage": "engines", "task": "Run the engine container of each replica",
                                           "items": ["llama-3-1-8b-0"]}
    assert "changed" not in payload


def test_check_without_drift_exits_0(monkeypatch):
    code, out, _ = run(["deploy", "-i", "inv", "--check"], FakeRun(converged().events), monkeypatch)
    assert code == cli.EXIT_OK
    assert "Drift: none, every host matches the inventory." in out
    assert "deploy --check: in sync (3 host(s))" in out


def test_a_run_that_ends_before_any_host_shows_ansibles_last_lines(monkeypatch):
    code, out, _ = run(["deploy", "-i", "inv"], FakeRun([], status="failed", rc=4), monkeypatch)
    assert code == cli.EXIT_FAILED
    assert "ansible-playbook ended with failed (exit 4) before any host failed; its last lines:" in out
    assert "PLAY RECAP\nlast line" in out


def test_interrupted_run_exits_130(monkeypatch):
    s = Stream().play_start(ENGINES).ok("gpu1", "Check Docker")
    code, out, _ = run(["deploy", "-i", "inv"], FakeRun(s.events, status="canceled", rc=254), monkeypatch)
    assert code == cli.EXIT_INTERRUPTED
    assert "interrupted after" in out


def test_unusable_vault_password_file_exits_1(monkeypatch, tmp_path):
    code, out, err = run(["deploy", "-i", "inv", "--vault-password-file", str(tmp_path / "missing")],
                         FakeRun([]), monkeypatch)
    assert code == cli.EXIT_ERROR and out == ""
    assert f"aphrodite-deploy deploy: vault password file {tmp_path / 'missing'} does not exist" in err


def test_project_dir_must_be_a_checkout(monkeypatch, tmp_path):
    code, _, err = run(["deploy", "-i", "inv", "--project-dir", str(tmp_path)], FakeRun([]), monkeypatch)
    assert code == cli.EXIT_ERROR
    assert "no aphrodite.baremetal checkout (site.yml and playbooks/)" in err and "--project-dir" in err


def test_stages_are_the_playbook_files_site_yml_imports():
    plays = playbook_plays(ROOT / "site.yml")
    stages = list(dict.fromkeys(stage for stage, _ in plays))
    assert stages[:2] == ["probe", "preflight"] and "engines" in stages
    assert StageMap(plays).stage_of(PREFLIGHT) == "preflight"
    assert StageMap(plays).stage_of("A play nobody knows") == "A play nobody knows"


def test_no_log_results_stay_hidden_and_loops_name_the_failed_item():
    assert result_message({"censored": "the output has been hidden", "failed": True}) == "the output has been hidden (no_log)"
    assert result_message({"msg": "  two\n lines ", "stderr": "more"}) == "two lines"
    assert result_message({"rc": 3, "stderr": "", "failed": True}) == "exit status 3"
    log = RunLog()
    log.handle({"event": "runner_on_failed", "event_data": {"host": "h", "task": "t", "res": {"censored": "x"}}})
    assert log.failures[0].message == "x (no_log)"


def test_counts_come_from_results_when_the_run_ended_without_a_recap():
    log = RunLog()
    for event in Stream().play_start("P").ok("h", "a", changed=True).failed("h", "b", msg="no").events:
        log.handle(event)
    assert log.host_recap() == {"h": {"ok": 1, "changed": 1, "failed": 1, "unreachable": 0, "skipped": 0,
                                      "rescued": 0, "ignored": 0}}


def test_secrets_help_and_exit_codes_are_in_help():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "aphrodite_deploy", "deploy", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for text in ("--check", "drift", "exit status:", "APHRODITE_VAULT_PASSWORD", "--vault-password-file",
                 "3    deploy --check: drift"):
        assert text in result.stdout, text


@pytest.mark.parametrize("command", [["deploy"], ["status"], ["rolling-restart"], ["upgrade", "--image", "x:1"],
                                     ["lab", "up"], ["lab", "down"], ["lab", "status"], ["plan"]])
def test_every_command_has_help_and_json(command):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "aphrodite_deploy", *command, "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "--json" in result.stdout


def test_a_large_fleet_shows_the_hosts_furthest_behind_and_sums_the_rest():
    out = io.StringIO()
    progress = Progress(out, StageMap(), live=True, clock=iter(range(10_000)).__next__)
    s = Stream().play_start("Engines").task("a").task("b")
    for i in range(40):
        s.ok(f"gpu{i:02d}", "a")
        if i >= 5:
            s.ok(f"gpu{i:02d}", "b", changed=True)
    s.failed("gpu03", "b", msg="boom")
    for event in s.events:
        progress(event)
    last_block = out.getvalue().split("\x1b[J")[-1].splitlines()
    assert len(last_block) == 1 + 12 + 2
    assert last_block[1].startswith("  gpu00  [") and "  … and 28 more host(s), further along" in last_block
    progress.close()
    summary = out.getvalue().rstrip().splitlines()[-1]
    assert "engines" not in summary and "40 hosts ok=75 changed=35 failed=1 (failed or unreachable: gpu03)" in summary


def test_a_serial_play_is_one_stage_across_its_batches():
    out = io.StringIO()
    progress = Progress(out, StageMap.from_playbook(ROOT / "site.yml"), live=False, title="deploy",
                        clock=iter(range(1000)).__next__)
    replace = "Engines | replace changed replicas one at a time"
    s = Stream().play_start(ENGINES).task("t").ok("gpu1", "t")
    s.play_start(replace).task("t").ok("gpu1", "t").play_start(replace).task("t").ok("gpu2", "t")
    s.play_start("Edge | HAProxy and the virtual IP").task("t").ok("lb1", "t")
    for event in s.events:
        progress(event)
    progress.close()
    stages = [line.split(" · ")[0] for line in out.getvalue().splitlines() if line.startswith("deploy: stage")]
    assert stages == [f"deploy: stage 1/{TOTAL} engines", f"deploy: stage 2/{TOTAL} engines",
                      f"deploy: stage 2/{TOTAL} engines", f"deploy: stage 3/{TOTAL} edge"]


def test_a_run_refused_by_preflight_exits_2_and_says_no_host_changed(monkeypatch):
    s = Stream().play_start(PREFLIGHT).task("Check the plan")
    s.failed("localhost", "Check the plan",
             msg="engine_args of llama-8b: --tensor-parallel-size is set by the plan; remove it from engine_args")
    s.stats(localhost={"ok": 2, "failures": 1})
    code, out, _ = run(["deploy", "-i", "inv"], FakeRun(s.events, status="failed", rc=2), monkeypatch)
    assert code == cli.EXIT_INFEASIBLE
    assert "remove it from engine_args" in out
    assert "deploy: refused by preflight after" in out and "no host changed" in out
    payload = json.loads(run(["deploy", "-i", "inv", "--json"], FakeRun(s.events, "failed", 2), monkeypatch)[1])
    assert payload["result"] == "refused" and payload["exit_status"] == 2


def test_a_failure_after_preflight_or_an_unreachable_host_in_it_is_still_exit_4(monkeypatch):
    s = Stream().play_start(PREFLIGHT).task("Read the GPUs of each node")
    s.unreachable("gpu2", "Read the GPUs of each node", "Failed to connect to the host via ssh")
    s.stats(gpu2={"dark": 1})
    assert run(["deploy", "-i", "inv"], FakeRun(s.events, status="failed", rc=4), monkeypatch)[0] == cli.EXIT_FAILED
    s = converged()
    s.play_start(ENGINES).failed("gpu1", "Run the engine container of each replica", msg="boom")
    assert run(["deploy", "-i", "inv"], FakeRun(s.events, status="failed", rc=2), monkeypatch)[0] == cli.EXIT_FAILED
