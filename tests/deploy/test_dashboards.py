"""The Grafana dashboards and the Prometheus config in deploy/ ask only for what Atrium exports.

Every PromQL expression of every dashboard (panel targets, rows' nested panels, the template
variables' queries) is read with a small tokenizer that keeps the vector selectors: metric names
and label matchers, never function names, grouping labels, strings, durations or numbers. A real
``atrium serve`` and a real ``atrium worker`` (PostgreSQL + Redis) then get a little traffic and
both ``/metrics`` pages are scraped: each metric a dashboard uses must be on one of them, and the
labels and literal label values its selectors match on must be ones that metric carries. The
scrape config must name the ports the settings default to, and Grafana's provisioning the files
and the datasource the dashboards expect.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from main import create_admin
from tests.support.api_process import free_port
from tests.support.live_api import LiveApi, live_api

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
DATASOURCE_REF = "${DS_PROMETHEUS}"
# Series Prometheus makes itself for every target; no process exports them.
SYNTHETIC = frozenset({"up"})
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                              "__range_ms", "__from", "__to"})

# --- PromQL: just enough of the grammar to find the vector selectors ------------------------------

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing",
    "end", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "start", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
})
# Followed by a parenthesised list of label names (group_left/right: optionally).
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A number, hex or float, or a duration (5m, 1h30m) where one may stand outside brackets (offset 5m).
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*")
# Grafana's template variables: $name, ${name} / ${name:format}, [[name]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")
_OPERATORS = ("=~", "!~", "!=", "=")


class PromQLError(ValueError):
    """The expression is not something Prometheus would parse (as far as this tokenizer sees)."""


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...] = ()  # (label, operator, value)


@dataclass(frozen=True)
class Parsed:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str] = frozenset()  # labels of by/without/on/ignoring/group_* lists

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def _string_end(text: str, start: int) -> int:
    """The index after the string literal opening at ``start`` ("..", '..' with escapes, `..` raw)."""
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == "\\" and quote != "`":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    raise PromQLError(f"unterminated string at {start}: {text[start:start + 30]!r}")


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return body if literal[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def _close(text: str, start: int, opening: str, closing: str) -> int:
    """The index after the bracket that closes the one at ``start``, skipping strings inside."""
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char in "\"'`":
            i = _string_end(text, i)
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise PromQLError(f"unclosed {opening!r} at {start}: {text[start:start + 30]!r}")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _matchers(text: str, start: int) -> tuple[str | None, tuple[tuple[str, str, str], ...], int]:
    """The ``{...}`` at ``start``: (a metric name given inside it, the matchers, the index after it).

    A name inside comes from ``__name__="x"`` or, in Prometheus 3, a bare quoted string.
    """
    i, name, matchers = start + 1, None, []
    while True:
        i = _skip_space(text, i)
        if i >= len(text):
            raise PromQLError(f"unclosed '{{' at {start}")
        if text[i] == "}":
            break
        if text[i] in "\"'`":
            end = _string_end(text, i)
            label = _unquote(text[i:end])
            bare = True
        else:
            match = _LABEL.match(text, i)
            if match is None:
                raise PromQLError(f"a label name expected at {i}: {text[i:i + 30]!r}")
            label, end, bare = match.group(), match.end(), False
        i = _skip_space(text, end)
        operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
        if operator is None:
            if not bare:
                raise PromQLError(f"a matcher operator expected after {label!r} at {i}")
            name = label
        else:
            i = _skip_space(text, i + len(operator))
            if i >= len(text) or text[i] not in "\"'`":
                raise PromQLError(f"a quoted value expected for {label!r} at {i}")
            end = _string_end(text, i)
            value, i = _unquote(text[i:end]), end
            if label == "__name__" and operator == "=":
                name = value
            else:
                matchers.append((label, operator, value))
        i = _skip_space(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] != "}":
            raise PromQLError(f"',' or '}}' expected at {i}: {text[i:i + 30]!r}")
    return name, tuple(matchers), i + 1


def parse(expr: str) -> Parsed:
    """The vector selectors of a PromQL expression (Grafana variables allowed) and its grouping labels."""
    selectors: list[Selector] = []
    grouping: set[str] = set()
    depth, i, n = 0, 0, len(expr)
    while i < n:
        char = expr[i]
        if char.isspace():
            i += 1
        elif char == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif char in "\"'`":  # label_replace's arguments, count_values' label
            i = _string_end(expr, i)
        elif (variable := _VARIABLE.match(expr, i)) is not None:
            i = variable.end()
            before = expr[variable.start() - 1] if variable.start() else " "
            if _IDENT.match(expr, i) or _IDENT.match(before):
                raise PromQLError(f"a metric name made from a variable cannot be checked: {expr!r}")
        elif char == "[":  # a range or subquery: durations and variables only
            i = _close(expr, i, "[", "]")
        elif char == "{":  # {__name__="x", ...}: a selector that names its metric inside
            name, matchers, i = _matchers(expr, i)
            if name is None:
                raise PromQLError(f"a selector without a metric name: {expr!r}")
            selectors.append(Selector(name, matchers))
        elif char.isdigit() or (char == "." and expr[i + 1:i + 2].isdigit()):
            match = _NUMBER.match(expr, i)
            assert match is not None
            i = match.end()
        elif (match := _IDENT.match(expr, i)) is not None:
            word, i = match.group(), match.end()
            after = _skip_space(expr, i)
            lower = word.lower()
            if lower in LABEL_LISTS:
                if after < n and expr[after] == "(":
                    end = _close(expr, after, "(", ")")
                    grouping |= {g.strip() for g in expr[after + 1:end - 1].split(",") if g.strip()}
                    i = end
            elif lower in KEYWORDS:
                pass
            elif lower in AGGREGATIONS:
                modifier = _IDENT.match(expr, after)
                grouped = modifier is not None and modifier.group().lower() in {"by", "without"}
                if not (expr.startswith("(", after) or grouped):
                    raise PromQLError(f"{word!r} is an aggregation but no '(' or by/without follows it")
            elif after < n and expr[after] == "(":
                if word not in FUNCTIONS:
                    raise PromQLError(f"unknown function {word!r} in {expr!r}")
            else:
                matchers: tuple[tuple[str, str, str], ...] = ()
                if after < n and expr[after] == "{":
                    inner, matchers, i = _matchers(expr, after)
                    if inner is not None:
                        raise PromQLError(f"{word!r} names its metric twice")
                selectors.append(Selector(word, matchers))
        elif char in "()":
            depth += 1 if char == "(" else -1
            if depth < 0:
                raise PromQLError(f"unbalanced ')' at {i}: {expr!r}")
            i += 1
        elif char in "+-*/%^=!<>,@":
            i += 1
        else:
            raise PromQLError(f"unexpected {char!r} at {i}: {expr!r}")
    if depth:
        raise PromQLError(f"unbalanced '(' in {expr!r}")
    return Parsed(tuple(selectors), frozenset(grouping))


def parse_variable_query(query: str) -> Parsed:
    """A Prometheus template variable's query: label_values(selector, label), query_result(expr), ..."""
    if match := re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query, re.S):
        parsed = parse(match.group(1))
        return Parsed(parsed.selectors, frozenset({match.group(2)}))
    if match := re.fullmatch(r"\s*query_result\((.+)\)\s*", query, re.S):
        return parse(match.group(1))
    if re.fullmatch(r"\s*(label_values\(\s*\w+\s*\)|label_names\(\s*\)|metrics\(.*\))\s*", query, re.S):
        return Parsed(())
    raise PromQLError(f"an unknown kind of variable query: {query!r}")


