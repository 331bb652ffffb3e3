#!/usr/bin/env bash
# Wall-clock time of `scripts/demo`, fresh and with cached base images:
#   bench/demo_time.sh            prints demo_fresh_s=... and demo_cached_s=...
#   bench/demo_time.sh --cached   only demo_cached_s (uses /var/cache/kvmfleet as it is)
# Fresh: KVMFLEET_CACHE points at an empty directory (debootstrap, every .deb downloaded, wheels built), deleted
# afterwards; cached: the machine's /var/cache/kvmfleet (base images, .debs, wheels), as a second `make demo` sees it.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # LABEL: prints the seconds one demo took, then stops it
    local t0 t1 log=${TMPDIR:-/tmp}/demo_time.$1.log
    t0=$(date +%s.%N)
    ./scripts/demo >/dev/null 2>"$log" || { echo "demo failed ($1), log: $log" >&2; ./scripts/demo --stop >/dev/null 2>&1; exit 1; }
    t1=$(date +%s.%N)
    ./scripts/demo --stop >/dev/null 2>&1
    python3 -c "print(round($t1 - $t0, 1))"
}
./scripts/demo --stop >/dev/null 2>&1 || true
if [ "${1:-}" != "--cached" ]; then
    fresh=$(mktemp -d /var/tmp/kvmfleet-demo-fresh.XXXXXX)
    trap 'rm -rf "$fresh"' EXIT
    echo "demo_fresh_s=$(KVMFLEET_CACHE=$fresh run fresh)"
    rm -rf "$fresh"
fi
echo "demo_cached_s=$(run cached)"
