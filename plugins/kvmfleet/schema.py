"""The InfluxDB schema kvmfleet writes and reads, said once: measurements, tag keys, the fields of ``kvm_host``
and ``kvmfleet_agent``, and the old names of counters the kernel renamed.

The agent (:mod:`kvmfleet.points`) writes with these names, the audit and the query pack read with them, the
synthetic fleets of the tests and benchmarks write them too. ``docs/schema.md`` explains them; its field tables are
generated from :data:`FACT_FIELDS` and :data:`AGENT_FIELDS` (``scripts/generate``), and a test checks the query
files (``plugins/kvmfleet/querypack/*.influxql``) against this module.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- measurements
M_HOST = "kvm"  # host totals, one point per sample
M_VM = "kvm_vm"  # one point per VM and sample
M_VCPU = "kvm_vcpu"  # one point per vCPU and sample (opt-in)
M_FACTS = "kvm_host"  # host facts, every sample
M_AGENT = "kvmfleet_agent"  # the agent's own metrics, every sample
M_FINDING = "kvmfleet_finding"  # one point per finding of an audit run (--write-findings), in its own database
M_AUDIT_RUN = "kvmfleet_audit_run"  # one point per audit run (--write-findings), findings or not
M_EXIT_REASON = "kvm_exit_reason"  # exits by tracepoint reason: one point per reason seen and sample (opt-in)
MEASUREMENTS = (M_HOST, M_VM, M_VCPU, M_FACTS, M_AGENT, M_FINDING, M_AUDIT_RUN, M_EXIT_REASON)
COUNTER_MEASUREMENTS = (M_HOST, M_VM, M_VCPU)  # fields named like the kernel's counters

# ---------------------------------------------------------------------------------------------- tags
T_HOST = "host"  # collectd's Hostname, on every point
T_VM = "vm"  # the VM's name from its VMM
T_VM_UUID = "vm_uuid"  # the VM's UUID, when the VMM gives one
T_VMM = "vmm"  # qemu, firecracker, cloud-hypervisor, kvmfleet-guestvmm, or the process name
T_VCPU = "vcpu"  # the vCPU id
T_RULE = "rule"  # kvmfleet_finding: the rule id (shadow-paging, ...)
T_SEVERITY = "severity"  # kvmfleet_finding: info, warning or critical
T_COMMAND = "command"  # kvmfleet_audit_run: the command that ran (audit, capacity)
T_ISA = "isa"  # kvm_exit_reason: vmx or svm (kvm:kvm_exit), userspace (kvm:kvm_userspace_exit)
T_REASON = "reason"  # kvm_exit_reason: the reason's name in the tracepoint's format file

# The tags each measurement carries besides the static ``Tag`` options of the plugin.
TAGS: dict[str, tuple[str, ...]] = {
    M_HOST: (T_HOST,),
    M_VM: (T_HOST, T_VM, T_VM_UUID, T_VMM),
    M_VCPU: (T_HOST, T_VM, T_VM_UUID, T_VMM, T_VCPU),
    M_FACTS: (T_HOST,),
    M_AGENT: (T_HOST,),
    M_FINDING: (T_HOST, T_RULE, T_SEVERITY),  # host: the host the finding is about
    M_AUDIT_RUN: (T_COMMAND,),
    M_EXIT_REASON: (T_HOST, T_ISA, T_REASON, T_VM),  # vm only on per-VM series
}
# Tag keys the agent sets itself: a static tag may not take them (nor "time", nor a name starting with "_").
RESERVED_TAGS = (T_HOST, T_VM, T_VM_UUID, T_VMM, T_VCPU)

# Histogram stats are written as integer fields ``<name>_bucket_<n>`` (non-zero buckets only).
BUCKET_INFIX = "_bucket_"


# ---------------------------------------------------------------------------------------------- fields
@dataclass(frozen=True)
class Field:
    """One field of a measurement whose fields are fixed: its name, its InfluxDB type and what it means."""

    name: str
    type: str  # string, boolean, integer, float
    doc: str


FACT_FIELDS: tuple[Field, ...] = (
    Field("tdp_state", "string", "`enabled`, `disabled`, `unsupported` or `unknown`: do the VMs get EPT/NPT "
                                 "(two-dimensional paging) or run on shadow page tables?"),
    Field("tdp_enabled", "boolean", "`tdp_state == \"enabled\"`, for stores without string fields: VictoriaMetrics "
                                    "keeps booleans as 1/0 but stores a string field as 0, its text lost (so there "
                                    "`tdp_state`, `lockdown`, `kvm_module` and `last_error` say nothing)"),
    Field("cpu_ept", "boolean", "the CPU offers EPT (Intel)"),
    Field("cpu_npt", "boolean", "the CPU offers NPT (AMD)"),
    Field("ept_param", "boolean", "the `kvm_intel.ept` module parameter"),
    Field("npt_param", "boolean", "the `kvm_amd.npt` module parameter"),
    Field("tdp_mmu", "boolean", "`kvm.tdp_mmu`"),
    Field("nested", "boolean", "`<backend>.nested`: L2 guests allowed (their page tables are always shadowed)"),
    Field("is_guest", "boolean", "this hypervisor is itself a VM (cpuinfo `hypervisor` flag)"),
    Field("lockdown", "string", "kernel lockdown: `none`, `integrity`, `confidentiality` or `unknown`"),
    Field("kvm_module", "string", "the KVM backend in use: `kvm_intel`, `kvm_amd`, `kvm_pvm`, ..., `none` (KVM not "
                                  "loaded) or `unknown`"),
    Field("vms", "integer", "VMs in this sample"),
    Field("vcpus", "integer", "vCPUs of every VM in this sample, whatever the source (stats fds, libvirt, debugfs "
                              "`vcpuN` directories)"),
    # capacity: what the host has to give, and how KVM polls before it lets a halted vCPU sleep
    Field("cpus_online", "integer", "logical CPUs online (`/sys/devices/system/cpu/online`): what the host "
                                    "schedules vCPUs on"),
    Field("mem_total_bytes", "integer", "`MemTotal` of `/proc/meminfo`, in bytes"),
    Field("halt_poll_ns", "integer", "`kvm.halt_poll_ns`: the longest a halted vCPU polls before it sleeps (0: "
                                     "no polling)"),
    Field("halt_poll_ns_grow", "integer", "`kvm.halt_poll_ns_grow`: the factor a vCPU's poll time grows by after a "
                                          "wakeup within it"),
    Field("halt_poll_ns_grow_start", "integer", "`kvm.halt_poll_ns_grow_start`: the poll time a vCPU starts "
                                                "growing from"),
    Field("halt_poll_ns_shrink", "integer", "`kvm.halt_poll_ns_shrink`: the divisor of a vCPU's poll time after a "
                                            "poll that failed (0: reset to 0)"),
    Field("nx_huge_pages", "boolean", "`kvm.nx_huge_pages`: executable huge pages split into 4k pages (the iTLB "
                                      "multihit mitigation; costs guest memory performance)"),
    Field("kernel_release", "string", "the running kernel (`uname -r`)"),
)

AGENT_FIELDS: tuple[Field, ...] = (
    Field("sent", "integer", "lines acknowledged by the server since collectd started (cumulative)"),
    Field("buffered", "integer", "lines waiting (buffer + in flight or being bisected)"),
    Field("dropped", "integer", "lines dropped because the buffer was full (oldest first; cumulative)"),
    Field("dropped_rejected", "integer", "lines the server refused alone (HTTP 400/422, after bisecting their "
          "batch; cumulative)"),
    Field("retries", "integer", "failed send attempts that will be retried (cumulative)"),
    Field("last_error", "string", "the last send error (never holds a secret), `\"\"` if none yet"),
    Field("spool_loaded", "integer", "lines loaded from the spool at start (after a crash: what it kept)"),
    Field("sample_duration_s", "float", "seconds `Collector.sample()` took (reading every stats fd, sums, totals)"),
    Field("read_duration_s", "float", "seconds of this read callback up to this point (sample, encoding, dispatch)"),
    Field("read_cpu_s", "float", "the same in CPU seconds of collectd's read thread"),
    Field("points", "integer", "lines this sample produced, this one included"),
    Field("dispatched", "integer", "values this sample dispatched into collectd"),
    Field("read_failures", "integer", "reads that failed (logged; cumulative)"),
    Field("vms_refused", "integer", "VMs left out of this sample because a value was implausible or unreadable "
                                    "(a hostile or broken VMM; logged once each, see docs/statistics.md)"),
)
# The shipping counters among AGENT_FIELDS (present only when the agent ships).
AGENT_SHIP_FIELDS = ("sent", "buffered", "dropped", "dropped_rejected", "retries", "last_error", "spool_loaded")
# What of the agent's own metrics goes into collectd too (plugin "kvmfleet"): gauges, then derives.
AGENT_GAUGES = ("sample_duration_s", "read_cpu_s")
AGENT_SHIP_GAUGES = ("buffered",)
AGENT_SHIP_DERIVES = ("sent", "dropped", "dropped_rejected", "retries")

F_SUMMARY = "summary"
# kvmfleet_finding: the summary and the finding's numeric evidence, one float field per figure (the rule's own names,
# e.g. shadow_events_per_s; nested figures joined with "_"; booleans and text left out): see docs/schema.md.
FINDING_FIELDS: tuple[Field, ...] = (
    Field(F_SUMMARY, "string", "the finding in one sentence, as the report says it"),
)

AUDIT_RUN_FIELDS: tuple[Field, ...] = (
    Field("findings", "integer", "findings this run wrote (0: the run found nothing, which is worth a point too)"),
    Field("critical", "integer", "of which critical"),
    Field("warning", "integer", "of which warning (info findings are the rest)"),
    Field("hosts", "integer", "hosts the run looked at"),
    Field("stale_hosts", "integer", "hosts with no recent sample: their findings could not be judged (the command "
                                    "exited 2), so a finding of theirs missing from this run has not cleared"),
    Field("elapsed_s", "float", "seconds the run took (queries and rules)"),
)

F_COUNT = "count"
EXIT_REASON_FIELDS: tuple[Field, ...] = (
    Field(F_COUNT, "integer", "hits of the reason since the agent started counting (cumulative; from 0 again "
                              "after an agent restart)"),
)

FIELDS: dict[str, tuple[Field, ...]] = {M_FACTS: FACT_FIELDS, M_AGENT: AGENT_FIELDS, M_FINDING: FINDING_FIELDS,
                                        M_AUDIT_RUN: AUDIT_RUN_FIELDS, M_EXIT_REASON: EXIT_REASON_FIELDS}


# ---------------------------------------------------------------------------------------------- counter names
# Counters the kernel renamed (include/linux/kvm_host.h and arch/x86/include/asm/kvm_host.h history):
# the current name -> the names older kernels gave the same counter. Readers accept both.
OLD_NAMES: dict[str, tuple[str, ...]] = {
    "irq_window_exits": ("irq_window",),
    "nmi_window_exits": ("nmi_window",),
    "request_irq_exits": ("request_irq",),
    "pages_2m": ("largepages",),
}
# Counters only old kernels have (no current name): mmu_pte_updated moved only under shadow paging, like
# mmu_pte_write; efer_reload counted EFER reloads on VM entry.
OLD_ONLY = ("mmu_pte_updated", "efer_reload")


def current_name(name: str) -> str:
    """The current name of a counter given by an old or a current name."""
    for new, olds in OLD_NAMES.items():
        if name in olds:
            return new
    return name


def names_of(counter: str) -> tuple[str, ...]:
    """A counter's current name followed by its old ones (the order readers try them in)."""
    return (counter, *OLD_NAMES.get(counter, ()))
