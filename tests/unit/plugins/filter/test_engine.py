"""engine_container_argv: the planner's argv adapted to a container, nothing else."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.aphrodite.baremetal.plugins.filter.engine import (
    engine_container_argv,
    engine_file_mounts,
    engine_files_digest,
    engine_staged_files,
)
from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_args import CONTAINER_FILES_DIR
from ansible_collections.aphrodite.baremetal.plugins.module_utils._engine_flags import APHRODITE_FLAGS

PLAN_ARGV = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "1", "--port", "2242"]


def test_model_path_served_name_and_host() -> None:
    argv = engine_container_argv(PLAN_ARGV, "/models/meta-llama/Llama-3.1-8B-Instruct",
                                 "meta-llama/Llama-3.1-8B-Instruct", "10.0.0.5")
    assert argv == ["--model", "/models/meta-llama/Llama-3.1-8B-Instruct", "--tensor-parallel-size", "1",
                    "--port", "2242", "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct", "--host", "10.0.0.5"]
    assert {a for a in argv if a.startswith("--")} <= APHRODITE_FLAGS
    assert PLAN_ARGV[1] == "meta-llama/Llama-3.1-8B-Instruct"  # the plan is not modified


def test_a_bound_host_and_served_name_in_the_plan_are_kept() -> None:
    argv = engine_container_argv(PLAN_ARGV + ["--host", "10.1.1.1", "--served-model-name", "llama"],
                                 "/models/x", "meta-llama/Llama-3.1-8B-Instruct", "10.0.0.5")
    assert argv.count("--host") == 1 and argv[argv.index("--host") + 1] == "10.1.1.1"
    assert argv[argv.index("--served-model-name") + 1] == "llama"


def test_role_defaults_are_added_unless_the_plan_sets_them() -> None:
    argv = engine_container_argv(PLAN_ARGV, "/models/x", "x", "10.0.0.5", {"--shutdown-timeout": 60})
    assert argv[-2:] == ["--shutdown-timeout", "60"]
    argv = engine_container_argv(PLAN_ARGV + ["--shutdown-timeout", "5"], "/models/x", "x", "10.0.0.5", {"--shutdown-timeout": 60})
    assert argv.count("--shutdown-timeout") == 1 and argv[argv.index("--shutdown-timeout") + 1] == "5"
    with pytest.raises(AnsibleFilterError, match="must be a --flag"):
        engine_container_argv(PLAN_ARGV, "/models/x", "x", "10.0.0.5", {"shutdown-timeout": 60})


@pytest.mark.parametrize("argv, address, message", [
    (["--port", "2242"], "10.0.0.5", "expects the argv of a replica"),
    (["--model"], "10.0.0.5", "has no value"),
    (PLAN_ARGV, "", "set aphrodite_bind_address"),
])
def test_bad_input_says_what_to_fix(argv: list, address: str, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        engine_container_argv(argv, "/models/x", "x", address)


FILES = [
    {"source": "/inv/templates/llama3.jinja", "path": "llama-3-1-8b/chat-template/llama3.jinja", "kind": "file", "sha256": "a" * 64},
    {"source": "/inv/adapters/sql", "path": "llama-3-1-8b/lora/sql", "kind": "dir", "sha256": "b" * 64},
]


def test_staged_files_are_listed_once_with_the_directory_to_create() -> None:
    replicas = [{"name": "llama-3-1-8b-0", "files": FILES}, {"name": "llama-3-1-8b-1", "files": FILES[::-1]},
                {"name": "qwen-0", "files": []}, {"name": "qwen-1"}]
    assert engine_staged_files(replicas) == [
        {**FILES[0], "dir": "llama-3-1-8b/chat-template"},
        {**FILES[1], "dir": "llama-3-1-8b/lora/sql"},
    ]
    assert engine_staged_files([]) == []


def test_mounts_are_read_only_and_where_the_argv_expects_them() -> None:
    mounts = engine_file_mounts({"name": "r", "files": FILES}, "/var/lib/aphrodite/engine-files/")
    assert mounts == [{"type": "bind", "source": "/var/lib/aphrodite/engine-files/llama-3-1-8b",
                       "target": f"{CONTAINER_FILES_DIR}/llama-3-1-8b", "read_only": True}]
    assert engine_file_mounts({"name": "r"}, "/var/lib/aphrodite/engine-files") == []


def test_the_files_digest_changes_with_the_content_only() -> None:
    replica = {"name": "r", "files": FILES}
    assert engine_files_digest({"name": "r"}) == ""
    assert engine_files_digest(replica) == engine_files_digest({"name": "r", "files": FILES[::-1]})
    changed = [FILES[0], {**FILES[1], "sha256": "c" * 64}]
    assert engine_files_digest({"name": "r", "files": changed}) != engine_files_digest(replica)


@pytest.mark.parametrize("files, message", [
    ([{"source": "/x", "path": "m/x", "kind": "link", "sha256": "a"}], "kind"),
    ([{"source": "/x", "path": "../etc/passwd", "kind": "file", "sha256": "a"}], "must be <model>/<name>"),
    ([{"source": "/x", "path": "/etc/x", "kind": "file", "sha256": "a"}], "must be <model>/<name>"),
    ([{"path": "m/x", "kind": "file", "sha256": "a"}], "each needs source"),
])
def test_bad_file_entries_are_refused(files: list, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        engine_staged_files([{"name": "r", "files": files}])


def test_one_path_with_two_contents_is_refused() -> None:
    with pytest.raises(AnsibleFilterError, match="has two contents"):
        engine_staged_files([{"name": "a", "files": FILES}, {"name": "b", "files": [{**FILES[0], "sha256": "d" * 64}]}])


def test_a_mount_needs_an_absolute_directory() -> None:
    with pytest.raises(AnsibleFilterError, match="absolute path"):
        engine_file_mounts({"name": "r", "files": FILES}, "engine-files")


def test_stale_staged_files_are_what_no_entry_accounts_for(tmp_path) -> None:
    from ansible_collections.aphrodite.baremetal.plugins.filter.engine import engine_stale_files

    adapter = tmp_path / "controller" / "sql-lora"
    (adapter / "nested").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "nested" / "weights.safetensors").write_text("w")
    template = tmp_path / "controller" / "chat.jinja"
    template.write_text("{{ messages }}")
    root = "/var/lib/aphrodite/engine-files"
    staged = [{"source": str(template), "path": "llama/chat-template/chat.jinja", "kind": "file", "sha256": "a"},
              {"source": str(adapter), "path": "llama/lora/sql", "kind": "dir", "sha256": "b"}]
    kept = [f"{root}/llama", f"{root}/llama/chat-template", f"{root}/llama/chat-template/chat.jinja",
            f"{root}/llama/lora", f"{root}/llama/lora/sql", f"{root}/llama/lora/sql/adapter_config.json",
            f"{root}/llama/lora/sql/nested", f"{root}/llama/lora/sql/nested/weights.safetensors"]
    gone = [f"{root}/llama/lora/old",  # an adapter dropped from lora-modules
            f"{root}/llama/lora/old/adapter_config.json",
            f"{root}/llama/lora/sql/removed.bin",  # deleted from the staged directory on the controller
            f"{root}/llama/chat-template/old.jinja",
            f"{root}/qwen", f"{root}/qwen/lora", f"{root}/qwen/lora/x"]  # a model no longer run here
    found = sorted(kept + gone, reverse=True)
    assert engine_stale_files(found, staged, root + "/") == [
        f"{root}/llama/chat-template/old.jinja", f"{root}/llama/lora/old", f"{root}/llama/lora/sql/removed.bin",
        f"{root}/qwen"]
    assert engine_stale_files(kept, staged, root) == []
    assert engine_stale_files(found, [], root) == [f"{root}/llama", f"{root}/qwen"]
    with pytest.raises(AnsibleFilterError, match="absolute path"):
        engine_stale_files(found, staged, "engine-files")