# --- the dashboards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    dashboard: str  # the file's name
    panel: str  # the panel's title, or "variable $name"
    expr: str

    def where(self) -> str:
        return f"{self.dashboard}, {self.panel}"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows (a collapsed row keeps its panels in its own "panels") too."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


@cache
def dashboards() -> dict[str, dict[str, Any]]:
    paths = sorted(DASHBOARDS.glob("*.json"))
    assert paths, f"no dashboard under {DASHBOARDS}"
    return {path.name: json.loads(path.read_text()) for path in paths}


def queries(name: str, board: dict[str, Any]) -> list[Query]:
    found = []
    for panel in _panels(board["panels"]):
        for target in panel.get("targets") or []:
            found.append(Query(name, f"panel {panel.get('title')!r}", target.get("expr") or ""))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append(Query(name, f"variable ${variable['name']}",
                               query["query"] if isinstance(query, dict) else query))
    return found


def all_queries() -> list[Query]:
    return [q for name, board in dashboards().items() for q in queries(name, board)]


def parsed(query: Query) -> Parsed:
    try:
        return parse_variable_query(query.expr) if query.panel.startswith("variable ") else parse(query.expr)
    except PromQLError as exc:
        raise AssertionError(f"{query.where()}: {exc}") from None


# --- the tokenizer itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "metrics", "grouping"), [
    ("histogram_quantile(0.99, sum by (le, handler) (rate(http_request_duration_seconds_bucket[5m])))",
     {"http_request_duration_seconds_bucket"}, {"le", "handler"}),
    ('sum(rate(a_total{job=~"$job", status=~"5.."}[$__rate_interval])) by (method)\n'
     '  / ignoring(status) group_left(team) b_info # b_info{x="y"} is a comment, and so is c\n',
     {"a_total", "b_info"}, {"method", "status", "team"}),
    ('label_replace(up{job="api"}, "by", "$1", "instance", "(.*):.*") and on (by) vector(1)',
     {"up"}, {"by"}),
    ('{__name__="odd:name", state="in_use"} offset 5m - 1e3 * 0x1F + .5 > bool Inf',
     {"odd:name"}, set()),
    ('max_over_time(rate(x_sum[5m])[1h:1m]) or count_values("le", y) unless topk(3, z) atan2 w',
     {"x_sum", "y", "z", "w"}, set()),
    ("sum without (instance) (q) + avg(rate(q[${__range}])) @ start() * $scale / [[factor]]",
     {"q"}, {"instance"}),
])
def test_the_tokenizer_keeps_selectors_and_skips_everything_else(
    expr: str, metrics: set[str], grouping: set[str]
) -> None:
    result = parse(expr)
    assert result.metrics == metrics
    assert result.grouping == grouping


