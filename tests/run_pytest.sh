#!/usr/bin/env bash
# Runs one test file under Bazel with the project's Python environment.
set -euo pipefail
python="${DPLG_PYTHON:-python3}"
if ! "$python" -c "import tensorflow, keras, pytest" 2>/dev/null; then
  echo "No Python with tensorflow, keras and pytest at '$python'; run 'make install' and" \
       "pass DPLG_PYTHON=\$PWD/.venv/bin/python (make bazel-test does)." >&2
  exit 1
fi
cd "${TEST_SRCDIR}/${TEST_WORKSPACE}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m pytest -q -m "not slow" -p no:cacheprovider "$@"
