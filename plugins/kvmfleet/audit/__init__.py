"""``kvmfleet audit``: the query pack run against a fleet's InfluxDB, and the rules run against the answers.

* :mod:`.client` -- InfluxQL over HTTP ``/query`` (InfluxDB 1.x, 2.x with DBRP, 3.x), secrets from files;
* :mod:`.engine` -- the stages (fleet screen, detail for the hosts picked, evaluation) and :func:`run_audit`;
* :mod:`.rules` -- the arithmetic of each rule (thresholds and texts in ``querypack/rules.yaml``);
* :mod:`.report` -- table, JSON, Markdown and self-contained HTML output;
* :mod:`.cli` -- the ``audit``, ``queries`` and ``explain`` subcommands;
"""

from __future__ import annotations
