#!/usr/bin/env bash
# `make test`: every part in turn, each timed; a failed part does not stop the later ones
# (CI gets the whole picture in one run), the exit status is non-zero if any part failed.
#   scripts/test-all.sh PART...      (each PART is a make target)
set -uo pipefail
cd "$(dirname "$0")/.."
declare -a names=() secs=() codes=()
total0=$SECONDS
for part in "$@"; do
  echo "=== make $part ($(date -u +%T) UTC)"
  t0=$SECONDS
  make --no-print-directory "$part"
  rc=$?
  names+=("$part"); secs+=($((SECONDS - t0))); codes+=("$rc")
  echo "=== make $part: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
done
echo
echo "make test: time per part"
failed=0
for i in "${!names[@]}"; do
  printf '  %-16s %6d s  %s\n' "${names[$i]}" "${secs[$i]}" "$([ "${codes[$i]}" = 0 ] && echo passed || echo FAILED)"
  [ "${codes[$i]}" = 0 ] || failed=$((failed + 1))
done
printf '  %-16s %6d s\n' total $((SECONDS - total0))
[ "$failed" = 0 ] && echo "make test: all ${#names[@]} parts passed" || echo "make test: $failed of ${#names[@]} parts FAILED"
exit $((failed > 0))
