#!/usr/bin/env bash
# The default test suite (what CI runs). Slow tests: ./scripts/test.sh -m slow ; GPU tests run on a GPU machine.
# pytest exits 5 when it collects no tests: that is a failure here, never hidden.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
$PY -m pytest -q -n "${SPARSEC_TEST_JOBS:-2}" "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
