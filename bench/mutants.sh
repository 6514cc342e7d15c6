#!/usr/bin/env bash
# Mutation testing of one module with mutmut (pip install -r requirements-dev.txt), in a throwaway clone of this
# checkout's HEAD, so nothing here is touched:
#
#   bash bench/mutants.sh convert.py tests/test_convert.py      # -> killed / no tests / survived counts
#   (cd /tmp/mutants-convert.py && mutmut results)               # the survivors; `mutmut show NAME` for one of them
#
# mutmut rewrites FILE into many mutants (a changed operator, constant, argument...) and runs the tests that reach
# each one; a mutant no test kills marks code that a bug could change unseen. Not run in CI: a module takes minutes
# (convert.py with its tests: about 5 on 2 cores), one whose tests load models much longer.
set -euo pipefail
FILE=$1
TESTS=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TMPDIR:-/tmp}/mutants-$FILE
rm -rf "$WORK"
git clone -q "$ROOT" "$WORK"
cd "$WORK"
{
  echo "[mutmut]"
  echo "paths_to_mutate = $FILE"
  echo "tests_dir = $TESTS"
  echo "also_copy ="
  for f in *.py demo/ tests/; do [ "$f" != "$FILE" ] && echo "    $f"; done
} > setup.cfg
mutmut run | tr '\r' '\n' | tail -n 2
