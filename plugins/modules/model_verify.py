#!/usr/bin/python
# Copyright: aphrodite.baremetal contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# ansible-test's validate-modules requires this header on every module file.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_verify
short_description: Check that a model directory is complete before an engine loads it
version_added: "1.0.0"
description:
  - Checks a Hugging Face style model directory the way an inference engine will read it,
    without loading any weights.
  - C(config.json) must exist and parse as a JSON object.
  - When C(model.safetensors.index.json) exists, every shard its C(weight_map) names must exist,
    and each shard's header must hold the tensors the index maps to it.
  - Every C(*.safetensors) file must be exactly as long as its header says
    (8 bytes + header length + the largest end of the C(data_offsets) of its tensors), and its
    tensors must tile the data without holes or overlaps. A download or copy that stopped early
    fails here rather than in the engine.
  - Only the headers of the weight files are read, so checking a large model over NFS is quick.
  - The module only reads; it changes nothing on the host.
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
  path:
    description:
      - The model directory, for example C(/srv/exports/models/meta-llama/Llama-3.1-8B-Instruct).
    type: path
    required: true
  require_safetensors:
    description:
      - Fail when the directory holds no C(*.safetensors) file.
      - Set V(false) only for models published in another weight format.
    type: bool
    default: true
notes:
  - Every problem found is reported at once, in the failure message and in RV(problems), one sentence each,
    naming the file.
seealso:
  - name: The safetensors format
    description: Header layout (length, JSON with dtype, shape and data_offsets, C(__metadata__)).
    link: https://huggingface.co/docs/safetensors/index
"""

EXAMPLES = r"""
---
- name: Check a staged model
  aphrodite.baremetal.model_verify:
    path: /srv/exports/models/meta-llama/Llama-3.1-8B-Instruct
  register: model

- name: Show its size
  ansible.builtin.debug:
    msg: "{{ model.files | length }} files, {{ model.total_bytes | human_readable }}"

- name: Check a model published as PyTorch .bin files
  aphrodite.baremetal.model_verify:
    path: /var/lib/aphrodite/models/example/legacy-model
    require_safetensors: false
"""

RETURN = r"""
path:
  description: The directory that was checked.
  returned: always
  type: str
  sample: /srv/exports/models/meta-llama/Llama-3.1-8B-Instruct
files:
  description: Regular files below the directory, as paths relative to it, sorted.
  returned: always
  type: list
  elements: str
  sample: [config.json, model-00001-of-00004.safetensors, model.safetensors.index.json]
sizes:
  description: Size in bytes of each file of RV(files).
  returned: always
  type: dict
  sample: {"config.json": 855, "model-00001-of-00004.safetensors": 4976698672}
total_bytes:
  description: Sum of the sizes of all files.
  returned: always
  type: int
  sample: 16069969348
safetensors:
  description: One entry per C(*.safetensors) file whose header is valid and matches its size.
  returned: always
  type: list
  elements: dict
  contains:
    file:
      description: Path relative to the directory.
      type: str
      returned: always
      sample: model-00001-of-00004.safetensors
    size:
      description: File size in bytes.
      type: int
      returned: always
      sample: 4976698672
    header_bytes:
      description: Length of the JSON header.
      type: int
      returned: always
      sample: 23952
    tensors:
      description: Number of tensors in the file.
      type: int
      returned: always
      sample: 82
tensors:
  description: Number of tensors over all RV(safetensors) files.
  returned: always
  type: int
  sample: 291
index_shards:
  description: Shard files named by C(model.safetensors.index.json); empty without an index.
  returned: always
  type: list
  elements: str
  sample: [model-00001-of-00004.safetensors, model-00002-of-00004.safetensors]
model_type:
  description: C(model_type) from C(config.json); V(null) when it is missing or unreadable.
  returned: always
  type: str
  sample: llama
architectures:
  description: C(architectures) from C(config.json); empty when missing or unreadable.
  returned: always
  type: list
  elements: str
  sample: [LlamaForCausalLM]
problems:
  description: What is wrong, one sentence per problem; the module fails when it is not empty.
  returned: always
  type: list
  elements: str
  sample:
    - >-
      model-00002-of-00004.safetensors: is 1048576 bytes but its header describes 4999802720
      (8 + 23864 header + 4999778848 tensor data); the file is truncated: copy or download it again
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.aphrodite.baremetal.plugins.module_utils._safetensors import check_model_dir


def result_of(report) -> dict:
    """The module's return values for a ModelReport."""
    config = report.config
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    return {
        "path": report.path,
        "files": list(report.files),
        "sizes": dict(report.files),
        "total_bytes": report.total_bytes,
        "safetensors": [
            {
                "file": os.path.relpath(info.path, report.path).replace(os.sep, "/"),
                "size": info.size,
                "header_bytes": info.header_length,
                "tensors": len(info.tensors),
            }
            for info in report.safetensors
        ],
        "tensors": report.tensor_count,
        "index_shards": list(report.index_shards),
        "model_type": model_type if isinstance(model_type, str) else None,
        "architectures": [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else [],
        "problems": list(report.problems),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            require_safetensors=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    path = module.params["path"].rstrip("/") or "/"
    report = check_model_dir(path, module.params["require_safetensors"])
    result = result_of(report)
    if report.problems:
        count = len(report.problems)
        module.fail_json(
            msg="{0} is not a complete model ({1} problem{2}): {3}".format(
                path, count, "" if count == 1 else "s", " | ".join(report.problems)),
            changed=False,
            **result
        )
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
