#!/usr/bin/env bash
# ansible-test sanity on the built collection, exactly as users install it:
# build the tarball, install it into an empty collections path, run sanity there.
# No ignore files exist, so every finding fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$PWD/.venv
work=$(mktemp -d /tmp/aphrodite-sanity.XXXXXX)
trap 'rm -rf "$work"' EXIT

# ansible-test bootstraps pip in its test virtualenvs with a script it downloads
# from a host this machine cannot reach.  Seed its cache with an equivalent that
# runs pip from the pip 24.2 wheel (taken from PyPI).
cache=$HOME/.ansible/test/cache
mkdir -p "$cache"
[ -f "$cache/pip-24.2-py3-none-any.whl" ] ||
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$cache" pip==24.2
cat > "$cache/get_pip_24_2.py" <<'PY'
"""Stand-in for get-pip.py 24.2: installs pip (and the given packages) from the cached wheel.

get-pip.py's own options --no-setuptools and --no-wheel mean "do not add them";
plain pip install never adds them, so they are dropped.
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "pip-24.2-py3-none-any.whl"))
from pip._internal.cli.main import main  # noqa: E402

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", "--find-links", here] + args))
PY

"$venv/bin/ansible-galaxy" collection build --force --output-path "$work" . >/dev/null
# --force: the checkout's ansible.cfg already sees this collection through collections/.
"$venv/bin/ansible-galaxy" collection install --offline --no-deps --force -p "$work/collections" "$work"/aphrodite-baremetal-*.tar.gz >/dev/null 2>&1
cd "$work/collections/ansible_collections/aphrodite/baremetal"
# ansible-test wants a git-free tree or a clean git repo; the installed copy is git-free.
PATH=$venv/bin:$PATH "$venv/bin/ansible-test" sanity --python "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" --requirements --color no "$@"
