"""``gmpo-plot``: one PNG dashboard of the metrics that matter for RL stability, for one run or
several overlaid.

    gmpo-plot outputs/run_a outputs/run_b --out compare.png --smooth 5 --labels a b

Each argument is a run directory (its ``metrics.jsonl`` is read) or a metrics.jsonl file itself.
Panels share the step axis; a run has one colour in every panel, and within a panel the line
style tells the metrics apart (solid, dashed, dotted; the panel's own key says which is which).
A metric a run does not have (e.g. one written by an older version) is left out of its panel,
and a panel without any data says so: the dashboard works on any run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PANELS", "Run", "load_run", "plot_runs", "main"]


@dataclass(frozen=True)
class Series:
    key: str  # the metrics.jsonl column
    label: str  # how the panel's key names it
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    band: tuple[str, str] | None = None  # (low key, high key): a shaded min..max range
    yscale: str = "linear"  # "linear", "log" or "symlog"


def _pct(name: str) -> tuple[Series, ...]:
    return (Series(f"{name}_p0.1", "p0.1 / p99.9", "--"), Series(f"{name}_p99.9", "", "--"),
            Series(f"{name}_p1", "p1 / p99", ":"), Series(f"{name}_p99", "", ":"))


PANELS: dict[str, Panel] = {
    "reward": Panel("reward (mean over the step's rollouts)", (Series("reward_mean", "mean"),)),
    "length": Panel("response length (tokens)", (Series("response_len_mean", "mean"),)),
    "log_ratio": Panel("token log-ratio log(pi/pi_old): min..max band, percentiles",
                       _pct("log_ratio"), band=("log_ratio_min", "log_ratio_max"), yscale="symlog"),
    "seq_log_ratio": Panel("sequence mean log-ratio: percentiles", _pct("seq_log_ratio"),
                           yscale="symlog"),
    "tails": Panel("fraction of tokens with |log-ratio| > x",
                   (Series("log_ratio_abs_gt_0.2", "x=0.2"), Series("log_ratio_abs_gt_0.4", "x=0.4", "--"),
                    Series("log_ratio_abs_gt_1", "x=1.0", ":"))),
    "clipfrac": Panel("clip fraction (side active for sign(A))",
                      (Series("clipfrac_low", "low (A<0)"), Series("clipfrac_high", "high (A>0)", "--"))),
    "entropy": Panel("entropy (nats/token)", (Series("entropy", "mean"),)),
    "kl": Panel("KL(pi_old || pi), k3 per token", (Series("kl", "mean"),)),
    "grad_norm": Panel("grad norm over the step's optimizer steps",
                       (Series("grad_norm", "mean"), Series("grad_norm_max", "max", "--")), yscale="log"),
    "moe_load": Panel("MoE load imbalance (worst layer: max/mean tokens per expert)",
                      (Series("moe_load_imbalance", "imbalance"),)),
    "mismatch": Panel("train/rollout |log-prob| mismatch",
                      (Series("rollout_logp_abs_diff_mean", "mean"),
                       Series("rollout_logp_abs_diff_max", "max", "--")), yscale="log"),
}


@dataclass
class Run:
    label: str
    rows: list[dict] = field(default_factory=list)

    def column(self, key: str, positive: bool = False) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows where ``key`` is a finite number (``positive``: > 0, for a
        log axis). Steps without it (skipped steps, older versions) are left out, so a line
        joins the steps on either side."""
        steps, values = [], []
        for i, row in enumerate(self.rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not positive):
                steps.append(float(row.get("step", i)))
                values.append(float(value))
        return steps, values


class NotARunError(ValueError):
    """The path is neither a run directory nor a metrics.jsonl file."""


def load_run(path: str | Path, label: str | None = None) -> Run:
    """The rows of ``path``'s metrics.jsonl (a line that does not parse, such as the half-written
    last line of a killed run, is skipped with a warning)."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file() or (path.is_file() and path.suffix != ".jsonl"):
        raise NotARunError(f"{str(path)!r} is not a run directory (it has no metrics.jsonl) or a "
                           "metrics.jsonl file")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"gmpo-plot: {metrics}:{number}: not a JSON object, skipped", file=sys.stderr)
            continue
        if isinstance(row, dict):
            rows.append(row)
    default = path.name if path.is_dir() else path.stem
    return Run(label or default, rows)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over the last ``window`` values."""
    if window <= 1:
        return values
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _panel_for(key: str) -> Panel:
    return PANELS[key] if key in PANELS else Panel(key, (Series(key, key),))


