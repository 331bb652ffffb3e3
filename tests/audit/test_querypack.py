"""The query pack's files, placeholders, column splitting, rules file, overrides and counter notes (no server)."""

from __future__ import annotations

import re
import string

import pytest

from kvmfleet.cli import main
from kvmfleet.querypack import (
    PackError,
    QueryParams,
    duration_seconds,
    exact_hosts_regex,
    find_counter,
    get_query,
    load_counters,
    load_queries,
    load_rules,
    one_line,
    parse_override,
    regex_literal,
    select_columns,
    split_columns,
)

FORBIDDEN = ("SLIMIT", "SOFFSET", "INTEGRAL", "SAMPLE", "SHOW ", "INTO ", "CREATE ", "DROP ", "DELETE ")


def test_every_query_is_portable_influxql_with_known_placeholders() -> None:
    queries = load_queries()
    assert {"fleet_counters", "host_tdp", "host_facts", "shadow_paging", "emulated_io", "irq_injection",
            "insn_emulation", "halt_polling", "vm_counters", "vcpu_counters", "exact_rates",
            "counter_rates"} <= set(queries)
    for q in queries.values():
        assert q.title and q.measurement and q.stage in ("fleet", "detail"), q.name
        placeholders = set(re.findall(r"\$\{(\w+)\}", q.text))
        assert placeholders <= {"window", "host_regex", "rp", "interval"}, q.name
        for stmt in q.filled(QueryParams(window="2h", host_regex="^hv1$", retention_policy="rp1")):
            upper = stmt.upper()
            assert "${" not in stmt and "--" not in stmt
            assert not any(word in upper for word in FORBIDDEN), (q.name, stmt)
            assert 'GROUP BY "HOST"' in upper or "GROUP BY *" in upper or 'GROUP BY TIME(' in upper, q.name
            assert "now() - 2h" in stmt and '"host" =~ /^hv1$/' in stmt and '"rp1".' in stmt


def test_rendering_fills_window_regex_rp_and_interval() -> None:
    q = get_query("counter_rates")
    text = q.render(QueryParams(window="6h", host_regex="a/b", interval="5m"))
    assert "now() - 6h" in text and r"/a\/b/" in text and "time(5m)" in text and 'FROM "kvm"' in text
    assert "-- name: counter_rates" in text  # comments kept for humans
    bare = q.render(QueryParams(window="6h"), comments=False)
    assert "--" not in bare and "time(360s)" in bare  # default interval: window / 60


