"""The seam between the engine and InfluxDB: the engine asks for :class:`Job` s (a pack query, for these hosts,
with these columns), a :class:`QueryRunner` answers a stage's jobs at once.

:class:`InfluxQLRunner` is the real one: it fills each job's query for its hosts (a regex naming exactly them, at
most :data:`HOSTS_PER_QUERY` a statement), cuts a ``parallel: fields`` query into :data:`SHARDS` statements and runs
every statement as its own request, ``parallel`` at once. A test gives the engine a runner of its own that answers
canned series per query name.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ..querypack import QueryParams, exact_hosts_regex, get_query, select_columns, split_columns
from .client import Series

SHARDS = 4  # a query marked "parallel: fields" runs as this many statements
HOSTS_PER_QUERY = 400  # a detail query's regex names at most this many hosts; more make more queries

# Per job key: the series of each statement of the job's query (in the order of the query file's statements).
Answers = dict[str, list[list[Series]]]


@dataclass(frozen=True)
class Job:
    """One question of a stage: ``query`` of the pack, answered under ``key``."""

    key: str
    query: str
    hosts: Sequence[str] | None = None  # None: every host of --host-regex
    columns: Sequence[str] | None = None  # only these select items
    interval: str | None = None  # the GROUP BY time() bucket of a query over time


class QueryRunner(Protocol):
    """What the engine needs of a runner: the answers to a stage's jobs, and how many requests it made."""

    @property
    def requests(self) -> int: ...

    def run(self, jobs: Sequence[Job]) -> Answers: ...


class StatementClient(Protocol):
    """What :class:`InfluxQLRunner` needs of :class:`~.client.InfluxQLClient`."""

    requests: int

    def query(self, statements: Sequence[str] | str, what: str = "query") -> list[list[Series]]: ...


class InfluxQLRunner:
    """Jobs as InfluxQL requests through ``client``, ``parallel`` in flight at once."""

    def __init__(self, client: StatementClient, params: QueryParams, parallel: int) -> None:
        self.client = client
        self.params = params
        self.pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="kvmfleet-audit")

    @property
    def requests(self) -> int:
        return self.client.requests

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _params(self, hosts: Sequence[str] | None, interval: str | None) -> QueryParams:
        return QueryParams(window=self.params.window,
                           host_regex=self.params.host_regex if hosts is None else exact_hosts_regex(hosts),
                           retention_policy=self.params.retention_policy, interval=interval)

    def statements(self, job: Job) -> list[tuple[int, str]]:
        """(statement index in the query file, text) of every request ``job`` makes."""
        q = get_query(job.query)
        host_groups: list[Sequence[str] | None] = [None] if job.hosts is None else [
            job.hosts[i:i + HOSTS_PER_QUERY] for i in range(0, len(job.hosts), HOSTS_PER_QUERY)]
        out = []
        for hosts in host_groups:
            for idx, stmt in enumerate(q.filled(self._params(hosts, job.interval))):
                if job.columns is not None:
                    stmt = select_columns(stmt, job.columns)
                out += [(idx, part) for part in (split_columns(stmt, SHARDS) if q.parallel_fields else [stmt])]
        return out

    def run(self, jobs: Sequence[Job]) -> Answers:
        """Every statement of the jobs as parallel requests; a statement cut into several requests gets their
        series together."""
        requests = [(job, idx, text) for job in jobs for idx, text in self.statements(job)]
        answers = list(self.pool.map(lambda r: self.client.query(r[2], what=f"query {r[0].query}"), requests))
        out: Answers = {}
        for (job, idx, _), ans in zip(requests, answers):
            stmts = out.setdefault(job.key, [])
            while len(stmts) <= idx:
                stmts.append([])
            stmts[idx].extend(ans[0] if ans else [])
        return out
