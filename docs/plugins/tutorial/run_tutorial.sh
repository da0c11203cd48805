#!/usr/bin/env bash
# Runs docs/plugins/tutorial.md and then docs/plugins/tutorial-online.md as written
# (CI: bash docs/plugins/tutorial/run_tutorial.sh).
#
# In an empty temporary directory and a throwaway virtual environment, every file the pages show
# is written and every shell command they show runs, in order, with the outputs they promise
# checked (see run_tutorial.py). The throwaway environment sees the packages of the current one
# (prefkit, torch, transformers, pytest: nothing is installed into or removed from the current
# environment) and gets the tutorials' `pip install ./prefkit-simpo` and
# `pip install ./prefkit-reinforce`, so each package is installed from its folder the way a user
# would, then uninstalled, and the whole environment is deleted. Then: the packages the pages wrote
# are the ones kept next to this script, and the online run learned (its mean reward/mean over the
# last 5 logged steps beats that over the first 5).
#
#   PYTHON=path/to/python bash docs/plugins/tutorial/run_tutorial.sh
# (default: the active virtual environment's python, else the checkout's .venv, else python3)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
if [ -z "${PYTHON:-}" ]; then  # the active virtual environment, else the checkout's .venv, else python3
  if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"
  else PYTHON=python3; fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/prefkit-tutorial.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

started=$SECONDS
"$PYTHON" -c 'import prefkit, pytest' || { echo "run_tutorial.sh: $PYTHON must have prefkit and pytest installed" >&2; exit 2; }

# A venv layered over the current environment: its own site-packages (where the tutorial's
# pip install goes) first, then the current environment's, .pth files included.
"$PYTHON" -m venv "$WORK/venv"
parent_site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
child_site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$parent_site')" > "$child_site/_prefkit_tutorial_parent.pth"
# The commands the page runs, bound to the layered venv's Python.
for tool in "prefkit:from prefkit.cli import app as main" "pytest:from pytest import main"; do
  name="${tool%%:*}"
  printf '#!%s\nimport sys\n%s\nsys.exit(main())\n' "$WORK/venv/bin/python" "${tool#*:}" > "$WORK/venv/bin/$name"
  chmod +x "$WORK/venv/bin/$name"
done

export PATH="$WORK/venv/bin:$PATH" VIRTUAL_ENV="$WORK/venv" PREFKIT_CACHE="$WORK/cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PREFKIT_PLUGINS PYTHONPATH
mkdir "$WORK/tutorial"
cd "$WORK/tutorial"
python "$HERE/run_tutorial.py" "$HERE/../tutorial.md"
# The online tutorial goes on in the same directory: it writes, tests, installs and trains prefkit-reinforce.
python "$HERE/run_tutorial.py" "$HERE/../tutorial-online.md"

# What the pages wrote is what the repository keeps (build outputs and caches aside).
for package in prefkit-simpo prefkit-reinforce; do
  diff -r -x build -x '*.egg-info' -x __pycache__ -x .pytest_cache "$HERE/$package" "$package" \
    || { echo "run_tutorial.sh: the pages' $package differs from $HERE/$package" >&2; exit 1; }
done

# The online run learned: reward/mean is logged every step; the last 5 beat the first 5.
python - runs/reinforce-tiny/metrics.jsonl <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
reward = [row["reward/mean"] for row in rows]
first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
if len(reward) < 10 or not last > first:
    sys.exit(f"run_tutorial.sh: reward/mean did not rise over {len(reward)} logged steps: "
             f"first 5 {first:.4f}, last 5 {last:.4f}")
print(f"run_tutorial.sh: reward/mean rose from {first:.4f} (first 5 steps) to {last:.4f} (last 5 of {len(reward)})")
PY
echo "run_tutorial.sh: done in $((SECONDS - started)) s"
