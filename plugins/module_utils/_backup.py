# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""What ``playbooks/backup.yml`` copies, from which hosts, to where, and what it prunes.

Computed once from the fleet model (``hostvars['localhost'].aphrodite_fleet``) and the
backup settings, so the playbooks never work out a host, a directory or a file name in Jinja:

- ``destination``: the host that keeps the backups (``aphrodite_backup_host``, else the
  first NFS server by name, else the first monitoring host), its directory and the run's
  directory (``<dir>/<stamp>``), and how many runs to keep;
- ``items``: one archive per source: the edge PKI of every load balancer (the CA's key and
  every certificate key, so encrypted), a Prometheus TSDB snapshot of every monitoring host,
  the model markers of every NFS server.  Each names its host, kind, file and ``secret``.

:func:`prune` chooses the runs that retention removes; only names that look like a run's
stamp (or a failed run's ``<stamp>.partial``) are ever chosen, so nothing else in the
directory is touched.  A run counts once complete: it is written as ``<stamp>.partial``
and renamed to its stamp after its manifest.

Pure Python: no Ansible imports.
"""

from __future__ import annotations

import posixpath
import re
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Sequence

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
STAMP_PATTERN = re.compile(r"^\d{8}T\d{6}Z$")
# A run is written under this suffix and renamed to its stamp once its manifest is there,
# so a run that failed half way is never counted, kept or restored from.
PARTIAL_SUFFIX = ".partial"
PARTIAL_PATTERN = re.compile(r"^\d{8}T\d{6}Z\.partial$")
DEFAULT_DIR = "/var/backups/aphrodite"
DEFAULT_KEEP = 7
# Group of the hosts each kind comes from, in the order the items are listed.
KINDS = (("edge", "loadbalancers"), ("prometheus", "monitoring"), ("models", "nfs_servers"))
SECRET_KINDS = frozenset(("edge",))
# The default destination: the first NFS server, else the first monitoring host.
DESTINATION_GROUPS = ("nfs_servers", "monitoring")


class BackupError(ValueError):
    """The backup settings cannot be used; the message says what to change."""


def stamp(now: Optional[datetime] = None) -> str:
    """The name of a run's directory: UTC time, sortable as text (``20261206T031500Z``)."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(STAMP_FORMAT)


def _keep(value: Any) -> int:
    try:
        keep = int(str(value).strip())
    except ValueError:
        keep = 0
    if isinstance(value, bool) or keep < 1:
        raise BackupError(f"aphrodite_backup_keep is {value!r}; it must be a positive integer (the number of runs kept)")
    return keep


def _directory(value: Any) -> str:
    text = str(value or "").strip()
    normal = posixpath.normpath(text) if text else ""
    if not text.startswith("/") or normal in ("/", "//") or ".." in text.split("/"):
        raise BackupError(f"aphrodite_backup_dir is {value!r}; it must be an absolute directory below / "
                          f"without '..' (default {DEFAULT_DIR})")
    return normal


def _members(fleet: Mapping[str, Any], group: str) -> List[str]:
    if group == "loadbalancers":
        return [str(m["host"]) for m in fleet.get("loadbalancers", {}).get("members", [])]
    return sorted(h for h, facts in fleet.get("hosts", {}).items() if group in facts.get("groups", []))


def backup_plan(fleet: Mapping[str, Any], settings: Optional[Mapping[str, Any]] = None,
                run: Optional[str] = None) -> Dict[str, Any]:
    """The backup of ``fleet`` (the fleet model): destination and items (module docstring).

    ``settings``: ``host``, ``dir``, ``keep`` and ``prometheus`` (false leaves the TSDB
    snapshots out); ``run``: the run's stamp (:func:`stamp` of now when not given).
    """
    settings = settings or {}
    if not isinstance(fleet, Mapping) or not isinstance(fleet.get("hosts"), Mapping):
        raise BackupError("backup_plan needs the fleet model (hostvars['localhost'].aphrodite_fleet, "
                          "published by playbooks/fleet_model.yml)")
    hosts = fleet["hosts"]
    run = run or stamp()
    if not STAMP_PATTERN.match(run):
        raise BackupError(f"run {run!r} is not a stamp like 20261206T031500Z")
    host = str(settings.get("host") or "").strip()
    if host:
        if host not in hosts:
            raise BackupError(f"aphrodite_backup_host is {host!r}, which is not in the inventory; "
                              f"name an inventory host (default: the first NFS server)")
    else:
        host = next((h for g in DESTINATION_GROUPS for h in _members(fleet, g)), "")
        if not host:
            raise BackupError("the inventory has no NFS server or monitoring host to keep the backups; "
                              "set aphrodite_backup_host to an inventory host")
    directory = _directory(settings.get("dir") or DEFAULT_DIR)
    kinds = [(k, g) for k, g in KINDS if k != "prometheus" or settings.get("prometheus", True)]
    items = [{"kind": kind, "host": member, "secret": kind in SECRET_KINDS,
              "file": f"{kind}-{member}.tar.gpg" if kind in SECRET_KINDS else f"{kind}-{member}.tar.gz"}
             for kind, group in kinds for member in _members(fleet, group)]
    return {
        "destination": {"host": host, "address": hosts[host]["address"], "dir": directory,
                        "run": run, "path": f"{directory}/{run}", "partial": f"{directory}/{run}{PARTIAL_SUFFIX}",
                        "keep": _keep(settings.get("keep", DEFAULT_KEEP))},
        "items": items,
        "sources": sorted({i["host"] for i in items}),
    }


def prune(names: Sequence[Any], keep: Any, current: Any = None) -> List[str]:
    """What retention removes among ``names`` (a directory's entries): every complete run but
    the ``keep`` newest, and what failed runs left (``<stamp>.partial``) except the run
    ``current`` (a stamp) itself.  Only such names are ever chosen."""
    entries = {str(n) for n in names}
    runs = sorted(n for n in entries if STAMP_PATTERN.match(n))
    count = _keep(keep)
    left = sorted(n for n in entries if PARTIAL_PATTERN.match(n) and n != f"{current}{PARTIAL_SUFFIX}")
    return (runs[:-count] if len(runs) > count else []) + left


def latest(names: Sequence[Any], wanted: Any = None) -> str:
    """The run to restore from: ``wanted`` if given (it must be among ``names``), else the newest."""
    runs = sorted({str(n) for n in names if STAMP_PATTERN.match(str(n))})
    if wanted not in (None, ""):
        if str(wanted) not in runs:
            raise BackupError(f"aphrodite_restore_run is {wanted!r}, but the backup host has "
                              f"{', '.join(runs) or 'no runs'}; name one of them or leave it unset for the newest")
        return str(wanted)
    if not runs:
        raise BackupError("the backup host has no backup run yet; run playbooks/backup.yml first")
    return runs[-1]
