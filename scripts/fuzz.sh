#!/usr/bin/env bash
# Runs every fuzz target of Vigil for a short while (FUZZTIME, default 5s):
# `make test` runs it, so every parser of outside input is fuzzed on every
# run, starting from the seed corpora committed under testdata/fuzz.
# With --save-seeds, up to 8 new interesting inputs per target found in
# this run are copied into testdata/fuzz for the next runs (commit them).
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-5s}
save=false
[ "${1:-}" = --save-seeds ] && save=true
# Every fuzz target in the tree, so a new one is never left out.
mapfile -t targets < <(grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' internal cmd |
  sed -E 's#^(.*)/[^/]*_test\.go:func (Fuzz.*)$#./\1 \2#' | sort -u)
[ ${#targets[@]} -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }
cache=$(go env GOCACHE)/fuzz/github.com/vigil-project/vigil
for t in "${targets[@]}"; do
  set -- $t
  pkg=$1 name=$2
  grep -rqs "func $name(" "$pkg"/*_test.go || { echo "fuzz target $name missing in $pkg" >&2; exit 1; }
  echo "fuzz $pkg $name ($fuzztime)"
  # Go 1.26's fuzz coordinator can fail a target with "context deadline
  # exceeded" at the -fuzztime boundary without having found anything
  # (go.dev/issue/75804, fixed in Go 1.27). A real failure always writes
  # its input under testdata/fuzz, so only a failure that wrote none and
  # printed that message is run again, once.
  ok=false
  for attempt in 1 2; do
    before=$(ls "$pkg/testdata/fuzz/$name" 2>/dev/null | sort || true)
    if go test -run '^$' -fuzz "^$name\$" -fuzztime "$fuzztime" "$pkg" >/tmp/vigil-fuzz.log 2>&1; then
      ok=true
      break
    fi
    after=$(ls "$pkg/testdata/fuzz/$name" 2>/dev/null | sort || true)
    if [ "$attempt" = 1 ] && [ "$before" = "$after" ] &&
      grep -q '^    context deadline exceeded$' /tmp/vigil-fuzz.log; then
      echo "fuzz $name: coordinator deadline race (go.dev/issue/75804), no crasher written; running again"
      continue
    fi
    break
  done
  $ok || { cat /tmp/vigil-fuzz.log; exit 1; }
  if $save; then
    dst="$pkg/testdata/fuzz/$name"
    mkdir -p "$dst"
    src="$cache/${pkg#./}/$name"
    if [ -d "$src" ]; then
      for f in $(ls -t "$src" | head -8); do cp "$src/$f" "$dst/$f"; done
    fi
  fi
done