def plot_runs(paths: list[str | Path], out: str | Path, *, labels: list[str] | None = None,
              smooth: int = 1, metrics: list[str] | None = None) -> dict[str, bool]:
    """Render the dashboard of ``paths`` to the PNG ``out``; returns {panel title: whether any
    run had data for it}, in panel order.

    ``metrics``: the panels to draw, by PANELS name (reward, length, log_ratio, seq_log_ratio,
    tails, clipfrac, entropy, kl, grad_norm, moe_load, mismatch) or any metrics.jsonl column
    (a panel of its own); default: every PANELS entry. ``smooth``: moving-average window in steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs; give one label per run")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    panels = [_panel_for(key) for key in (metrics or list(PANELS))]
    cols = 3 if len(panels) >= 3 else len(panels) + 1
    # the run legend takes the first free cell, or goes above the panels when they fill the grid
    legend_cell = len(panels) % cols != 0
    rows = math.ceil((len(panels) + legend_cell) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.0 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    has_data: dict[str, bool] = {}

    for ax, panel in zip(axes, panels):
        ax.set_title(panel.title, fontsize=10)
        drawn, shown = False, set()
        positive = panel.yscale == "log"
        for run, colour in zip(runs, colours):
            if panel.band is not None:
                steps_lo, low = run.column(panel.band[0])
                steps_hi, high = run.column(panel.band[1])
                if steps_lo and steps_lo == steps_hi:
                    ax.fill_between(steps_lo, _smooth(low, smooth), _smooth(high, smooth), color=colour,
                                    alpha=0.18, linewidth=0)
                    drawn = True
                    shown.add("band")
            for s in panel.series:
                # a 0 (e.g. the grad norm of a zero-advantage step) has no place on a log axis
                steps, values = run.column(s.key, positive=positive)
                if steps:
                    marker = "o" if len(steps) <= 40 else None  # a short run: every point visible
                    ax.plot(steps, _smooth(values, smooth), s.style, color=colour, linewidth=1.2,
                            marker=marker, markersize=3)
                    drawn = True
                    shown.add(s.style)
        has_data[panel.title] = drawn
        if not drawn:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
            ax.set_yticks([])
            continue
        if panel.yscale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-2)
        elif panel.yscale == "log":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        key = [Line2D([], [], color="0.3", linestyle=s.style, label=s.label)
               for s in panel.series if s.label and s.style in shown]
        if "band" in shown:
            key.append(Line2D([], [], color="0.3", alpha=0.3, linewidth=6, label="min..max"))
        if len(key) > 1:
            ax.legend(handles=key, fontsize=7, loc="best", framealpha=0.6)
    for ax in axes[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=c, linewidth=2.5, label=f"{r.label} ({len(r.rows)} steps)")
               for r, c in zip(runs, colours)]
    if legend_cell:
        axes[len(panels)].legend(handles=handles, loc="center", fontsize=10, title="runs", frameon=False)
    else:
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), fontsize=10,
                   frameon=False)
    for ax in axes[max(0, len(panels) - cols):len(panels)]:
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)
    if smooth > 1:
        fig.supxlabel(f"lines: moving average over {smooth} steps", fontsize=9, color="0.4")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out))
    return has_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gmpo-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/dashboard.png for one "
                                                    "run, dashboard.png here for several)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help=f"panels to draw: {', '.join(PANELS)} or any metrics.jsonl column")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1: none)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = parser.parse_args(argv)
    if args.out is None:
        first = Path(args.runs[0])
        args.out = first / "dashboard.png" if len(args.runs) == 1 and first.is_dir() else "dashboard.png"
    if args.smooth < 1:
        print(f"gmpo-plot: --smooth {args.smooth}; it must be >= 1", file=sys.stderr)
        return 2
    try:
        panels = plot_runs(args.runs, args.out, labels=args.labels, smooth=args.smooth, metrics=args.metrics)
    except (NotARunError, ValueError) as error:
        print(f"gmpo-plot: {error}", file=sys.stderr)
        return 2
    empty = sum(not drawn for drawn in panels.values())
    print(f"gmpo-plot: wrote {args.out} ({len(panels)} panels, {empty} without data; {len(args.runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
