"""The query pack: InfluxQL files, the audit rules and the counter notes, shipped as package data.

* ``*.influxql`` (:mod:`.queries`): one file per question, a header of ``-- key: value`` lines and comments, then
  one or more statements (``;``-separated), each grouped over the whole fleet. Placeholders (:mod:`.params`),
  filled by :meth:`Query.render`: ``${window}`` (an InfluxQL duration), ``${host_regex}`` (a regular expression;
  ``/`` is escaped for the regex literal), ``${rp}`` (``"rp".`` or nothing) and ``${interval}`` (``GROUP BY
  time()`` bucket).
* ``rules.yaml``: the rules (:mod:`.rules`), with thresholds an operator may override.
* ``counters.yaml``: what each KVM counter counts (:mod:`.counters`, ``kvmfleet explain``).

Only the portable InfluxQL subset is used (InfluxDB 1.6+, 2.x through ``/query`` with a DBRP mapping, 3.x):
``first``/``last``/``min``/``mean``/``sum``, arithmetic between them, ``non_negative_derivative``,
``non_negative_difference``, subqueries,
``GROUP BY time(), "host"``, ``fill()``; no ``SLIMIT``, ``INTEGRAL``, ``SAMPLE`` or ``SHOW``.
"""

from __future__ import annotations

from .counters import CounterDoc, counter_name_ok, explain_text, find_counter, load_counters
from .data import PackError
from .params import QueryParams, duration_seconds, exact_hosts_regex, interval_for, regex_literal
from .queries import Query, get_query, load_queries, one_line, parse_query_file, select_columns, split_columns
from .rules import Rule, apply_overrides, load_rules, parse_override, parse_rules

__all__ = [
    "CounterDoc", "PackError", "Query", "QueryParams", "Rule", "apply_overrides", "counter_name_ok",
    "duration_seconds", "exact_hosts_regex", "explain_text", "find_counter", "get_query", "interval_for",
    "load_counters", "load_queries", "load_rules", "one_line", "parse_override", "parse_query_file", "parse_rules",
    "regex_literal", "select_columns", "split_columns",
]
