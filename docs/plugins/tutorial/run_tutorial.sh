#!/usr/bin/env bash
# Runs docs/plugins/tutorial.md as written (CI: bash docs/plugins/tutorial/run_tutorial.sh).
#
# In an empty temporary directory and a throwaway virtual environment, every file the page shows
# is written and every shell command it shows runs, in order, with the outputs it promises
# checked (see run_tutorial.py). The throwaway environment sees the packages of the current one
# (prefkit, torch, transformers, pytest: nothing is installed into or removed from the current
# environment) and gets the tutorial's `pip install ./prefkit-simpo`, so the package is installed
# from its folder the way a user would, then uninstalled, and the whole environment is deleted.
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
echo "run_tutorial.sh: done in $((SECONDS - started)) s"