@pytest.mark.parametrize("text,seconds", [("1h", 3600), ("90m", 5400), ("1h30m", 5400), ("2d", 172800),
                                          ("500ms", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["", "1", "h", "1 h", "-1h", "0s", "1y", "1h;DROP"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(PackError):
        QueryParams(window=bad).substitutions()


def test_regex_literal_escapes_slashes_and_rejects_bad_regexes() -> None:
    assert regex_literal("a/b") == r"a\/b"
    assert regex_literal(r"a\/b") == r"a\/b"  # already escaped stays as it is
    with pytest.raises(PackError):
        regex_literal("(unclosed")
    with pytest.raises(PackError):
        regex_literal("a\nb")


def test_exact_hosts_regex_matches_only_those_names() -> None:
    names = ["hv-1.dc1", "hv_2", "a+b", "x/y", "hv-10.dc1"]
    rx = re.compile(exact_hosts_regex(names[:4]))
    assert all(rx.match(n) for n in names[:4])
    assert not rx.match("hv-10.dc1") and not rx.match("hvX1.dc1") and not rx.match("hv-1.dc12")


def test_exact_hosts_regex_of_names_with_control_characters_stays_on_one_line() -> None:
    """Any hypervisor writes its host name: a newline in one must not stop the audit's detail queries."""
    names = ["nl\\\nname", "esc\x1b[2K\x1b[1Ahidden", "cr\rtab\t", "c1\x85nbsp\xa0", "x" * 65_400]
    literal = regex_literal(exact_hosts_regex(names))  # PackError before: "cannot span lines"
    assert literal.isprintable()
    rx = re.compile(exact_hosts_regex(names))
    assert all(rx.fullmatch(n) for n in names)
    assert not rx.fullmatch("nl\\nname") and not rx.fullmatch("esc\\x1b[2K\\x1b[1Ahidden")
    QueryParams(host_regex=exact_hosts_regex(names)).substitutions()


def test_split_columns_plain_and_subquery() -> None:
    stmt = "SELECT a AS a, last(b) - first(b) AS b, c FROM \"kvm\" WHERE x = 'y,z' GROUP BY \"host\""
    parts = split_columns(stmt, 2)
    assert parts == ["SELECT a AS a, c FROM \"kvm\" WHERE x = 'y,z' GROUP BY \"host\"",
                     "SELECT last(b) - first(b) AS b FROM \"kvm\" WHERE x = 'y,z' GROUP BY \"host\""]
    sub = ("SELECT mean(a) AS a, mean(b) AS b FROM (SELECT non_negative_derivative(a, 1s) AS a, "
           "non_negative_derivative(b, 1s) AS b FROM \"kvm\" GROUP BY *) GROUP BY \"host\"")
    parts = split_columns(sub, 4)
    assert len(parts) == 2
    assert parts[0] == ("SELECT mean(a) AS a FROM (SELECT non_negative_derivative(a, 1s) AS a FROM \"kvm\" "
                        "GROUP BY *) GROUP BY \"host\"")
    assert split_columns("SELECT a FROM m", 4) == ["SELECT a FROM m"]


def test_select_columns() -> None:
    stmt = get_query("vm_counters").filled(QueryParams())[0]
    cut = select_columns(stmt, ["exits", "invlpg"])
    assert cut.startswith("SELECT exits, invlpg FROM") and cut.endswith("ORDER BY time ASC LIMIT 1")
    assert select_columns(stmt, ["nonexistent"]) == stmt


def test_rules_file_loads_with_every_required_rule() -> None:
    rules = load_rules()
    assert {"shadow-paging", "nested-shadow", "tdp-disabled", "tdp-unavailable", "emulated-io", "irq-injection",
            "insn-emulation", "halt-polling", "exit-load"} <= set(rules)
    for r in rules.values():
        assert r.explanation.strip() and r.remedy.strip() and r.queries
    sp = rules["shadow-paging"]
    assert sp.thresholds["warning_per_exit"] < sp.thresholds["critical_per_exit"]
    for name in sp.counters:
        find_counter(name)  # every charted counter has notes


def test_threshold_overrides_from_file_and_flags(tmp_path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("shadow-paging:\n  critical_per_exit: 0.5\nhalt-polling: {min_fail_cpus: 1}\n")
    rules = load_rules([str(f)], ["shadow-paging.warning_per_exit=0.01"])
    assert rules["shadow-paging"].thresholds["critical_per_exit"] == 0.5
    assert rules["shadow-paging"].thresholds["warning_per_exit"] == 0.01
    assert rules["halt-polling"].thresholds["min_fail_cpus"] == 1.0
    assert rules["shadow-paging"].overridden == {"critical_per_exit": 0.5, "warning_per_exit": 0.01}
    assert load_rules()["shadow-paging"].thresholds["critical_per_exit"] == 0.02  # defaults untouched


@pytest.mark.parametrize("content,needle", [
    ("shadow-pagng: {critical_per_exit: 1}\n", "did you mean shadow-paging"),
    ("shadow-paging: {critical_per_exitt: 1}\n", "has no threshold 'critical_per_exitt'"),
    ("shadow-paging: {critical_per_exit: high}\n", "must be a number"),
    ("- just a list\n", "expected a mapping"),
    ("shadow-paging: [\n", "not valid YAML"),
])
def test_bad_threshold_files(tmp_path, content: str, needle: str) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(content)
    with pytest.raises(PackError, match=re.escape(needle)):
        load_rules([str(f)])


def test_parse_override() -> None:
    assert parse_override("exit-load.top_n=10") == ("exit-load", "top_n", 10.0)
    for bad in ("exit-load=3", "exit-load.top_n", "exit-load.top_n=ten"):
        with pytest.raises(PackError):
            parse_override(bad)


def test_counter_notes_and_old_names() -> None:
    counters = load_counters()
    for name in ("exits", "mmu_pte_write", "mmu_flooded", "mmu_pde_zapped", "mmu_unsync", "invlpg", "pf_guest",
                 "pf_fixed", "mmu_shadow_zapped", "mmu_cache_miss", "nested_run", "io_exits", "mmio_exits",
                 "irq_injections", "insn_emulation", "halt_poll_fail_ns", "halt_poll_success_ns"):
        assert counters[name].counts and counters[name].high
    assert find_counter("irq_window").name == "irq_window_exits"
    assert find_counter("largepages").name == "pages_2m"
    assert find_counter("kvm_vm.exits").name == "exits"
    assert find_counter("exits_sum").name == "exits"  # libvirt's vcpu.N.exits.sum naming
    with pytest.raises(PackError, match="did you mean mmu_pte_write"):
        find_counter("mmu_pte_writes")
    with pytest.raises(PackError, match="histogram bucket"):
        find_counter("halt_wait_hist_bucket_3")


def test_cli_queries_and_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queries", "--list"]) == 0
    assert "shadow_paging" in capsys.readouterr().out
    assert main(["queries", "shadow_paging", "--window", "30m", "--host-regex", "^hv", "--no-comments"]) == 0
    out = capsys.readouterr().out
    assert "now() - 30m" in out and "/^hv/" in out and "--" not in out
    assert main(["queries"]) == 0
    assert capsys.readouterr().out.count("-- name:") == len(load_queries())
    assert main(["queries", "nope"]) == 2
    assert "no query named 'nope'" in capsys.readouterr().err
    assert main(["queries", "--window", "1x"]) == 2
    assert main(["queries", "--rules"]) == 0
    assert "critical_per_exit = 0.02" in capsys.readouterr().out
    assert main(["explain", "mmu_pte_write"]) == 0
    out = capsys.readouterr().out
    assert "kvm_mmu_pte_write" in out and "shadow" in out.lower()
    assert main(["explain", "irq_window"]) == 0
    assert "irq_window_exits" in capsys.readouterr().out
    assert main(["explain", "shadow-paging"]) == 0
    assert "What to do" in capsys.readouterr().out
    assert main(["explain", "bogus_counter"]) == 2
    assert "no notes on a counter named 'bogus_counter'" in capsys.readouterr().err
    assert main(["explain", "--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(load_counters())


# -- one statement per line (the influx shell runs a line at a time)
# Literals as InfluxQL reads them: strings, quoted identifiers, and a /regex/ after =~ or !~.
_LITERAL = re.compile(r"""'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|(?<=~)\s*/(?:\\.|[^/\\])*/""")


def _literals(statement: str) -> list[str]:
    return [m.group(0).strip() for m in _LITERAL.finditer(statement)]


def _outside_literals(statement: str) -> str:
    """The statement without its literals and without any whitespace, and so without the parenthesis spacing."""
    return re.sub(r"\s+", "", _LITERAL.sub("L", statement))


NASTY = QueryParams(window="2h", host_regex="^hv a/b;c -- d' \"e\"$", retention_policy="rp one", interval="30s")


@pytest.mark.parametrize("params", [QueryParams(), NASTY], ids=["default", "nasty"])
def test_every_pack_statement_flattens_to_one_line_with_literals_intact(params: QueryParams) -> None:
    for q in load_queries().values():
        wrapped = q.filled(params)
        flat_lines = q.render(params, comments=False).splitlines()
        assert len(flat_lines) == len(wrapped), q.name
        for flat, stmt in zip(flat_lines, wrapped):
            assert flat.endswith(";") and "\n" not in flat
            flat = flat[:-1]
            assert _literals(flat) == _literals(stmt), q.name
            assert _outside_literals(flat) == _outside_literals(stmt), q.name
            assert "  " not in _LITERAL.sub("L", flat), q.name  # whitespace runs outside literals are one space
        assert "/" + regex_literal(params.host_regex) + "/" in flat_lines[0]


def test_default_layout_comments_before_each_statement_no_blank_line() -> None:
    subs = QueryParams().substitutions()
    for q in load_queries().values():
        text = q.render(QueryParams())
        lines = text.splitlines()
        comments = [line for line in lines if line.startswith("--")]
        statements = [line for line in lines if not line.startswith("--")]
        assert comments == [string.Template(line.rstrip()).substitute(subs) for line in q.text.splitlines()
                            if line.strip().startswith("--")]  # a comment may name ${interval}
        assert len(statements) == len(q.statements) and all(s.startswith("SELECT ") for s in statements)
        assert "" not in lines  # `influx -execute` stops at a blank line ("empty input")
        assert q.render(QueryParams(), wrapped=True) == string.Template(q.text).substitute(subs)


@pytest.mark.parametrize("wrapped,flat", [
    ("SELECT a\n  FROM  b", "SELECT a FROM b"),
    ("SELECT a FROM b WHERE s = 'x  y\n  z' AND \"t  u\" = 'it\\'s  ok'",
     "SELECT a FROM b WHERE s = 'x  y\n  z' AND \"t  u\" = 'it\\'s  ok'"),
    ("SELECT a FROM b WHERE host =~ /a\\/b  c\n/\nAND x !~  /d  e/",
     "SELECT a FROM b WHERE host =~ /a\\/b  c\n/ AND x !~ /d  e/"),
    ("SELECT a  /  2 FROM b", "SELECT a / 2 FROM b"),  # a division, not a regex
    ("SELECT a FROM  /cpu  .*/, /mem /", "SELECT a FROM /cpu  .*/, /mem /"),  # measurement regexes
    ("SELECT a -- the first\nFROM b", "SELECT a FROM b"),  # an inline comment would swallow the rest of the line
    ("SELECT a /* a\n  comment */FROM b", "SELECT a FROM b"),
    ("SELECT mean(x) FROM (\n  SELECT x FROM b\n  GROUP BY *\n)\nGROUP BY host",
     "SELECT mean(x) FROM (SELECT x FROM b GROUP BY *) GROUP BY host"),
])
def test_one_line_keeps_literals(wrapped: str, flat: str) -> None:
    assert one_line(wrapped) == flat


def test_cli_queries_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    n_statements = sum(len(q.statements) for q in load_queries().values())
    assert main(["queries", "--no-comments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == n_statements and all(s.startswith("SELECT ") and s.endswith(";") for s in lines)
    assert main(["queries"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "" not in lines and sum(not s.startswith("--") for s in lines) == n_statements
    assert main(["queries", "emulated_io", "--wrapped"]) == 0
    assert capsys.readouterr().out == get_query("emulated_io").render(QueryParams(), wrapped=True).rstrip() + "\n"
    assert main(["queries", "--wrapped", "--no-comments"]) == 0
    wrapped = capsys.readouterr().out
    assert "--" not in wrapped and "\n\n" in wrapped and len(wrapped.splitlines()) > n_statements
