"""`collector check --estimate`: a config's reading rates turned into Firehose bills per day.

Rates come from the config alone (no I/O): a scheduled source yields its metrics (times
devices) every `every`; a `window` turns any rate into one row per series per window. Sources
whose rate the config cannot tell (streams, device maps) are assumed to give one reading per
second and are named as assumptions in the output.
"""

from __future__ import annotations

from typing import Any

import click

from collector.config import LoadedConfig


def _source_rate(comp: Any) -> tuple[float, int, str | None]:
    """(readings per second, series count, assumption or None) of one source."""
    cfg = comp.config
    metrics = getattr(cfg, "metrics", None)
    registers = getattr(cfg, "slaves", None)
    if metrics:
        series = len(metrics) * int(getattr(cfg, "devices", 1) or 1)
    elif registers:
        series = sum(len(getattr(s, "registers", []) or []) for s in registers) or 1
    else:
        series = 1
    every = getattr(cfg, "every", None)
    if every:
        note = None if (metrics or registers) else f"{comp.name}: assumed 1 reading per tick"
        return series / every, series, note
    return float(series), series, f"{comp.name}: rate unknown, assumed {series} reading(s)/s"


def rates(cfg: LoadedConfig) -> tuple[float, list[str]]:
    """Rows per second reaching the sinks, and the assumptions made."""
    notes: list[str] = []
    rate, series = 0.0, 0
    for comp in cfg.sources:
        r, s, note = _source_rate(comp)
        rate += r
        series += s
        if note:
            notes.append(note)
    for comp in cfg.transforms:
        if comp.config.type == "window":
            rate = min(rate, series / comp.config.every)
        elif comp.config.type in ("filter", "deadband"):
            notes.append(f"{comp.name}: assumed to pass every row (upper bound)")
    return rate, notes


def print_estimate(cfg: LoadedConfig) -> None:
    from collector.commands.economics import estimate_sink, format_estimate

    rate, notes = rates(cfg)
    firehoses = [c for c in cfg.sinks if c.config.type == "firehose"]
    mqtts = [c for c in cfg.sinks if c.config.type == "mqtt"]
    click.echo(f"\nrows reaching the sinks: {rate:,.3f}/s = {rate * 86400:,.0f}/day")
    for note in notes:
        click.echo(f"  assumption: {note}")
    if mqtts:
        from collector.commands.economics import estimate_mqtt_sink, format_mqtt_estimate

        for comp in mqtts:
            click.echo(format_mqtt_estimate(
                estimate_mqtt_sink(comp.config, rate, device=cfg.settings.device),
                name=comp.name))
    if not firehoses:
        if not mqtts:
            click.echo("no firehose sink in this config: nothing billed per record")
        return
    for comp in firehoses:
        click.echo(format_estimate(estimate_sink(comp.config, rate, device=cfg.settings.device),
                                   name=comp.name))
