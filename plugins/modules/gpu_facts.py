#!/usr/bin/python
# Copyright: aphrodite.baremetal contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# ansible-test's validate-modules requires this header on every module file.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_facts
short_description: Gather facts about the NVIDIA GPUs of a host
version_added: "1.0.0"
description:
  - Sets C(ansible_facts.aphrodite_gpus), the GPUs of a host as the Aphrodite engine's planner needs
    them (model, memory, PCI address, NUMA node, NVLink groups, NVSwitch, MIG mode).
  - With a working driver the GPUs come from C(nvidia-smi --query-gpu) and the links between them
    from C(nvidia-smi topo -m).
  - Without one (before the driver is installed, or while it is not loaded) the module counts the GPUs
    with C(lspci -nn -d 10de:); memory, UUIDs and links are then unknown, and RV(ansible_facts.aphrodite_gpus.notes)
    says so.
  - The NUMA node of a GPU is read from C(/sys/bus/pci/devices/<bus id>/numa_node), else taken from the
    C(NUMA Affinity) column of C(nvidia-smi topo -m).
  - NVSwitches are detected from C(/proc/driver/nvidia-nvswitch/devices) or from the NVSwitch bridges
    C(lspci) lists.
  - The module only reads; it changes nothing on the host.
author:
  - aphrodite.baremetal developers (@aphrodite-baremetal)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
  platform:
    platforms: posix
options:
  nvidia_smi_path:
    description:
      - Path of the C(nvidia-smi) binary.
      - When omitted it is searched on E(PATH).
      - A path that is not an executable file is treated like a missing C(nvidia-smi), so the
        module falls back to C(lspci).
    type: path
  lspci_path:
    description:
      - Path of the C(lspci) binary (package C(pciutils)).
      - When omitted it is searched on E(PATH).
    type: path
  sysfs_root:
    description:
      - Where sysfs is mounted; the module reads C(<sysfs_root>/bus/pci/devices/<bus id>/numa_node).
      - Change it only to test the module against a recorded tree.
    type: path
    default: /sys
  proc_root:
    description:
      - Where procfs is mounted; the module lists C(<proc_root>/driver/nvidia-nvswitch/devices).
      - Change it only to test the module against a recorded tree.
    type: path
    default: /proc
notes:
  - GPU indices follow nvidia-smi. When counted with C(lspci) they are positions in PCI bus order,
    the order in which nvidia-smi numbers GPUs once the driver is loaded.
  - The module fails when nvidia-smi runs but prints something it cannot parse; the message names
    the line and what was expected.
seealso:
  - name: nvidia-smi documentation
    description: The fields of C(nvidia-smi --query-gpu) and the C(topo -m) matrix.
    link: https://docs.nvidia.com/deploy/nvidia-smi/index.html
"""

EXAMPLES = r"""
---
- name: Gather GPU facts
  aphrodite.baremetal.gpu_facts:

- name: Refuse hosts whose GPUs cannot hold the model in tensor parallel
  ansible.builtin.assert:
    that:
      - ansible_facts.aphrodite_gpus.count >= 8
      - ansible_facts.aphrodite_gpus.nvlink_groups | map('length') | max >= 8
    fail_msg: >-
      {{ inventory_hostname }} has {{ ansible_facts.aphrodite_gpus.count }} GPUs in NVLink groups
      {{ ansible_facts.aphrodite_gpus.nvlink_groups }}; tensor parallel 8 needs 8 GPUs in one group.
  when: ansible_facts.aphrodite_gpus.source == 'nvidia-smi'

- name: Install Fabric Manager where NVSwitches are present
  ansible.builtin.package:
    name: "nvidia-fabricmanager-{{ ansible_facts.aphrodite_gpus.driver_version.split('.') | first }}"
  when:
    - ansible_facts.aphrodite_gpus.nvswitch
    - ansible_facts.aphrodite_gpus.driver_version is not none

