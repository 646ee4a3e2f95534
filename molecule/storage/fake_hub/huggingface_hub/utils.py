"""filter_repo_objects as huggingface_hub defines it: fnmatch patterns, a directory pattern matches below it."""

from __future__ import annotations

import fnmatch


def _add_wildcard(pattern: str) -> str:
    return pattern + "*" if pattern.endswith("/") else pattern


def filter_repo_objects(items, *, allow_patterns=None, ignore_patterns=None, key=None):
    if isinstance(allow_patterns, str):
        allow_patterns = [allow_patterns]
    if isinstance(ignore_patterns, str):
        ignore_patterns = [ignore_patterns]
    allow = [_add_wildcard(p) for p in allow_patterns] if allow_patterns is not None else None
    ignore = [_add_wildcard(p) for p in ignore_patterns] if ignore_patterns is not None else None
    for item in items:
        path = key(item) if key else item
        if allow is not None and not any(fnmatch.fnmatch(path, p) for p in allow):
            continue
        if ignore is not None and any(fnmatch.fnmatch(path, p) for p in ignore):
            continue
        yield item
