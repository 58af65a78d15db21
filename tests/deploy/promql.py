"""Pull the PromQL out of the dashboard and the alert rules, and split an alert into its signal and threshold.

An alert expression is `signal OP threshold [and guard]`. When everything is healthy the whole expression is
(rightly) empty, so a test that wants to prove the metrics exist evaluates the signal: the left operand of the
first comparison at the top level of the expression. Pure string handling; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_OPEN, _CLOSE = "([{", ")]}"

# Grafana's built-in variables and the dashboard's own, replaced by what Grafana would send. The windows are
# short because the test's Prometheus has only a minute or so of data.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$node": ".*",
}


@dataclass(frozen=True)
class Query:
    source: str  # "dashboard panel 'Cache hit rate'" or "alert WeightcacheAgentDown"
    expr: str


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries: list[Query] = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(Query(f"dashboard panel {panel['title']!r} ({target['refId']})", target["expr"]))
    return queries


def rule_queries(prometheus_rule: dict[str, Any]) -> list[Query]:
    return [
        Query(f"alert {rule['alert']}" if "alert" in rule else f"record {rule['record']}", rule["expr"])
        for group in prometheus_rule["spec"]["groups"]
        for rule in group["rules"]
    ]


def substitute_grafana_variables(expr: str) -> str:
    # Longest names first, so `$__rate_interval` is not eaten by a shorter variable's prefix.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def alert_signal(expr: str) -> str:
    """The left operand of the first top-level comparison, or the whole expression if it has none."""
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0:
            for op in _COMPARISONS:
                # `=~` and `!~` only occur inside braces (depth > 0), so no confusion with `==`/`!=` here.
                if expr.startswith(op, i):
                    return expr[:i].strip()
        i += 1
    return expr.strip()


def metric_names(expr: str) -> set[str]:
    """The weightcache metric names an expression reads (histogram suffixes stripped to the family)."""
    names = set(re.findall(r"\bweightcache_[a-z0-9_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
            for n in names}