def test_the_tokenizer_reads_label_matchers() -> None:
    (selector,) = parse('rate(m_total{a="x", b!="y\\"z", c=~"p|q", d!~`r.*`,}[5m])').selectors
    assert selector == Selector("m_total", (("a", "=", "x"), ("b", "!=", 'y"z'), ("c", "=~", "p|q"),
                                            ("d", "!~", "r.*")))
    (utf8,) = parse('{"metric.with.dots", le="0.25"}').selectors
    assert utf8 == Selector("metric.with.dots", (("le", "=", "0.25"),))


@pytest.mark.parametrize(("expr", "error"), [
    ("rat(x[5m])", "unknown function 'rat'"),
    ("sum(rate(x[5m])", "unbalanced"),
    ("sum rate(x[5m])", "aggregation"),
    ('x{job="a"', "unclosed"),
    ('x{job}', "operator"),
    ('{job="a"}', "without a metric name"),
    ('x{job="a}', "unterminated"),
    ("rate(${prefix}_total[5m])", "made from a variable"),
])
def test_the_tokenizer_refuses_what_prometheus_would(expr: str, error: str) -> None:
    with pytest.raises(PromQLError, match=error):
        parse(expr)


def test_the_check_finds_a_wrong_metric_name() -> None:
    """The live check below against a made-up scrape: a typo'd name and a wrong label value fail it."""
    scrape = Scrape.of(
        "# TYPE http_requests_total counter\n"
        'http_requests_total{handler="/x",method="GET",status="200"} 1.0\n'
        "# TYPE atrium_jobs_failed_total counter\n"  # a family with no sample yet
        "# TYPE h_seconds histogram\n"
    )
    good = Query("d.json", "panel 'ok'", 'sum by (handler) (rate(http_requests_total{status="200"}[5m]))'
                 " + rate(atrium_jobs_failed_total[5m]) + rate(h_seconds_bucket[5m])")
    assert missing([good], scrape) == []
    wrong = Query("d.json", "panel 'typo'", "sum(rate(http_request_total[5m]))")
    assert missing([wrong], scrape) == ["d.json, panel 'typo': http_request_total is exported by neither "
                                        "`atrium serve` nor `atrium worker`"]
    label = Query("d.json", "panel 'label'", 'rate(http_requests_total{code="200", method="PUT"}[5m])')
    assert missing([label], scrape) == [
        "d.json, panel 'label': http_requests_total has no label 'code' (it has handler, method, status)",
        "d.json, panel 'label': http_requests_total never has method=\"PUT\" (seen: GET)",
    ]
    assert missing([Query("d.json", "panel 'h'", "rate(h_seconds[5m])")], scrape) == [
        "d.json, panel 'h': h_seconds is exported by neither `atrium serve` nor `atrium worker`"]
    grouped = Query("d.json", "panel 'by'", "sum by (handlr, job) (rate(http_requests_total[5m]))")
    assert missing([grouped], scrape) == [
        "d.json, panel 'by': groups by 'handlr', a label none of http_requests_total has"]


