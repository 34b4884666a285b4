"""The report's interactive charts, built with plotly (hover values, zoom): training curves
from metrics.csv and the TIDE breakdown."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from onestage.engine.plots import metric_series
from onestage.eval.tide import ERROR_DESCRIPTIONS, MAIN_ERRORS, SPECIAL_ERRORS

LAYOUT = dict(margin=dict(l=60, r=20, t=40, b=50), height=360, template="plotly_white",
              legend=dict(orientation="h", y=-0.2))


def _lines(rows: list[dict[str, str]], kind: str, keys: list[str], title: str, ytitle: str,
           log: bool = False) -> go.Figure | None:
    fig = go.Figure()
    for key in keys:
        xs, ys = metric_series(rows, kind, key)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=key, mode="lines+markers" if kind == "epoch" or len(xs) < 30
                                     else "lines"))
    if not fig.data:
        return None
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title=ytitle, **LAYOUT)
    if log:
        fig.update_yaxes(type="log")
    return fig


def training_figures(rows: list[dict[str, str]]) -> list[go.Figure]:
    """Loss terms, learning rate, validation metrics, throughput: the ones the log has data for."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    losses = [c for c in columns if c.startswith("loss_")]
    figs = [
        _lines(rows, "step", losses, "Loss terms (per logged step)", "loss"),
        _lines(rows, "step", ["lr"], "Learning rate", "lr"),
        _lines(rows, "epoch", [c for c in columns if c.startswith(("voc_", "coco_"))], "Validation metrics", "value"),
        _lines(rows, "step", ["grad_norm"], "Gradient norm (before clipping)", "norm", log=True),
        _lines(rows, "step", ["images_per_s"], "Throughput", "images/s"),
    ]
    return [f for f in figs if f is not None]


def tide_bar(tide: dict[str, Any]) -> go.Figure:
    """dAP per main error type and per special error, in AP points (x 100, as the paper)."""
    names = list(MAIN_ERRORS) + list(SPECIAL_ERRORS)
    values = [100 * tide["main"][n] for n in MAIN_ERRORS] + [100 * tide["special"][n] for n in SPECIAL_ERRORS]
    counts = [f"{tide['counts'][n]} errors" for n in MAIN_ERRORS] + ["special"] * len(SPECIAL_ERRORS)
    fig = go.Figure(go.Bar(
        x=names, y=values, marker_color=["#4c72b0"] * len(MAIN_ERRORS) + ["#dd8452"] * len(SPECIAL_ERRORS),
        customdata=[[c, ERROR_DESCRIPTIONS[n]] for c, n in zip(counts, names)],
        hovertemplate="%{x}: dAP %{y:.2f}<br>%{customdata[0]}<br>%{customdata[1]}<extra></extra>",
    ))
    fig.update_layout(title=f"TIDE dAP (AP@{tide['pos_threshold']:g} = {100 * tide['ap']:.2f})",
                      yaxis_title="dAP (AP points)", **LAYOUT)
    return fig


def tide_heatmap(tide: dict[str, Any]) -> go.Figure:
    """Per class (rows) and error type (columns): dAP in AP points."""
    rows = [r for r in tide["per_class"] if r["num_gt"] > 0]
    names = list(MAIN_ERRORS) + list(SPECIAL_ERRORS)
    z = [[100 * r["main"][n] for n in MAIN_ERRORS] + [100 * r["special"][n] for n in SPECIAL_ERRORS] for r in rows]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=[r["name"] for r in rows], colorscale="Blues",
                               hovertemplate="%{y} / %{x}: dAP %{z:.2f}<extra></extra>",
                               texttemplate="%{z:.1f}"))
    layout = dict(LAYOUT, height=max(260, 60 + 28 * len(rows)))
    fig.update_layout(title="TIDE per class (dAP, AP points)", **layout)
    fig.update_yaxes(autorange="reversed")
    return fig
