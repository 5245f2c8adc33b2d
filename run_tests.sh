#!/usr/bin/env bash
# Run the whole test suite. On a fresh machine with only python3 it first sets up .venv (reusing an installed torch).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k tokenizer -x
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements-dev.txt
# --durations: the slowest tests close every run, to keep the suite near its ~10 minutes on 2 cores in view
exec python -m pytest -q --durations=15 tests "$@"
