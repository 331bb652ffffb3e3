"""``kvmfleet audit``: the query pack run against a fleet's InfluxDB, and the rules run against the answers.

* :mod:`.client` -- InfluxQL over HTTP ``/query`` (InfluxDB 1.x, 2.x with DBRP, 3.x), secrets from files;
* :mod:`.engine` -- the named stages (fleet, resets, screen, detail, vms, evaluate, charts) and :func:`run_audit`;
* :mod:`.runner` -- the seam between the stages and InfluxDB: jobs (a pack query for some hosts) and the runner
  that turns them into parallel InfluxQL requests;
* :mod:`.merge` -- the answers turned into what the audit knows of each host (:mod:`.model`);
* :mod:`.rules` -- each rule as one unit (screen, evaluation, detail query, VM columns), registered once;
  thresholds, severities and texts in ``querypack/rules.yaml``;
* :mod:`.report` -- table, JSON, Markdown and self-contained HTML output;
* :mod:`.cli` -- the ``audit``, ``queries`` and ``explain`` subcommands;
"""

from __future__ import annotations
