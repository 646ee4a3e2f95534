# Copyright: aphrodite.baremetal contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading a host's GPUs: the gpu_facts module and the converged module's probe share it.

``gather`` runs nvidia-smi (else lspci) and reads sysfs and procfs; the parsing is in
_gpu_parse.  The options it reads (``nvidia_smi_path``, ``lspci_path``, ``sysfs_root``,
``proc_root``) come as a mapping, so a module with other options can call it.
"""

from __future__ import annotations

import os

from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import (
    QUERY_GPU_ARGS,
    NvidiaSmiUnavailable,
    build_facts,
    parse_lspci,
    parse_numa_node,
    parse_query_gpu,
    parse_topology,
)

DEFAULTS = {"nvidia_smi_path": None, "lspci_path": None, "sysfs_root": "/sys", "proc_root": "/proc"}

LSPCI_ARGS = ("-nn", "-d", "10de:")


def _first_line(*texts: str) -> str:
    """The first non-blank line of the first text that has one (nvidia-smi reports errors on stdout)."""
    for text in texts:
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return "no output"


def _locate(module, params: dict, option: str, name: str) -> tuple[str | None, str | None]:
    """The binary to run, or None and why there is none."""
    explicit = params.get(option)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit, None
        return None, "{0} {1} is not an executable file ({2})".format(name, explicit, option)
    found = module.get_bin_path(name)
    if found is None:
        return None, "{0} not found".format(name)
    return found, None


def _run(module, binary: str, args: tuple[str, ...], label: str) -> tuple[str | None, str | None]:
    """stdout of a command, or None and a sentence about its failure (naming the command by ``label``)."""
    rc, out, err = module.run_command([binary] + list(args))
    if rc != 0:
        return None, "{0} failed (rc={1}: {2})".format(label, rc, _first_line(err, out))
    return out, None


def _read_numa(sysfs_root: str, bus_ids: list[str]) -> dict[str, int | None]:
    numa: dict[str, int | None] = {}
    for bus_id in bus_ids:
        path = os.path.join(sysfs_root, "bus", "pci", "devices", bus_id, "numa_node")
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError):
            continue  # no sysfs entry: build_facts falls back to topo -m
        numa[bus_id] = parse_numa_node(text, path)
    return numa


def _list_nvswitches(proc_root: str) -> list[str] | None:
    path = os.path.join(proc_root, "driver", "nvidia-nvswitch", "devices")
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def gather(module, params: dict | None = None) -> dict:
    """The aphrodite_gpus fact; raises GpuParseError when a tool prints what cannot be parsed.

    ``params`` defaults to the module's own (the gpu_facts module's options)."""
    params = dict(DEFAULTS, **(module.params if params is None else params))
    notes: list[str] = []
    smi_gpus = None
    topology = None
    topology_problem = None

    nvidia_smi, smi_problem = _locate(module, params, "nvidia_smi_path", "nvidia-smi")
    if nvidia_smi is not None:
        out, smi_problem = _run(module, nvidia_smi, QUERY_GPU_ARGS, "nvidia-smi --query-gpu")
        if out is not None:
            try:
                smi_gpus = parse_query_gpu(out)
            except NvidiaSmiUnavailable as exc:
                smi_problem = str(exc)
    if smi_gpus is not None:
        out, topology_problem = _run(module, nvidia_smi, ("topo", "-m"), "nvidia-smi topo -m")
        if out is not None:
            topology = parse_topology(out)

    lspci_text = None
    lspci, lspci_problem = _locate(module, params, "lspci_path", "lspci")
    if lspci_problem == "lspci not found":
        lspci_problem = "lspci not found (install pciutils)"
    if lspci is not None:
        lspci_text, lspci_problem = _run(module, lspci, LSPCI_ARGS, "lspci -nn -d 10de:")
        if lspci_problem is not None and smi_gpus is not None:
            notes.append("{0}; NVSwitches were looked for in procfs only".format(lspci_problem))

    if smi_gpus is not None:
        bus_ids = [gpu["pci_bus_id"] for gpu in smi_gpus]
    elif lspci_text is not None:
        bus_ids = [gpu["pci_bus_id"] for gpu in parse_lspci(lspci_text)]
    else:
        bus_ids = []

    return build_facts(
        smi_gpus,
        topology=topology,
        lspci_text=lspci_text,
        nvswitch_devices=_list_nvswitches(params["proc_root"]),
        sysfs_numa=_read_numa(params["sysfs_root"], bus_ids),
        smi_problem=smi_problem,
        lspci_problem=lspci_problem,
        topology_problem=topology_problem,
        notes=notes,
    )
