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
if [ ! -f "$cache/get_pip_24_2.py" ]; then
  mkdir -p "$cache"
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$cache" pip==24.2
  cat > "$cache/get_pip_24_2.py" <<'PY'
"""Stand-in for get-pip.py 24.2: installs pip (and the given packages) from the cached wheel."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
wheel = os.path.join(here, "pip-24.2-py3-none-any.whl")
sys.path.insert(0, wheel)
from pip._internal.cli.main import main  # noqa: E402

sys.exit(main(["install", "--find-links", here] + sys.argv[1:]))
PY
fi

"$venv/bin/ansible-galaxy" collection build --force --output-path "$work" . >/dev/null
"$venv/bin/ansible-galaxy" collection install --offline --no-deps -p "$work/collections" "$work"/aphrodite-baremetal-*.tar.gz >/dev/null
cd "$work/collections/ansible_collections/aphrodite/baremetal"
# ansible-test wants a git-free tree or a clean git repo; the installed copy is git-free.
PATH=$venv/bin:$PATH "$venv/bin/ansible-test" sanity --python "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" --requirements --color no "$@"
