"""Usage charts drawn on the server as SVG, with pygal, fit for a strict Content-Security-Policy.

pygal puts a ``<style>`` and a ``<script>`` (its JS tooltips' config) inside every
chart, and an inline ``style`` on the tooltip overlay: all three are refused by a
CSP without ``'unsafe-inline'``. So charts are rendered with unprefixed CSS
(``no_prefix``: the same for every chart), which is served once as a stylesheet
(``chart_css``), and the script and the tooltip overlay are taken out. Each bar
gets an SVG ``<title>`` instead, which browsers show on hover without any script.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

import pygal
from markupsafe import Markup
from pygal.etree import etree
from pygal.style import Style

from keys.model import UsageBucket

SERIES = (("accepted", "accepted"), ("refused_limit", "refused: rate limit"),
          ("refused_scope", "refused: scope"))
_STYLE = Style(
    background="transparent", plot_background="#ffffff", foreground="#1f2d3d",
    foreground_strong="#111111", foreground_subtle="#5b6b7b", opacity="0.9", opacity_hover="1",
    colors=("#1f77b4", "#d62728", "#ff7f0e"), font_family="system-ui, sans-serif",
    label_font_size=12, major_label_font_size=12, legend_font_size=13, title_font_size=15,
)


def _config(**extra: Any) -> dict[str, Any]:
    return {"style": _STYLE, "js": [], "no_prefix": True, "disable_xml_declaration": True,
            "width": 860, "height": 320, "legend_at_bottom": True, "legend_at_bottom_columns": 3,
            "show_minor_x_labels": False, "truncate_label": -1, "print_zeroes": False, **extra}


def _local(tag: Any) -> str:
    return str(tag).rsplit("}", 1)[-1]


def bucket_label(start: float, interval: str) -> str:
    when = datetime.fromtimestamp(start, timezone.utc)
    return when.strftime("%Y-%m-%d %H:00") if interval == "hour" else when.strftime("%Y-%m-%d")


def usage_chart(buckets: Sequence[UsageBucket], interval: str, title: str) -> Markup:
    """A stacked bar per bucket (accepted, refused by limit, refused by scope) as inline SVG."""
    labels = [bucket_label(b.start, interval)[5:] for b in buckets]  # the year would crowd the axis
    chart = pygal.StackedBar(**_config(title=title, x_labels_major_every=max(1, len(buckets) // 8),
                                       y_title="requests", x_title=f"{interval} starting (UTC)"))
    chart.x_labels = labels
    tallest = max((b.accepted + b.refused_limit + b.refused_scope for b in buckets), default=0)
    if tallest <= 10:  # whole requests: no 0.2-request grid lines on a quiet key
        chart.y_labels = list(range(0, max(tallest, 1) + 1))
    for field, name in SERIES:
        chart.add(name, [getattr(b, field) for b in buckets])
    root = chart.render_tree()
    _strip(root)
    _title_bars(root, labels)
    root.attrib.pop("id", None)
    root.set("role", "img")
    root.set("aria-label", f"{title}: the table beside it has the same numbers")
    return Markup(etree.tostring(root, encoding="unicode"))


def _strip(root: Any) -> None:
    """Take out what a strict CSP would refuse: ``<style>``, ``<script>``, the JS tooltip overlay."""
    for parent in list(root.iter()):
        for child in list(parent):
            name = _local(child.tag)
            if name in ("style", "script") or (name == "g" and "tooltip-overlay" in child.get("class", "")):
                parent.remove(child)


def _title_bars(root: Any, labels: Sequence[str]) -> None:
    """An SVG ``<title>`` per bar ("05-01 13:00 · accepted: 12"): a tooltip without script."""
    for series in root.iter():
        cls = series.get("class", "")
        if _local(series.tag) != "g" or not cls.startswith("series serie-"):
            continue
        name = SERIES[int(cls.split("serie-")[1].split()[0])][1]
        for bar in series.iter():
            if _local(bar.tag) == "g" and bar.get("class") == "bar":
                value = next((d.text for d in bar if _local(d.tag) == "desc" and d.get("class") == "value"), "0")
                label = next((d.text for d in bar if _local(d.tag) == "desc" and d.get("class") == "x_label"), "")
                title = etree.SubElement(bar, "title")
                title.text = f"{label} · {name}: {value}"


@lru_cache(maxsize=1)
def chart_css() -> str:
    """The stylesheet every chart shares (pygal's own CSS for ``_STYLE``, unprefixed)."""
    chart = pygal.StackedBar(**_config())
    for _field, name in SERIES:  # pygal writes a colour rule per series it draws
        chart.add(name, [1])
    root = chart.render_tree()
    styles = [el.text or "" for el in root.iter() if _local(el.tag) == "style"]
    return "\n".join(styles)