# --- what the processes export -----------------------------------------------------------------------


@dataclass
class Scrape:
    """Sample names from /metrics pages, with the labels and values seen on each."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # sample name -> label -> values
    families: set[str] = field(default_factory=set)  # the sample names of families without samples

    @classmethod
    def of(cls, *pages: str) -> Scrape:
        scrape = cls()
        for page in pages:
            for family in text_string_to_metric_families(page):
                for sample in family.samples:
                    seen = scrape.labels.setdefault(sample.name, {})
                    for label, value in sample.labels.items():
                        seen.setdefault(label, set()).add(value)
            # "# TYPE name kind" also for a labelled family none of whose series exists yet
            for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M):
                suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                            "gaugehistogram": ("_bucket", "_gsum", "_gcount")}.get(kind, ("",))
                scrape.families |= {name + suffix for suffix in suffixes}
        return scrape

    def exports(self, metric: str) -> bool:
        return metric in self.labels or metric in self.families


def missing(found: list[Query], scrape: Scrape, target_labels: frozenset[str] = frozenset({"job", "instance"})
            ) -> list[str]:
    """What each query asks for that the scrape lacks: metrics, labels, literal label values."""
    problems = []
    for query in found:
        result = parsed(query)
        for selector in result.selectors:
            if selector.metric in SYNTHETIC:
                continue
            if not scrape.exports(selector.metric):
                problems.append(f"{query.where()}: {selector.metric} is exported by neither `atrium serve` "
                                f"nor `atrium worker`")
                continue
            seen = scrape.labels.get(selector.metric)
            if seen is None:
                continue  # a family whose labelled series this traffic did not create: no labels to check
            for label, operator, value in selector.matchers:
                if label in target_labels or label == "__name__":
                    continue
                if label not in seen:
                    problems.append(f"{query.where()}: {selector.metric} has no label {label!r} "
                                    f"(it has {', '.join(sorted(seen)) or 'none'})")
                    continue
                # A literal (a value, or words|like|these with no other regex syntax) must be one the
                # label takes; a variable, a pattern or a negation is not checked.
                if "$" in value or operator not in {"=", "=~"}:
                    continue
                words = [value] if operator == "=" else value.split("|")
                if operator == "=~" and not all(re.fullmatch(r"\w+", w) for w in words):
                    continue
                for word in words:
                    if word not in seen[label]:
                        problems.append(f'{query.where()}: {selector.metric} never has {label}="{word}" '
                                        f"(seen: {', '.join(sorted(seen[label]))})")
        # by (...) / on (...): a label no metric of the expression has would merge every series.
        metrics = result.metrics - SYNTHETIC
        if all(m in scrape.labels for m in metrics):
            carried = set(target_labels).union(*(scrape.labels[m] for m in metrics))
            for label in sorted(result.grouping - carried):
                problems.append(f"{query.where()}: groups by {label!r}, a label none of "
                                f"{', '.join(sorted(metrics))} has")
    return problems


# --- the live check ------------------------------------------------------------------------------------


async def _traffic(api: LiveApi) -> None:
    """A sign-up (its welcome email is a job), an item read twice (a miss, then a hit), a 404, a 422
    and a paid invoice (the charge is a job)."""
    client = api.client

    async def bearer(email: str, password: str) -> dict[str, str]:
        login = await client.post("/api/v1/auth/token", data={"username": email, "password": password})
        assert login.status_code == 200, login.text
        return {"Authorization": f"Bearer {login.json()['access_token']}"}

    email, password = f"dash-{uuid.uuid4().hex[:10]}@example.com", "dashboard password 1"
    signup = await client.post("/api/v1/users", json={"email": email, "password": password,
                                                      "full_name": "Dash Board", "age": 30})
    assert signup.status_code == 201, signup.text
    user = await bearer(email, password)
    # What `atrium create-admin` runs, in this process: seconds quicker than starting one.
    admin_email = f"dash-admin-{uuid.uuid4().hex[:10]}@example.com"
    await create_admin(Settings(**api.values), admin_email, password, "Dash Admin")
    admin = await bearer(admin_email, password)
    item = await client.post("/api/v1/items", headers=admin,
                             json={"name": "Gauge", "price": 1200, "currency": "EUR"})
    assert item.status_code == 201, item.text
    item_id = item.json()["id"]
    for _ in range(2):
        read = await client.get(f"/api/v1/items/{item_id}")
        assert read.status_code == 200, read.text
    assert (await client.get(f"/api/v1/items/{uuid.uuid4()}")).status_code == 404
    assert (await client.post("/api/v1/items", headers=admin, json={"name": ""})).status_code == 422
    invoice = await client.post("/api/v1/invoices", headers=user,
                                json={"lines": [{"item_id": item_id, "quantity": 1}]})
    assert invoice.status_code == 201, invoice.text
    pay = await client.post(f"/api/v1/invoices/{invoice.json()['id']}/payments",
                            json={"payment_token": "tok_visa"},
                            headers={**user, "Idempotency-Key": uuid.uuid4().hex})
    assert pay.status_code == 202, pay.text


def _value(page: str, sample: str) -> float:
    """One sample's value on a /metrics page (0 when it is not there)."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", page, re.M)
    return float(match.group(1)) if match else 0.0


