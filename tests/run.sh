#!/usr/bin/env bash
# Set up .venv, then run the test suite (CPU, tiny models and images); arguments go to pytest.
#
#   bash tests/run.sh
#   bash tests/run.sh -k ddp -x
set -euo pipefail
cd "$(dirname "$0")/.."
source ./setup.sh
python3 -m pytest -rs --durations=15 tests "$@"  # -rs: every skip says why; the 15 slowest tests at the end
