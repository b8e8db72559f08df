#!/usr/bin/env bash
# Set up .venv, then run the test suite (CPU, tiny models and images); arguments go to pytest.
#
#   bash tests/run.sh               # the full suite (about 15 minutes on 2 cores)
#   bash tests/run.sh --all         # and the slow tier, the longest end-to-end tests: what CI runs
#   bash tests/run.sh --fast        # only the tests that start no process (under a minute), for the edit-test loop
#   bash tests/run.sh -k ddp -x
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup.sh
# -rs: every skip says why; the 15 slowest tests at the end
python3 -m pytest -rs --durations=15 tests "$@"
