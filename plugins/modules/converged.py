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
    type: str
    choices: [check, record]
    default: check
  fingerprint:
    description:
      - The digest of the run's inputs, as the C(aphrodite.baremetal.fleet_fingerprint) filter computes it.
      - Give O(inputs) instead to be told which input changed; one of the two is required.
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
        C(commands) (argument lists whose exit status and output are compared).
      - The recorded watch list is what V(state=check) compares later.
    type: dict
    default: {}
  path:
    description:
      - Where the record lives. Only root can read it, since the fingerprint covers secrets.
    type: path
    default: /var/lib/aphrodite/converged.json
  max_hash_bytes:
    description:
      - Files up to this size are compared by content; larger ones (model weights) by size,
        modification time and inode.
    type: int
    default: 8388608
notes:
  - Commands run without a shell, with C(LC_ALL=C). Pick commands whose output only
    changes when the managed state does (C(nft -s) leaves counters out, for example).
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
  description: With V(state=check), whether the host is as the last complete run with the same inputs left it.
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
from ansible_collections.aphrodite.baremetal.plugins.module_utils._fingerprint import digest_of_parts

FORMAT = 1
MAX_REASONS = 20


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


def snapshot_commands(module, commands):
    """' '.join(argv) -> 'rc=N sha256=...' of each command's output."""
    result = {}
    for argv in commands:
        key = " ".join(argv)
        if not argv:
            continue
        # A tool that is not installed is a state too (and must not fail the probe).
        exe = argv[0] if os.path.isabs(argv[0]) else module.get_bin_path(argv[0])
        if exe is None or not os.access(exe, os.X_OK):
            result[key] = "not installed"
            continue
        rc, out, err = module.run_command([exe] + list(argv[1:]), environ_update={"LC_ALL": "C"})
        result[key] = "rc=%d sha256=%s" % (rc, hashlib.sha256((out + "\0" + err).encode("utf-8", "replace")).hexdigest())
    return result


def snapshot(module, watch, max_hash_bytes, skip=()):
    taken = {}
    for role in sorted(watch):
        spec = watch[role] or {}
        taken[role] = {
            "files": snapshot_files([str(p) for p in spec.get("files") or []], max_hash_bytes, skip),
            "units": snapshot_units(module, [str(u) for u in spec.get("units") or []]),
            "commands": snapshot_commands(module, [[str(a) for a in argv] for argv in spec.get("commands") or []]),
            "packages": snapshot_packages(module, spec.get("packages") or []),
        }
    return taken


def differences(recorded, current):
    """Sentences naming what differs between two snapshots."""
    reasons = []
    for role in sorted(set(recorded) | set(current)):
        old, new = recorded.get(role, {}), current.get(role, {})
        for kind in ("files", "units", "packages", "commands"):
            before, after = old.get(kind, {}), new.get(kind, {})
            for key in sorted(set(before) | set(after)):
                was, now = before.get(key), after.get(key)
                if was == now:
                    continue
                if kind == "files":
                    what = "appeared" if was in (None, "absent") else "is gone" if now in (None, "absent") else "changed"
                    reasons.append("%s: %s %s" % (role, key, what))
                elif kind == "units":
                    reasons.append("%s: unit %s is %s, was %s" % (role, key, now, was))
                elif kind == "packages":
                    reasons.append("%s: package %s is %s, was %s" % (role, key, now or "not watched", was))
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
            state=dict(type="str", choices=["check", "record"], default="check"),
            fingerprint=dict(type="str", no_log=False),
            inputs=dict(type="dict"),
            watch=dict(type="dict", default={}),
            path=dict(type="path", default="/var/lib/aphrodite/converged.json"),
            max_hash_bytes=dict(type="int", default=8 * 1024 * 1024),
        ),
        required_one_of=[["fingerprint", "inputs"]],
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
                               record.get("max_hash_bytes", p["max_hash_bytes"]), (p["path"],))
            found = differences(record.get("snapshot") or {}, current)
            result["converged"] = not found
            result["reasons"] = found[:MAX_REASONS] + (
                ["and %d more" % (len(found) - MAX_REASONS)] if len(found) > MAX_REASONS else [])
        module.exit_json(**result)

    watch = dict((str(role), spec or {}) for role, spec in p["watch"].items())
    taken = snapshot(module, watch, p["max_hash_bytes"], (p["path"],))
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