WELCOME = 'task="users.send_welcome_email"'


def _jobs_done(page: str) -> bool:
    """The charge succeeded and at least one welcome email was dead-lettered (failed - retried)."""
    dead = (_value(page, f"atrium_jobs_failed_total{{{WELCOME}}}")
            - _value(page, f"atrium_jobs_retried_total{{{WELCOME}}}"))
    return dead >= 1 and _value(page, 'atrium_jobs_processed_total{task="billing.charge_payment"}') >= 1


async def _worker_page(port: int, ready: Callable[[str], bool], within: float = 15.0) -> str:
    """The worker's /metrics once ``ready`` says it shows what the traffic caused."""
    page = ""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
        for _ in range(int(within / 0.1)):
            try:
                page = (await client.get("/metrics")).text
            except httpx.TransportError:
                page = ""
            if ready(page):
                return page
            await asyncio.sleep(0.1)
    raise AssertionError(f"the worker's /metrics on port {port} never showed the jobs done:\n{page[-3000:]}")


@pytest.mark.slow
async def test_every_dashboard_query_uses_metrics_a_live_api_and_worker_export(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    found = all_queries()
    metrics_port = free_port()
    # Mail to a port nobody listens on: welcome emails fail, are retried once, then dead-lettered,
    # so the failed and retried series exist too.
    overrides = {"worker_metrics_port": metrics_port, "smtp_port": free_port(), "job_max_retries": 1}
    async with live_api("production", tmp_path, pg_database_factory, **overrides) as api:
        await _traffic(api)
        worker = await _worker_page(metrics_port, _jobs_done)
        served = await api.client.get("/metrics")
        assert served.status_code == 200
    # The traffic made the labelled series the panels match on, on the process that owns them.
    assert _value(served.text, 'atrium_cache_requests_total{cache="items",result="hit"}') == 1
    not_found = 'http_requests_total{handler="/api/v1/items/{item_id}",method="GET",status="404"}'
    assert _value(served.text, not_found) == 1
    assert _value(worker, f"atrium_jobs_retried_total{{{WELCOME}}}") >= 1
    assert _value(worker, "atrium_db_pool_max_connections") > 0
    target_labels = frozenset({"job", "instance"} | _relabelled_targets())
    problems = missing(found, Scrape.of(served.text, worker), target_labels)
    assert not problems, "dashboard queries ask for what Atrium does not export:\n" + "\n".join(problems)


# --- static checks: the files agree with each other and with the settings ----------------------------


def test_every_dashboard_query_parses() -> None:
    found = all_queries()
    assert len(found) > 20
    for query in found:
        assert query.expr.strip(), f"{query.where()}: an empty query"
        assert parsed(query).selectors, f"{query.where()}: selects no metric"


def test_dashboards_use_a_current_schema_the_datasource_variable_and_no_per_process_only_metrics() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provisioned,) = [d for d in datasource if d["type"] == "prometheus"]
    uids = set()
    for name, board in dashboards().items():
        version = board["schemaVersion"]
        assert version >= 39, f"{name}: schemaVersion {version} predates Grafana 11"
        assert board["uid"] not in uids, f"{name}: uid {board['uid']} is taken"
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        source = variables["DS_PROMETHEUS"]
        assert (source["type"], source["query"]) == ("datasource", "prometheus"), name
        assert source["current"]["value"] == provisioned["uid"], f"{name}: defaults to another datasource"
        panels = list(_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels:
            where = f"{name}, panel {panel.get('title')!r}"
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), where
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{where}: no query"
            for target in [panel, *panel["targets"]]:
                assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_REF}, where
        for query in queries(name, board):
            for groups in _VARIABLE.findall(query.expr):
                variable = next(g for g in groups if g)
                assert variable in variables or variable in GRAFANA_BUILTINS, \
                    f"{query.where()}: ${variable} is no variable of the dashboard"
            # `atrium serve --workers N` (multiprocess) exports no process_* / python_* metrics.
            for metric in parsed(query).metrics:
                assert not metric.startswith(("process_", "python_")), \
                    f"{query.where()}: {metric} is missing under `atrium serve --workers N`"


