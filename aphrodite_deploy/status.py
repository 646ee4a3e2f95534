"""``aphrodite-deploy status``: every replica of the plan, from the reports of playbooks/status.yml.

The playbook probes from the load balancers (the only hosts the firewall lets reach engine
ports) and prints three reports that :class:`~.events.RunLog` keeps:

- ``aphrodite_status_lb`` per load balancer: the plan's replicas (servers), each one's
  ``/health`` answer from there, and HAProxy's ``show stat`` rows (its runtime API);
- ``aphrodite_status_metrics`` once: each replica's ``/metrics`` text;
- ``aphrodite_status_containers`` per GPU node: the engine containers Docker runs.

A replica *serves* when every load balancer reaches its ``/health`` with 200 and every
HAProxy that answered has it UP (and, for a multi-node replica, every rank's container runs). Otherwise it is *drained* (in drain or maintenance on a
load balancer: out of the pool on purpose), *unhealthy*, or *missing* (no container).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .events import RunLog

STATES = ("serving", "drained", "unhealthy", "missing", "unknown")
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>[-+0-9.eEinfINFaN]+)(?:\s+\d+)?$")


def parse_metrics(text: str) -> dict[str, float | None]:
    """Requests running and waiting and KV-cache use (0..1) from an engine's /metrics.

    Aphrodite prefixes its metrics with ``aphrodite:``, vLLM with ``vllm:``; label sets
    (one per engine core) are summed, the cache use averaged.
    """
    sums: dict[str, list[float]] = {}
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name = match.group("name").split(":", 1)[-1]
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        sums.setdefault(name, []).append(value)

    def total(*names: str) -> float | None:
        for name in names:
            if name in sums:
                return sum(sums[name])
        return None

    def mean(*names: str) -> float | None:
        for name in names:
            if name in sums and sums[name]:
                return sum(sums[name]) / len(sums[name])
        return None

    return {
        "requests_running": total("num_requests_running"),
        "requests_waiting": total("num_requests_waiting"),
        "kv_cache_usage": mean("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    }


def _container_health(status: str) -> str:
    text = (status or "").lower()
    for word in ("unhealthy", "healthy"):
        if f"({word})" in text:
            return word
    if "health: starting" in text:
        return "starting"
    return ""


@dataclass
class ReplicaStatus:
    name: str
    model: str
    head: str
    address: str
    port: int
    backend: str = ""
    # The name clients ask for (served_model_name); the table shows it, the id stays in model.
    served_name: str = ""
    container: dict[str, Any] | None = None
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    lb: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    metrics: dict[str, float | None] | None = None
    # Multi-node replicas: every node's rank (0 is the head) with its container, in rank order.
    ranks: list[dict[str, Any]] = field(default_factory=list)
    state: str = "unknown"
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "served_name": self.served_name or self.model,
                "head": self.head, "address": self.address, "port": self.port, "backend": self.backend,
                "state": self.state, "problems": list(self.problems),
                "container": self.container, "health": self.health, "load_balancers": self.lb,
                "metrics": self.metrics, "ranks": self.ranks}


@dataclass
class FleetStatus:
    replicas: list[ReplicaStatus]
    load_balancers: dict[str, dict[str, Any]]
    gpu_nodes: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def serving(self) -> int:
        return sum(1 for r in self.replicas if r.state == "serving")

    @property
    def all_serving(self) -> bool:
        return self.serving == len(self.replicas)

    def to_dict(self) -> dict[str, Any]:
        counts = {state: sum(1 for r in self.replicas if r.state == state) for state in STATES}
        return {"replicas": [r.to_dict() for r in self.replicas],
                "summary": {"total": len(self.replicas), "serving": self.serving,
                            "states": {k: v for k, v in counts.items() if v}},
                "load_balancers": self.load_balancers, "gpu_nodes": self.gpu_nodes, "notes": list(self.notes)}


def build_status(log: RunLog) -> FleetStatus:
    """Combine the reports of one status run into a row per replica."""
    lb_reports = log.reports_of("aphrodite_status_lb")
    replicas: dict[str, ReplicaStatus] = {}
    load_balancers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    nodes_of: dict[str, list[str]] = {}
    for report in lb_reports:
        value = report.value if isinstance(report.value, dict) else {}
        servers = value.get("replicas") or []
        for index, nodes in enumerate(value.get("nodes") or []):
            server = _at(servers, index)
            if isinstance(server, dict) and isinstance(nodes, list) and len(nodes) > 1:
                nodes_of[str(server.get("name"))] = [str(n) for n in nodes]
        models = value.get("models") or []
        served = value.get("served") or []
        backends = value.get("backends") or []
        for index, server in enumerate(servers):
            if not isinstance(server, dict) or "name" not in server:
                continue
            name = str(server["name"])
            if name not in replicas:
                replicas[name] = ReplicaStatus(
                    name=name, model=str(models[index]) if index < len(models) else "",
                    head=str(server.get("host", "")), address=str(server.get("address", "")),
                    port=int(server.get("port") or 0), backend=str(backends[index]) if index < len(backends) else "",
                    served_name=str(served[index]) if index < len(served) else "")
        rows: list[dict[str, Any]] | None = None
        error = str(value.get("runtime_api_error") or "")
        text = value.get("runtime_api")
        if isinstance(text, list):
            rows = text
        elif isinstance(text, str) and text.strip():
            try:
                rows = json.loads(text)
            except ValueError:
                error = error or "HAProxy's runtime API answered something that is not JSON"
        load_balancers[report.host] = {"runtime_api": rows is not None, "error": error or None}
        health = value.get("health") or []
        errors = value.get("health_errors") or []
        for index, server in enumerate(servers):
            name = str(server.get("name")) if isinstance(server, dict) else ""
            if name not in replicas:
                continue
            status = health[index] if index < len(health) else -1
            try:
                status = int(status)
            except (TypeError, ValueError):
                status = -1
            message = str(errors[index]) if index < len(errors) and status != 200 else ""
            replicas[name].health[report.host] = {"status": status, "error": message or None}
            if rows is None:
                replicas[name].lb[report.host] = None
                continue
            row = next((r for r in rows if isinstance(r, dict) and r.get("svname") == name
                        and (not replicas[name].backend or r.get("pxname") == replicas[name].backend)), None)
            replicas[name].lb[report.host] = None if row is None else {
                "status": row.get("status"), "check": row.get("check_status") or None,
                "check_code": _int(row.get("check_code")), "sessions": _int(row.get("scur")),
                "queued": _int(row.get("qcur")), "weight": _int(row.get("weight"))}
            if row is None:
                replicas[name].problems.append(f"{report.host}: HAProxy has no server {name}")

    gpu_nodes: dict[str, dict[str, Any]] = {}
    containers: dict[tuple[str, str], dict[str, Any]] = {}
    for report in log.reports_of("aphrodite_status_containers"):
        value = report.value if isinstance(report.value, dict) else {}
        error = str(value.get("error") or "")
        gpu_nodes[report.host] = {"docker": not error, "error": error or None}
        names = value.get("names") or []
        for index, labels in enumerate(value.get("labels") or []):
            labels = labels if isinstance(labels, dict) else {}
            replica = labels.get("io.aphrodite.replica")
            if not replica:
                continue
            rank = str(labels.get("io.aphrodite.node-rank", "0"))
            status = _at(value.get("statuses"), index)
            containers[(report.host, replica) if rank == "0" else (report.host, replica, rank)] = {
                "name": ("/".join(names[index]) if isinstance(names[index], list) else str(names[index])).lstrip("/")
                if index < len(names) else "",
                "image": _at(value.get("images"), index), "state": _at(value.get("states"), index),
                "status": status, "health": _container_health(status) or None}
    if not lb_reports:
        # No load balancer answered: the replicas are what the GPU nodes run.
        notes.append("no load balancer report: replicas are taken from the engine containers, without health")
        for key in [k for k in containers if len(k) == 2]:
            host, replica = key
            replicas.setdefault(replica, ReplicaStatus(name=replica, model="", head=host, address="", port=0))

    metrics_reports = log.reports_of("aphrodite_status_metrics")
    if metrics_reports:
        value = metrics_reports[0].value if isinstance(metrics_reports[0].value, dict) else {}
        names = value.get("replicas") or []
        statuses = value.get("status") or []
        contents = value.get("content") or []
        for index, name in enumerate(names):
            if name in replicas and _int(_at(statuses, index)) == 200:
                replicas[name].metrics = parse_metrics(str(_at(contents, index) or ""))

    for replica in replicas.values():
        replica.health = dict(sorted(replica.health.items()))
        replica.lb = dict(sorted(replica.lb.items()))
        replica.container = containers.get((replica.head, replica.name))
        if replica.name in nodes_of:
            _ranks(replica, nodes_of[replica.name], containers, gpu_nodes)
        _judge(replica, replica.head in gpu_nodes and gpu_nodes[replica.head]["docker"])
    return FleetStatus(list(replicas.values()), dict(sorted(load_balancers.items())), dict(sorted(gpu_nodes.items())), notes)


def _ranks(replica: ReplicaStatus, nodes: list[str], containers: dict[tuple, dict[str, Any]],
           gpu_nodes: dict[str, dict[str, Any]]) -> None:
    """Every rank of a multi-node replica with its container; a rank that does not run is a problem."""
    for rank, host in enumerate(nodes):
        container = containers.get((host, replica.name) if rank == 0 else (host, replica.name, str(rank)))
        replica.ranks.append({"rank": rank, "host": host, "container": container})
        if rank == 0 or not gpu_nodes.get(host, {}).get("docker"):
            continue  # the head is judged as the replica; an unknown Docker says nothing
        if container is None:
            replica.problems.append(f"container of rank {rank} on {host}: none")
        elif container.get("state") != "running":
            replica.problems.append(f"container {container.get('name')} (rank {rank} on {host}) is {container.get('state')}")


def _judge(replica: ReplicaStatus, docker_known: bool) -> None:
    problems = replica.problems
    if docker_known and replica.container is None:
        replica.state = "missing"
        problems.append(f"no engine container for {replica.name} on {replica.head}")
        return
    if replica.container and replica.container.get("state") not in (None, "", "running"):
        problems.append(f"container {replica.container.get('name')} is {replica.container.get('state')}")
    bad_health = {lb: h for lb, h in replica.health.items() if h["status"] != 200}
    for lb, h in bad_health.items():
        problems.append(f"/health from {lb}: " + (f"HTTP {h['status']}" if h["status"] > 0 else (h["error"] or "no answer")))
    views = {lb: v for lb, v in replica.lb.items() if v is not None}
    out = {lb: v["status"] for lb, v in views.items() if any(w in str(v["status"]) for w in ("MAINT", "DRAIN"))}
    down = {lb: v["status"] for lb, v in views.items() if lb not in out and not str(v["status"]).startswith("UP")}
    for lb, state in out.items():
        problems.append(f"{lb}: {state} (out of the pool)")
    for lb, state in down.items():
        problems.append(f"{lb}: HAProxy sees it {state}")
    if out:
        replica.state = "drained"
    elif bad_health or down or any(p.startswith("container") or "has no server" in p for p in problems):
        replica.state = "unhealthy"
    elif replica.health:
        replica.state = "serving"
    else:
        replica.state = "unknown"


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _at(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


# --------------------------------------------------------------------------- rendering


def _lb_cell(replica: ReplicaStatus) -> str:
    parts = []
    for lb, view in replica.lb.items():
        if view is None:
            parts.append(f"{lb} ?")
        else:
            check = f"/{view['check']}" if view.get("check") else ""
            parts.append(f"{lb} {view['status']}{check}")
    return " ".join(parts) or "-"


def _health_cell(replica: ReplicaStatus) -> str:
    if not replica.health:
        return "-"
    codes = {h["status"] for h in replica.health.values()}
    if codes == {200}:
        return "200"
    return " ".join(f"{lb}:{h['status'] if h['status'] > 0 else 'none'}" for lb, h in replica.health.items())


def _container_cell(replica: ReplicaStatus) -> str:
    container = replica.container
    if not container:
        return "-"
    state = container.get("state") or "?"
    return f"{state}/{container['health']}" if container.get("health") else state


def _number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    if percent:
        return f"{value * 100:.1f}%"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def render_status(status: FleetStatus) -> str:
    header = ("REPLICA", "MODEL", "HEAD", "PORT", "STATE", "CONTAINER", "HEALTH", "LOAD BALANCERS", "RUNNING",
              "WAITING", "KV CACHE")
    rows = [header]
    for r in status.replicas:
        metrics = r.metrics or {}
        rows.append((r.name, r.served_name or r.model or "-", r.head or "-", str(r.port or "-"), r.state,
                     _container_cell(r), _health_cell(r), _lb_cell(r), _number(metrics.get("requests_running")),
                     _number(metrics.get("requests_waiting")), _number(metrics.get("kv_cache_usage"), percent=True)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {3, 8, 9, 10}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in numeric and row is not header else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for lb, info in status.load_balancers.items():
        if not info["runtime_api"]:
            lines.append(f"note: {lb}: HAProxy's runtime API did not answer ({info['error'] or 'no data'}); "
                         f"its view of the replicas is unknown")
    for host, info in status.gpu_nodes.items():
        if not info["docker"]:
            lines.append(f"note: {host}: Docker did not answer ({info['error']})")
    for note in status.notes:
        lines.append(f"note: {note}")
    for r in status.replicas:
        if r.ranks:
            ranks = ", ".join(f"{k['rank']} {k['host']} " + (_container_cell(ReplicaStatus("", "", "", "", 0, container=k["container"]))
                                                              if k["container"] else "none") for k in r.ranks)
            lines.append(f"{r.name}: ranks {ranks}")
    for r in status.replicas:
        if r.state != "serving" and r.problems:
            lines.append(f"{r.name}: {'; '.join(r.problems)}")
    total = len(status.replicas)
    if not total:
        lines.append("The plan has no replicas (aphrodite_models is empty, or no load balancer reported).")
    elif status.all_serving:
        lines.append(f"{total} of {total} replicas serve.")
    else:
        counts = ", ".join(f"{sum(1 for r in status.replicas if r.state == s)} {s}" for s in STATES
                           if any(r.state == s for r in status.replicas))
        lines.append(f"{status.serving} of {total} replicas serve ({counts or 'no replicas'}).")
    return "\n".join(lines) + "\n"
