#!/usr/bin/python
# Copyright: aphrodite.baremetal contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# ansible-test's validate-modules requires this header on every module file.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: converged
short_description: Record a converged host's state, and tell later whether it still holds
version_added: "1.1.0"
description:
  - The fast path of C(site.yml). After a complete run, V(state=record) stores on the host
    the fingerprint of the run's inputs (the C(fleet_fingerprint) filter) and a snapshot of
    what the roles manage there, as each role declared it (the C(watch) option).
  - On the next run, V(state=check) reports RV(converged=true) only when the fingerprint is
    the same and a fresh snapshot equals the recorded one. The roles are then skipped on
    that host; any difference (a new input, an edited file, a stopped service, a removed
    container, a flushed rule set) sends the host through every task again.
  - One call reads everything, so checking a converged host costs one round trip.
  - V(state=probe) is that round trip in C(site.yml). It gathers the facts the roles read
    (O(gather_subset)), the GPU facts (O(gpus), as M(aphrodite.baremetal.gpu_facts) does) and the
    snapshot, and returns what the record holds. The controller then fingerprints the run's
    inputs from those facts and decides without another call (the
    P(aphrodite.baremetal.fast_path_verdict#filter) filter).
  - Regular files are compared by SHA-256, mode, owner and group; files larger than
    O(max_hash_bytes) by size, modification time and inode, as rsync's quick check does.
    Directories are walked. Units are compared by their active and enablement states,
    packages by their installed versions, commands by their exit status and output.
author:
  - aphrodite.baremetal developers (@aphrodite-baremetal)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  state:
    description:
      - V(check) compares, and changes nothing.
      - V(record) takes the snapshot and writes it with the fingerprint to O(path) (mode 0600).
        It reports a change only when the snapshot or the fingerprint differ from the recorded ones.
      - V(probe) changes nothing either. It returns the facts of O(gather_subset) (and the GPU facts
        with O(gpus)) as C(ansible_facts), marked as gathered, so plays with C(gather_facts) under
        C(gathering = smart) do not gather them again. It compares a fresh snapshot with the recorded
        one (RV(drift)) and returns the recorded fingerprint and inputs, so the controller can compare
        this run's inputs with them once it has every host's facts. O(fingerprint) and O(inputs) are
        not used.
    type: str
    choices: [check, record, probe]
    default: check
  fingerprint:
    description:
      - The digest of the run's inputs, as the C(aphrodite.baremetal.fleet_fingerprint) filter computes it.
      - Give O(inputs) instead to be told which input changed; one of the two is required with
        V(state=check) and V(state=record).
    type: str
  inputs:
    description:
      - The run's inputs, each by its digest, as the C(aphrodite.baremetal.fleet_inputs) filter returns them.
        The fingerprint is then the digest of these (the one C(fleet_fingerprint) returns), and a host whose
        fingerprint changed is told which inputs did.
    type: dict
  watch:
    description:
      - With V(state=record), what to snapshot, by role name. Each role's entry may have
        C(files) (paths of files or directories, which are walked), C(units) (systemd unit names),
        C(packages) (package names; a version pin such as C(haproxy=2.8*) counts as its name) and
        C(commands) (argument lists whose exit status and output are compared), C(certificates) (a list of
        C(path) and C(within_days), telling whether each certificate or CRL ends within that many days, read
        from the file without a process) and C(docker) (C(containers) by name, C(images) by reference and
        C(labelled), labels whose containers are listed, all asked of the Docker Engine API on
        O(docker_socket), never through the CLI).
      - The recorded watch list is what V(state=check) compares later.
    type: dict
    default: {}
  gather_subset:
    description:
      - With V(state=probe), the fact subsets to gather, as the C(gather_subset) of M(ansible.builtin.setup).
    type: list
    elements: str
    default: [min, network]
  gpus:
    description:
      - With V(state=probe), also gather C(ansible_facts.aphrodite_gpus) as M(aphrodite.baremetal.gpu_facts)
        does with its defaults. When nvidia-smi prints what cannot be parsed, the fact is left out and
        RV(gpu_problem) says why, so the caller can run M(aphrodite.baremetal.gpu_facts) to fail with it.
    type: bool
    default: false
  origin:
    description:
      - With V(state=probe) and O(gpus), where the GPU facts are gathered (C(inventory), the inventory
        source, and C(address)), returned beside them as C(ansible_facts.aphrodite_gpus_origin) and so
        cached with them, since the planner uses cached GPU facts only for the host they were gathered from.
    type: dict
  compare:
    description:
      - With V(state=probe), whether to take the snapshot and compare it with the record. V(false)
        (the fast path is off) only gathers the facts.
    type: bool
    default: true
  path:
    description:
      - Where the record lives. Only root can read it, since the fingerprint covers secrets.
    type: path
    default: /var/lib/aphrodite/converged.json
  docker_socket:
    description:
      - The Docker daemon's socket, for the C(docker) entries of O(watch).
    type: path
    default: /var/run/docker.sock
  max_hash_bytes:
    description:
      - Files up to this size are compared by content; larger ones (model weights) by size,
        modification time and inode.
    type: int
    default: 8388608
notes:
  - Commands run without a shell, with C(LC_ALL=C). Pick commands whose output only
    changes when the managed state does (C(nft -s) leaves counters out, for example).
  - Units of every role are read with one C(systemctl show), packages with one C(dpkg-query)
    (or C(rpm)), and a command that several roles watch runs once. Containers and images of every role
    are asked of Docker on one connection, and certificates are read in the module's own process.
seealso:
  - name: The fast path
    description: How site.yml decides to skip a host, and how to turn it off (C(aphrodite_fast_path=false)).
    link: https://github.com/aphrodite-baremetal/aphrodite.baremetal/blob/main/README.md#speed
"""

EXAMPLES = r"""
---
- name: Is this host as the last complete run left it?
  aphrodite.baremetal.converged:
    inputs: "{{ hostvars | aphrodite.baremetal.fleet_inputs(groups['all'], groups) }}"
  register: converged

- name: One call per host - facts, GPU facts and the managed state
  aphrodite.baremetal.converged:
    state: probe
    gpus: "{{ 'gpu_nodes' in group_names }}"
  become: true
  register: probe

- name: Decide, on the controller
  ansible.builtin.set_fact:
    converged: "{{ probe | aphrodite.baremetal.fast_path_verdict(hostvars | aphrodite.baremetal.fleet_inputs(groups['all'], groups)) }}"

- name: Record the host after a complete run
  aphrodite.baremetal.converged:
    state: record
    fingerprint: "{{ __aphrodite_fingerprint }}"
    watch:
      haproxy:
        files: [/etc/haproxy]
        units: [haproxy.service]
        packages: [haproxy]
        commands:
          - [nft, -s, list, table, inet, aphrodite]
"""

RETURN = r"""
converged:
  description:
    - With V(state=check), whether the host is as the last complete run with the same inputs left it.
    - Always V(false) with V(state=probe), which cannot know this run's inputs; the controller decides.
  returned: always
  type: bool
  sample: true
reasons:
  description: Why the host is not converged, one sentence each (at most 20).
  returned: always
  type: list
  elements: str
  sample: ["haproxy: /etc/haproxy/haproxy.cfg changed", "haproxy: unit haproxy.service is inactive/enabled, was active/enabled",
           "the inputs changed since 2026-11-27T15:04:05+00:00: variables of gpu1, engine plan"]
recorded_at:
  description: When the record was written (UTC, ISO 8601); V(null) when there is none.
  returned: always
  type: str
  sample: "2026-11-27T15:04:05+00:00"
drift:
  description:
    - With V(state=probe), what differs between the recorded snapshot and a fresh one, one sentence each
      (at most 20); empty when nothing does.
    - V(null) when there is no record or O(compare=false).
  returned: always
  type: list
  elements: str
  sample: ["haproxy: unit haproxy.service is inactive/enabled, was active/enabled"]
recorded_fingerprint:
  description: With V(state=probe), the fingerprint of the run that wrote the record; V(null) when there is none.
  returned: always
  type: str
recorded_inputs:
  description:
    - With V(state=probe), the recorded inputs, each by the first 16 hex digits of its digest (enough to
      name what changed; RV(recorded_fingerprint) is compared whole).
  returned: always
  type: dict
  sample: {"collection code": "3f1c0a9b2d4e5f60", "variables of gpu1": "9a8b7c6d5e4f3a2b"}
gpu_problem:
  description: With V(state=probe) and O(gpus), why the GPU facts could not be read; V(null) when they were.
  returned: always
  type: str
ansible_facts:
  description: >-
    With V(state=probe), the facts of O(gather_subset) (named as M(ansible.builtin.setup) names them), C(aphrodite_gpus)
    and, with O(origin), C(aphrodite_gpus_origin).
  returned: when O(state=probe)
  type: dict
roles:
  description: The roles the record covers.
  returned: always
  type: list
  elements: str
  sample: [common, haproxy, firewall]
"""

import datetime
import hashlib
import json
import os
import re
import stat

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.facts import ansible_collector, default_collectors
from ansible.module_utils.facts.namespace import PrefixFactNamespace
from ansible_collections.aphrodite.baremetal.plugins.module_utils._cert_expiry import renewal_state
from ansible_collections.aphrodite.baremetal.plugins.module_utils._docker_state import DockerState
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fingerprint import digest_of_parts
from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_gather import gather as gather_gpus
from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import GpuParseError

FORMAT = 1
MAX_REASONS = 20
# What the probe returns of each recorded input digest: enough to name what changed.
SHORT_DIGEST = 16
# As ansible.builtin.setup: these subsets are always gathered.
MINIMAL_GATHER_SUBSET = frozenset(["apparmor", "caps", "cmdline", "date_time", "distribution", "dns", "env", "fips",
                                   "local", "lsb", "pkg_mgr", "platform", "python", "selinux", "service_mgr",
                                   "ssh_pub_keys", "user"])


def _file_entry(path, st, max_hash_bytes):
    mode = stat.S_IMODE(st.st_mode)
    owner = "%o %d:%d" % (mode, st.st_uid, st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        return "link -> %s" % os.readlink(path)
    if stat.S_ISDIR(st.st_mode):
        return "dir %s" % owner
    if not stat.S_ISREG(st.st_mode):
        return "special %s" % owner
    if st.st_size > max_hash_bytes:
        return "file %s size=%d mtime=%d inode=%d" % (owner, st.st_size, st.st_mtime_ns, st.st_ino)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "file %s sha256=%s" % (owner, digest.hexdigest())


def snapshot_files(paths, max_hash_bytes, skip=()):
    """Path -> description of every watched path, directories walked (links not followed).

    Paths in ``skip`` (the record itself) are left out."""
    result = {}
    for top in paths:
        if top in skip:
            continue
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            result[top] = "absent"
            continue
        result[top] = _file_entry(top, st, max_hash_bytes)
        if stat.S_ISDIR(st.st_mode):
            for root, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(dirs + files):
                    path = os.path.join(root, name)
                    if path in skip or path.startswith(tuple(s + "." for s in skip)):
                        continue
                    try:
                        result[path] = _file_entry(path, os.lstat(path), max_hash_bytes)
                    except FileNotFoundError:
                        result[path] = "absent"
    return result


def snapshot_units(module, units):
    """Unit -> 'ActiveState/UnitFileState', one systemctl call for all of them."""
    if not units:
        return {}
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return dict((unit, "no systemctl") for unit in units)
    rc, out, err = module.run_command([systemctl, "show", "--property=Id,ActiveState,UnitFileState", "--"] + list(units),
                                      environ_update={"LC_ALL": "C"})
    if rc != 0:
        return dict((unit, "systemctl failed: %s" % err.strip()) for unit in units)
    blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
              for block in out.strip().split("\n\n")]
    result = {}
    for unit, props in zip(units, blocks):
        result[unit] = "%s/%s" % (props.get("ActiveState", "?"), props.get("UnitFileState", "") or "-")
    return result


def _package_name(spec):
    return re.split(r"[=<>!~ ]", spec, 1)[0]


def snapshot_packages(module, packages):
    """Package -> installed version (or 'absent'), one dpkg-query or rpm call for all of them."""
    names = sorted(set(_package_name(str(p)) for p in packages if str(p).strip()))
    if not names:
        return {}
    result = dict((name, "absent") for name in names)
    dpkg = module.get_bin_path("dpkg-query")
    if dpkg is not None:
        rc, out, err = module.run_command([dpkg, "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\\n", "--"] + names,
                                          environ_update={"LC_ALL": "C"})
        for line in out.splitlines():
            fields = line.split()
            if not fields or fields[0] not in result:
                continue
            installed = len(fields) >= 3 and fields[-1].startswith(("ii", "hi"))  # hi: held
            result[fields[0]] = fields[1] if installed else "not installed (%s)" % fields[-1]
        return result
    rpm = module.get_bin_path("rpm")
    if rpm is not None:
        rc, out, err = module.run_command([rpm, "-q", "--qf", "%{NAME} %{EPOCH}:%{VERSION}-%{RELEASE}.%{ARCH}\\n"] + names,
                                          environ_update={"LC_ALL": "C"})
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] in result:
                result[fields[0]] = fields[1]
        return result
    return dict((name, "no package manager") for name in names)


def snapshot_commands(module, commands, cache=None):
    """' '.join(argv) -> 'rc=N sha256=...' of each command's output.

    ``cache`` (argv key -> result) lets a command that several roles watch run once."""
    result = {}
    cache = {} if cache is None else cache
    for argv in commands:
        key = " ".join(argv)
        if not argv:
            continue
        if key in cache:
            result[key] = cache[key]
            continue
        # A tool that is not installed is a state too (and must not fail the probe).
        exe = argv[0] if os.path.isabs(argv[0]) else module.get_bin_path(argv[0])
        if exe is None or not os.access(exe, os.X_OK):
            result[key] = "not installed"
            continue
        rc, out, err = module.run_command([exe] + list(argv[1:]), environ_update={"LC_ALL": "C"})
        result[key] = "rc=%d sha256=%s" % (rc, hashlib.sha256((out + "\0" + err).encode("utf-8", "replace")).hexdigest())
        cache[key] = result[key]
    return result


def snapshot_certificates(entries):
    """Path -> 'valid', 'renew', 'absent' or 'unreadable (why)' at each entry's margin."""
    result = {}
    for entry in entries:
        if not isinstance(entry, dict) or "path" not in entry:
            continue
        days = int(entry.get("within_days", 0))
        result["%s within %d days" % (entry["path"], days)] = renewal_state(str(entry["path"]), days)
    return result


def snapshot_docker(docker, spec):
    """'container NAME', 'image REF' and 'labelled LABEL' -> what Docker says of each."""
    if not spec:
        return {}
    result = {}
    for name in spec.get("containers") or []:
        result["container %s" % name] = docker.container(str(name))
    for reference in spec.get("images") or []:
        result["image %s" % reference] = docker.image(str(reference))
    for label in spec.get("labelled") or []:
        result["labelled %s" % label] = docker.labelled(str(label))
    return result


DOCKER_SOCKET = "/var/run/docker.sock"


def snapshot(module, watch, max_hash_bytes, skip=(), docker_socket=DOCKER_SOCKET):
    """Role -> what it manages, as found now.  The units of all roles are read in one
    systemctl call and the packages in one dpkg-query call; a command that several roles
    watch runs once; Docker is asked on one connection."""
    specs = dict((role, watch[role] or {}) for role in sorted(watch))
    units = [str(u) for spec in specs.values() for u in spec.get("units") or []]
    all_units = snapshot_units(module, list(dict.fromkeys(units)))
    all_packages = snapshot_packages(module, [p for spec in specs.values() for p in spec.get("packages") or []])
    docker = DockerState(docker_socket)
    commands = {}
    taken = {}
    try:
        for role, spec in specs.items():
            names = sorted(set(_package_name(str(p)) for p in spec.get("packages") or [] if str(p).strip()))
            taken[role] = {
                "files": snapshot_files([str(p) for p in spec.get("files") or []], max_hash_bytes, skip),
                "units": dict((str(u), all_units[str(u)]) for u in spec.get("units") or []),
                "commands": snapshot_commands(module, [[str(a) for a in argv] for argv in spec.get("commands") or []], commands),
                "packages": dict((name, all_packages[name]) for name in names),
            }
            # Only where declared, so that records of roles without them keep their shape.
            if spec.get("certificates"):
                taken[role]["certificates"] = snapshot_certificates(spec["certificates"])
            if spec.get("docker"):
                taken[role]["docker"] = snapshot_docker(docker, spec["docker"])
    finally:
        docker.close()
    return taken


def gather_facts(module, subset):
    """The facts of ``subset``, named as ansible.builtin.setup names them (ansible_ prefix),
    marked as gathered for `gathering = smart`."""
    collector = ansible_collector.get_ansible_collector(
        all_collector_classes=default_collectors.collectors,
        namespace=PrefixFactNamespace(namespace_name="ansible", prefix="ansible_"),
        filter_spec=[], gather_subset=subset, gather_timeout=10, minimal_gather_subset=MINIMAL_GATHER_SUBSET)
    facts = collector.collect(module=module)
    facts["_ansible_facts_gathered"] = True
    return facts


def probe(module, record, problem, result):
    """state=probe: facts, GPU facts, the drift since the record and what the record holds."""
    p = module.params
    facts = gather_facts(module, p["gather_subset"])
    result["gpu_problem"] = None
    if p["gpus"]:
        try:
            facts["aphrodite_gpus"] = gather_gpus(module, {})
            if p["origin"] is not None:
                facts["aphrodite_gpus_origin"] = p["origin"]
        except GpuParseError as exc:
            result["gpu_problem"] = str(exc)
    result["ansible_facts"] = facts
    result["drift"] = None
    result["recorded_fingerprint"] = None
    result["recorded_inputs"] = {}
    if record is None:
        result["reasons"] = [problem]
        return
    result["recorded_fingerprint"] = record.get("fingerprint")
    result["recorded_inputs"] = dict((str(k), str(v)[:SHORT_DIGEST]) for k, v in (record.get("inputs") or {}).items())
    if p["compare"]:
        current = snapshot(module, record.get("watch") or {}, record.get("max_hash_bytes", p["max_hash_bytes"]), (p["path"],),
                           p["docker_socket"])
        found = differences(record.get("snapshot") or {}, current)
        result["drift"] = found[:MAX_REASONS] + (
            ["and %d more" % (len(found) - MAX_REASONS)] if len(found) > MAX_REASONS else [])


def differences(recorded, current):
    """Sentences naming what differs between two snapshots."""
    reasons = []
    for role in sorted(set(recorded) | set(current)):
        old, new = recorded.get(role, {}), current.get(role, {})
        for kind in ("files", "units", "packages", "commands", "certificates", "docker"):
            before, after = old.get(kind, {}), new.get(kind, {})
            for key in sorted(set(before) | set(after)):
                was, now = before.get(key), after.get(key)
                if was == now:
                    continue
                if kind in ("files", "docker"):
                    what = "appeared" if was in (None, "absent") else "is gone" if now in (None, "absent") else "changed"
                    reasons.append("%s: %s %s" % (role, key, what))
                elif kind == "units":
                    reasons.append("%s: unit %s is %s, was %s" % (role, key, now, was))
                elif kind == "packages":
                    reasons.append("%s: package %s is %s, was %s" % (role, key, now or "not watched", was))
                elif kind == "certificates":
                    reasons.append("%s: %s: %s, was %s" % (role, key, now or "not watched", was))
                else:
                    reasons.append("%s: the output of '%s' changed" % (role, key))
    return reasons


def read_record(path):
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None, "nothing recorded yet (no complete run has finished on this host)"
    except (OSError, ValueError) as exc:
        return None, "the record %s is unreadable (%s)" % (path, exc)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, "the record %s has another format" % path
    return data, None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["check", "record", "probe"], default="check"),
            fingerprint=dict(type="str", no_log=False),
            inputs=dict(type="dict"),
            watch=dict(type="dict", default={}),
            gather_subset=dict(type="list", elements="str", default=["min", "network"]),
            gpus=dict(type="bool", default=False),
            origin=dict(type="dict"),
            compare=dict(type="bool", default=True),
            path=dict(type="path", default="/var/lib/aphrodite/converged.json"),
            max_hash_bytes=dict(type="int", default=8 * 1024 * 1024),
            docker_socket=dict(type="path", default=DOCKER_SOCKET),
        ),
        required_if=[["state", "check", ["fingerprint", "inputs"], True],
                     ["state", "record", ["fingerprint", "inputs"], True]],
        mutually_exclusive=[["fingerprint", "inputs"]],
        supports_check_mode=True,
    )
    p = module.params
    inputs = dict((str(k), str(v)) for k, v in (p["inputs"] or {}).items())
    if p["inputs"] is not None:
        p["fingerprint"] = digest_of_parts(inputs)
    record, problem = read_record(p["path"])
    result = dict(changed=False, converged=False, reasons=[], recorded_at=None, roles=[])
    if record is not None:
        result["recorded_at"] = record.get("recorded_at")
        result["roles"] = sorted(record.get("watch") or {})

    if p["state"] == "probe":
        probe(module, record, problem, result)
        module.exit_json(**result)

    if p["state"] == "check":
        if record is None:
            result["reasons"] = [problem]
        elif record.get("fingerprint") != p["fingerprint"]:
            before = record.get("inputs") or {}
            changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            what = ", ".join(changed[:8]) + (" and %d more" % (len(changed) - 8) if len(changed) > 8 else "")
            result["reasons"] = ["the inputs changed since %s: %s" % (
                record.get("recorded_at"),
                what if before and inputs else "inventory, variables, facts, plan or collection")]
        else:
            current = snapshot(module, record.get("watch") or {},
                               record.get("max_hash_bytes", p["max_hash_bytes"]), (p["path"],), p["docker_socket"])
            found = differences(record.get("snapshot") or {}, current)
            result["converged"] = not found
            result["reasons"] = found[:MAX_REASONS] + (
                ["and %d more" % (len(found) - MAX_REASONS)] if len(found) > MAX_REASONS else [])
        module.exit_json(**result)

    watch = dict((str(role), spec or {}) for role, spec in p["watch"].items())
    taken = snapshot(module, watch, p["max_hash_bytes"], (p["path"],), p["docker_socket"])
    same = (record is not None and record.get("fingerprint") == p["fingerprint"]
            and (record.get("inputs") or {}) == inputs
            and record.get("watch") == watch and record.get("snapshot") == taken)
    result["roles"] = sorted(watch)
    if same:
        module.exit_json(**result)
    result["changed"] = True
    if not module.check_mode:
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        data = dict(format=FORMAT, fingerprint=p["fingerprint"], inputs=inputs, recorded_at=now, watch=watch,
                    snapshot=taken, max_hash_bytes=p["max_hash_bytes"])
        directory = os.path.dirname(p["path"])
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o750)
        tmp = "%s.%d.tmp" % (p["path"], os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        # Not atomic_move: it would widen a new file to the umask's mode.
        os.replace(tmp, p["path"])
        result["recorded_at"] = now
    module.exit_json(**result)


if __name__ == "__main__":
    main()
