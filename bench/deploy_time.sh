#!/usr/bin/env bash
# Wall time of `ansible-playbook playbooks/deploy.yml` over a simulated fleet (scripts/fleet-hosts): the first
# converge and the idempotent re-run, for the whole fleet and per host.
#
#   bench/deploy_time.sh [N_HYPERVISORS]      (default 3: Debian 12, 13, 12; plus one InfluxDB host, Debian 12)
#
# The fleet is new for each run (hosts as they come out of debootstrap + openssh-server + python3); the wheel cache
# is new too, so the first converge includes building the wheels. Downloaded .deb files come from the shared cache
# /var/cache/kvmfleet/debs when an earlier run left them there (the output says how many were there). Per-host times
# are the sums of that host's task durations (Ansible's junit callback). Last lines:
#   deploy_first_s=...  deploy_rerun_s=...  rerun_changed=...
# Needs root, /dev/kvm, and the venv with ansible-core (requirements-ansible.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-3}
FLEET=${KVMFLEET_BENCH_FLEET:-bench$$}
BIN=${VENV_BIN:-$ROOT/.venv/bin}
export PATH="$BIN:$PATH" ANSIBLE_FORCE_COLOR=0 ANSIBLE_ROLES_PATH="$ROOT/roles" ANSIBLE_HOST_KEY_CHECKING=False \
    ANSIBLE_PIPELINING=True ANSIBLE_CALLBACKS_ENABLED=ansible.builtin.junit JUNIT_TASK_CLASS=true ANSIBLE_FORKS=8
work=$(mktemp -d /tmp/kvmfleet-deploy-time.XXXXXX)
cleanup() {
    "$ROOT/scripts/fleet-hosts" down --fleet "$FLEET" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

debs=$(find /var/cache/kvmfleet/debs -name '*.deb' 2>/dev/null | wc -l)
echo "deploy_time: fleet $FLEET: $N hypervisors + 1 InfluxDB host; $debs .deb files in the shared cache"
t0=$SECONDS
"$ROOT/scripts/fleet-hosts" up --fleet "$FLEET" "$N" "$FLEET-influx:bookworm" 2>"$work/up.log" \
    || { cat "$work/up.log" >&2; exit 1; }
echo "deploy_time: hosts up in $((SECONDS - t0)) s"
inv=$("$ROOT/scripts/fleet-hosts" inventory --fleet "$FLEET")
{
    printf 'hypervisors:\n  hosts:\n'
    for ((i = 1; i <= N; i++)); do printf '    %s-hv%d:\n' "$FLEET" "$i"; done
    printf '  vars:\n'
    printf '    kvmfleet_collectd_wheel_cache: %s/wheels\n' "$work"
    printf '    kvmfleet_collectd_influx_url: "http://{{ hostvars[%s].ansible_host }}:8086"\n' "'$FLEET-influx'"
    printf 'influxdb:\n  hosts:\n    %s-influx:\n' "$FLEET"
    printf '  vars:\n'
    printf '    kvmfleet_influxdb_install: true\n'
    printf '    kvmfleet_influxdb_http_bind_address: "{{ ansible_host }}:8086"\n'
    printf '    kvmfleet_influxdb_rpc_bind_address: "{{ ansible_host }}:8088"\n'
    # this sandbox cannot raise RLIMIT_NOFILE past its hard limit; harmless elsewhere
    printf '    kvmfleet_influxdb_sysv_open_file_limit: 16384\n'
} >"$work/groups.yml"

run() {  # run NAME: one ansible-playbook run, its wall time in $work/NAME.s, its junit XML in $work/NAME/
    local name=$1 start end
    start=$(date +%s.%N)
    JUNIT_OUTPUT_DIR="$work/$name" ansible-playbook -i "$inv" -i "$work/groups.yml" playbooks/deploy.yml \
        >"$work/$name.log" 2>&1 || { tail -n 60 "$work/$name.log" >&2; echo "deploy_time: $name run failed" >&2; exit 1; }
    end=$(date +%s.%N)
    python3 -c "print(f'{$end - $start:.1f}')" >"$work/$name.s"
}
run first
run rerun

python3 - "$work" <<'PY'
import glob, re, sys, collections, xml.etree.ElementTree as ET
work = sys.argv[1]
def per_host(name):
    t = collections.defaultdict(float)
    for f in glob.glob(f"{work}/{name}/*.xml"):
        for tc in ET.parse(f).getroot().iter("testcase"):
            m = re.match(r"\[([^\]]+)\]", tc.get("name", ""))
            if m:
                t[m.group(1)] += float(tc.get("time", 0))
    return t
def changed(name):
    return {m.group(1): int(m.group(2)) for m in
            re.finditer(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", open(f"{work}/{name}.log").read(), re.M)}
first, rerun = per_host("first"), per_host("rerun")
c1, c2 = changed("first"), changed("rerun")
for host in sorted(h for h in first if h in c1):
    print(f"host={host} first_s={first[host]:.1f} rerun_s={rerun.get(host, 0):.1f} "
          f"first_changed={c1.get(host, '?')} rerun_changed={c2.get(host, '?')}")
print(f"deploy_first_s={open(f'{work}/first.s').read().strip()}")
print(f"deploy_rerun_s={open(f'{work}/rerun.s').read().strip()}")
print(f"rerun_changed={sum(c2.values())}")
PY