- name: Use a recorded nvidia-smi and sysfs tree
  aphrodite.baremetal.gpu_facts:
    nvidia_smi_path: /usr/local/bin/nvidia-smi
    sysfs_root: /srv/recorded/sys
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to C(ansible_facts).
  returned: always
  type: dict
  contains:
    aphrodite_gpus:
      description: The NVIDIA GPUs of the host.
      returned: always
      type: dict
      contains:
        source:
          description:
            - Where the GPU list comes from.
            - V(nvidia-smi) with a working driver; V(lspci) when nvidia-smi is missing or fails and
              lspci lists NVIDIA GPUs; V(none) when no NVIDIA GPU was found.
          returned: always
          type: str
          choices: [nvidia-smi, lspci, none]
          sample: nvidia-smi
        driver_version:
          description:
            - Version of the loaded NVIDIA driver.
            - V(null) unless RV(ansible_facts.aphrodite_gpus.source=nvidia-smi).
          returned: always
          type: str
          sample: 550.90.07
        count:
          description: Number of GPUs.
          returned: always
          type: int
          sample: 8
        gpus:
          description: One entry per GPU, sorted by index.
          returned: always
          type: list
          elements: dict
          contains:
            index:
              description: GPU index as nvidia-smi numbers it (PCI bus order).
              type: int
              returned: always
              sample: 0
            uuid:
              description: GPU UUID; V(null) when counted with lspci.
              type: str
              returned: always
              sample: GPU-a84bba07-931d-b925-306a-0799dc6ebd71
            name:
              description:
                - Product name from nvidia-smi (V(NVIDIA H100 80GB HBM3)), or the PCI name from lspci
                  (V(GH100 [H100 SXM5 80GB])).
              type: str
              returned: always
              sample: NVIDIA H100 80GB HBM3
            memory_mib:
              description: Total GPU memory in MiB; V(null) when counted with lspci.
              type: int
              returned: always
              sample: 81559
            pci_bus_id:
              description: PCI address in sysfs form (4-digit domain, lower case).
              type: str
              returned: always
              sample: "0000:18:00.0"
            numa_node:
              description: NUMA node the GPU is attached to; V(null) when the host reports none.
              type: int
              returned: always
              sample: 0
            compute_capability:
              description: CUDA compute capability; V(null) when counted with lspci.
              type: str
              returned: always
              sample: "9.0"
            persistence_mode:
              description: Whether persistence mode is on; V(null) when unknown.
              type: bool
              returned: always
              sample: true
            mig_mode:
              description: Current MIG mode; V(null) for GPUs without MIG or when counted with lspci.
              type: str
              returned: always
              choices: [Enabled, Disabled]
              sample: Disabled
        nvlink_groups:
          description:
            - GPU indices joined by NVLink, each list sorted; a GPU without NVLink is a group of its own.
            - Empty when the topology is unknown (no driver, or C(nvidia-smi topo -m) failed).
          returned: always
          type: list
          elements: list
          sample: [[0, 1, 2, 3, 4, 5, 6, 7]]
        nvswitch:
          description: Whether the host has NVSwitches, which need NVIDIA Fabric Manager.
          returned: always
          type: bool
          sample: true
        mig_enabled:
          description: Whether any GPU has MIG mode enabled.
          returned: always
          type: bool
          sample: false
        numa_nodes:
          description: GPU indices per NUMA node; keys are node numbers as strings. GPUs without a node are left out.
          returned: always
          type: dict
          sample: {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
        links:
          description:
            - Path between each pair of GPUs from C(nvidia-smi topo -m), keyed by GPU index as strings
              (V(NV18), V(PIX), V(PXB), V(PHB), V(NODE), V(SYS)).
            - Empty when the topology is unknown.
          returned: always
          type: dict
          sample: {"0": {"1": "NV18"}, "1": {"0": "NV18"}}
        notes:
          description: What the module could not find out and what it did instead.
          returned: always
          type: list
          elements: str
          sample: ["nvidia-smi not found; counted GPUs with lspci (names only, no memory)"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_gather import gather
from ansible_collections.aphrodite.baremetal.plugins.module_utils._gpu_parse import GpuParseError


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            nvidia_smi_path=dict(type="path"),
            lspci_path=dict(type="path"),
            sysfs_root=dict(type="path", default="/sys"),
            proc_root=dict(type="path", default="/proc"),
        ),
        supports_check_mode=True,
    )
    try:
        facts = gather(module)
    except GpuParseError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, ansible_facts={"aphrodite_gpus": facts})


if __name__ == "__main__":
    main()
