"""The shipped Grafana dashboard and the PromQL it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from tests.helpers import ROOT

DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "mobilepay-proxy.json"


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside a row included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query a panel runs."""
    return [
        (panel["title"], target["expr"])
        for panel in panels(load_dashboard())
        for target in panel.get("targets", [])
    ]


def dashboard_queries() -> list[tuple[str, str]]:
    """The panels' queries and the template variables' (Grafana's ``label_values(...)``)."""
    queries = panel_queries()
    for variable in load_dashboard()["templating"]["list"]:
        query = variable.get("query")
        queries.append((variable["name"], query["query"] if isinstance(query, dict) else query))
    return queries
