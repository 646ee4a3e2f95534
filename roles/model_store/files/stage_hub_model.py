# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSE)
"""Download one pinned revision of a Hugging Face model into a directory, checking sizes.

Installed by the model_store role into the hub client's virtual environment and run
with its Python. The token comes from the environment (HF_TOKEN), never from arguments; HF_HOME
points into the staging area, so nothing is cached under /root. The result, success or
failure, is written as JSON to --report (it holds no secret), because the role hides
this command's own output to keep the token out of logs.

Steps: resolve the revision and its file list with sizes (files_metadata), check that
the staging file system has room, download with snapshot_download into --dest (resumes
a partial download of the same revision), then compare every file's size with the hub's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


class StageError(RuntimeError):
    """The download cannot be done as asked; the message says what to change."""


def stage(args: argparse.Namespace) -> dict:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    include = args.include or None
    exclude = args.exclude or None
    info = HfApi().model_info(args.repo, revision=args.revision, files_metadata=True)
    if info.sha != args.revision:
        raise StageError(f"revision {args.revision} of {args.repo} resolves to commit {info.sha}; "
                         f"pin source.revision to the full commit sha")
    wanted = list(filter_repo_objects(info.siblings or [], allow_patterns=include, ignore_patterns=exclude,
                                      key=lambda sibling: sibling.rfilename))
    if not wanted:
        raise StageError(f"no file of {args.repo} at {args.revision} is left by include {include} and exclude {exclude}")
    total = sum(sibling.size or 0 for sibling in wanted)

    os.makedirs(args.dest, mode=0o755, exist_ok=True)
    present = 0
    for sibling in wanted:
        path = os.path.join(args.dest, sibling.rfilename)
        if os.path.isfile(path):
            present += os.path.getsize(path)
    free = shutil.disk_usage(args.dest).free
    if total - present > free:
        raise StageError(f"{args.repo} needs {total - present} more bytes in {args.dest}, "
                         f"which has {free} free; make room or grow the export's file system")

    snapshot_download(repo_id=args.repo, revision=args.revision, local_dir=args.dest,
                      allow_patterns=include, ignore_patterns=exclude)

    wrong = []
    for sibling in wanted:
        path = os.path.join(args.dest, sibling.rfilename)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual is None:
            wrong.append(f"{sibling.rfilename} is missing")
        elif sibling.size is not None and actual != sibling.size:
            wrong.append(f"{sibling.rfilename} has {actual} bytes, the hub lists {sibling.size}")
    if wrong:
        raise StageError("the download is incomplete: " + "; ".join(wrong) + "; run again to resume it")
    # Download bookkeeping of huggingface_hub; clients need none of it.
    shutil.rmtree(os.path.join(args.dest, ".cache"), ignore_errors=True)
    return {"files": len(wanted), "total_bytes": total, "commit": info.sha}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--repo", required=True, help="model id, owner/name")
    parser.add_argument("--revision", required=True, help="full commit sha")
    parser.add_argument("--dest", required=True, help="directory to download into")
    parser.add_argument("--report", required=True, help="where to write the JSON result")
    parser.add_argument("--include", action="append", default=[], help="only files matching (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], help="skip files matching (repeatable)")
    args = parser.parse_args(argv)

    report: dict = {"ok": False, "repo": args.repo, "revision": args.revision}
    try:
        report.update(stage(args))
        report["ok"] = True
    except StageError as exc:
        report["message"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - hub, network and file system errors alike go to the report
        report["message"] = f"{type(exc).__name__}: {exc}"
    descriptor = os.open(args.report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(report, handle)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
