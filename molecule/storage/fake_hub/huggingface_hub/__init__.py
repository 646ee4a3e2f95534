"""A stand-in for huggingface_hub, installed on the scenario's NFS server (no hub is reachable).

It serves repositories from /opt/fake-hub/<owner>/<name>/<commit>/ with the two calls the
model_store role's helper makes, and records how it was called (token in the environment,
arguments) in /opt/fake-hub/calls.jsonl, so the tests can show the token never reaches argv.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass

ROOT = "/opt/fake-hub"
__version__ = "2.4.0"


@dataclass
class RepoSibling:
    rfilename: str
    size: int


@dataclass
class ModelInfo:
    sha: str
    siblings: list


def _record(call: str, **details) -> None:
    entry = {"call": call, "argv": sys.argv, "token": os.environ.get("HF_TOKEN"),
             "hf_home": os.environ.get("HF_HOME"), **details}
    with open(os.path.join(ROOT, "calls.jsonl"), "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _repo(repo_id: str, revision: str) -> str:
    path = os.path.join(ROOT, repo_id, revision)
    if not os.path.isdir(path):
        raise RuntimeError(f"404 Client Error: Revision Not Found for url: {repo_id}@{revision}")
    return path


def _files(path: str) -> list:
    found = []
    for directory, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            found.append(RepoSibling(os.path.relpath(full, path), os.path.getsize(full)))
    return sorted(found, key=lambda s: s.rfilename)


class HfApi:
    def model_info(self, repo_id, *, revision=None, files_metadata=False, **_):
        _record("model_info", repo=repo_id, revision=revision)
        return ModelInfo(sha=revision, siblings=_files(_repo(repo_id, revision)))


def snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, ignore_patterns=None, **_):
    from .utils import filter_repo_objects

    source = _repo(repo_id, revision)
    _record("snapshot_download", repo=repo_id, revision=revision, local_dir=local_dir)
    for sibling in filter_repo_objects(_files(source), allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns, key=lambda s: s.rfilename):
        target = os.path.join(local_dir, sibling.rfilename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(source, sibling.rfilename), target)
    # Like the real client: download bookkeeping inside local_dir.
    os.makedirs(os.path.join(local_dir, ".cache", "huggingface"), exist_ok=True)
    return local_dir


