#!/usr/bin/env bash
# Mutation testing of one module with mutmut (pip install -r requirements-dev.txt), in a throwaway clone of this
# checkout's HEAD (commit new tests first), so nothing here is touched:
#
#   bash bench/mutants.sh convert.py tests/test_convert.py      # -> killed / no tests / survived counts
#   bash bench/mutants.sh generate.py "tests/test_generate.py tests/test_cli.py" "generate.x_on_device*"
#   (cd /tmp/mutants-convert.py && mutmut results)               # the survivors; `mutmut show NAME` for one of them
#
# TESTS: one or more pytest arguments (files or file::test), space-separated. GLOB (optional): mutate only the
# mutants whose names match one of these space-separated globs, e.g. "generate.x_main* generate.x_on_device*". MUTMUT_CHILDREN: parallel test runs (default: the CPU count).
# mutmut rewrites FILE into many mutants (a changed operator, constant, argument...) and runs the tests that reach
# each one; a mutant no test kills marks code that a bug could change unseen. Not run in CI: a module takes minutes
# (convert.py with its tests: about 10 on 2 cores), one whose tests load models much longer. Results: bench/MUTANTS.md.
set -euo pipefail
FILE=$1
TESTS=$2
GLOB=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TMPDIR:-/tmp}/mutants-$FILE
rm -rf "$WORK"
git clone -q "$ROOT" "$WORK"
cd "$WORK"
python bench/undecorate.py "$FILE" > /dev/null  # mutmut skips decorated functions: f = d(f) after the def instead
{
  echo "[mutmut]"
  echo "source_paths = $FILE"
  # Each mutant's tests run in a process forked from a clean server, not from mutmut's main process: that one has
  # run the whole selection with torch (thread pools, allocator state), and its forks crashed (SIGSEGV), hung or
  # failed tests at random, which mutmut counts as killed. A fork starts with no fixtures, so each mutant rebuilds
  # its module's tiny snapshots: the timeout allows 20 s of set-up beyond the tests' own time.
  echo "process_isolation = forkserver"
  echo "timeout_constant = 20"
  echo "pytest_add_cli_args_test_selection ="
  for t in $TESTS; do echo "    $t"; done
  echo "also_copy ="
  for f in *.py demo/ tests/ bench/ README.md; do [ "$f" != "$FILE" ] && echo "    $f"; done
} > setup.cfg
ARGS=()
[ -n "${MUTMUT_CHILDREN:-}" ] && ARGS+=(--max-children "$MUTMUT_CHILDREN")
[ -n "$GLOB" ] && { read -ra G <<< "$GLOB"; ARGS+=("${G[@]}"); }  # several globs, space-separated
START=$SECONDS
mutmut run "${ARGS[@]}" | tr '\r' '\n' | tail -n 2
echo "$((SECONDS - START)) s"