def _scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def _relabelled_targets() -> set[str]:
    return {rule["target_label"] for job in _scrape_jobs().values() for rule in job.get("relabel_configs", [])
            if "target_label" in rule}


def test_the_scrape_config_targets_every_api_and_worker_of_compose_on_the_default_ports() -> None:
    jobs = _scrape_jobs()
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    defaults = Settings.model_fields
    expected = {"atrium-api": ("api", defaults["port"].default),
                "atrium-worker": ("worker", defaults["worker_metrics_port"].default)}
    assert (defaults["port"].default, defaults["worker_metrics_port"].default) == (8000, 9191)
    for job_name, (service, port) in expected.items():
        job = jobs[job_name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        (discovery,) = job["dns_sd_configs"]  # every replica, not one of them through nginx
        assert discovery["names"] == [service], job_name
        assert discovery["port"] == port, f"{job_name} scrapes {discovery['port']}, the default is {port}"
        assert service in services, f"{service} is no service of {COMPOSE.name}"
    api, worker = services["api"], services["worker"]
    assert api["command"][api["command"].index("--port") + 1] == str(expected["atrium-api"][1])
    worker_env = worker["environment"]
    assert "ATRIUM_WORKER_METRICS_PORT" not in worker_env  # the default, as scraped
    assert worker_env["ATRIUM_WORKER_METRICS_HOST"] not in {"127.0.0.1", "localhost"}, \
        "the worker's /metrics must listen beyond the container's loopback"
    assert str(expected["atrium-worker"][1]) in [str(p) for p in worker["expose"]]


def test_grafana_provisioning_matches_the_compose_services() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "atrium.yml").read_text())["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DASHBOARDS / home.rsplit("/", 1)[1]).is_file()
    assert dict(v.split(":")[:2] for v in prometheus["volumes"])["./prometheus/prometheus.yml"] == \
        "/etc/prometheus/prometheus.yml"


def test_promtool_accepts_the_scrape_config_and_every_query(tmp_path: Path) -> None:
    """Prometheus's own parser, where it is installed (Debian's prometheus package has promtool)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool to check with (the tokenizer's checks above ran)")
    config = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr

    def concrete(expr: str) -> str:  # what Grafana would send: variables filled in
        return _VARIABLE.sub(lambda m: "5m" if (m.group(1) or m.group(2) or m.group(3)) in GRAFANA_BUILTINS
                             else "atrium-api", expr)

    panel_queries = [q for q in all_queries() if not q.panel.startswith("variable ")]
    rules = [{"record": f"dashboard:query_{i}", "expr": concrete(q.expr)}
             for i, q in enumerate(panel_queries)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    failing = sorted({int(i) for i in re.findall(r"dashboard:query_(\d+)", result.stdout + result.stderr)})
    assert result.returncode == 0, "\n".join([*(panel_queries[i].where() for i in failing),
                                             result.stdout + result.stderr])
