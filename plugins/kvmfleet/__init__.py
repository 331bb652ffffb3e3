"""kvmfleet: read the KVM counters of a hypervisor and ship them to InfluxDB.

The library (this package) has no collectd dependency; ``kvmfleet.collectd_plugin`` is the thin glue
that collectd's python plugin imports.
"""

__version__ = "0.1.0"
