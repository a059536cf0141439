"""The report's pictures, drawn from the numbers it already reads (matplotlib, no display):

- val_loss.png: validation loss against training seconds, both methods;
- test_ppl.png: each model's test perplexity with its 95% interval (none drawn where there is none);
- tradeoff.png: learning against forgetting, test perplexity against the first general set's;
- tasks.png: each benchmark score against test perplexity, one point per model, with both intervals;
- updates.png: what each method changed (stage updates), per matrix against depth.

PNG files of a few tens of kB, written atomically; the report links them beside its tables, which
say the same in numbers.
"""

from __future__ import annotations

import io
from pathlib import Path

from ftstudy.outputs import write_bytes

COLORS = {"pretrained": "#7f7f7f", "full": "#1f77b4", "lora": "#d62728"}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: the same numbers, the same bytes
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def val_loss(curves: dict, labels: dict, path: Path) -> None:
    plt, fig, ax = _figure()
    for m, points in curves.items():
        ax.plot([p["seconds"] for p in points], [p["loss"] for p in points], marker="o", markersize=3,
                color=COLORS[m], label=labels[m])
    ax.set_xlabel("training seconds (validation time left out)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss against training time")
    ax.legend()
    _save(plt, fig, path)


def test_ppl(ev: dict, labels: dict, path: Path) -> str:
    """Each model's test perplexity with its 95% interval; a hollow point and no bar where the split
    had too few units for one (a zero-width bar would claim a certainty there is none of). Returns
    the title."""
    plt, fig, ax = _figure()
    for i, (m, e) in enumerate(ev.items()):
        if "test_ppl_lo" in e:
            ax.errorbar([i], [e["test_ppl"]], yerr=[[e["test_ppl"] - e["test_ppl_lo"]], [e["test_ppl_hi"] - e["test_ppl"]]],
                        fmt="o", capsize=6, color=COLORS[m])
        else:
            ax.plot([i], [e["test_ppl"]], "o", markerfacecolor="none", color=COLORS[m])
    ax.set_xticks(range(len(ev)), [labels[m] for m in ev], fontsize=8)
    ax.set_ylabel("test perplexity (lower is better)")
    title = ("Test perplexity with its 95% interval" if all("test_ppl_lo" in e for e in ev.values())
             else "Test perplexity (no interval: too few test units)")
    ax.set_title(title)
    _save(plt, fig, path)
    return title


def tradeoff(ev: dict, general: str, labels: dict, path: Path) -> None:
    plt, fig, ax = _figure()
    base = ev["pretrained"]
    for m, e in ev.items():
        x, y = e["general"][general]["ppl"], e["test_ppl"]
        ax.scatter([x], [y], color=COLORS[m], s=40, zorder=3, label=labels[m])
        if m != "pretrained":
            ax.annotate("", xy=(x, y), xytext=(base["general"][general]["ppl"], base["test_ppl"]),
                        arrowprops={"arrowstyle": "->", "color": COLORS[m], "alpha": 0.6})
    ax.set_xlabel(f"{general} perplexity (forgetting: further right)")
    ax.set_ylabel("test perplexity (learning: further down)")
    ax.set_title("Learning against forgetting")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def draw(ev: dict, curves: dict, labels: dict, folder: Path, tasks: dict | None = None,
         updates: dict | None = None) -> list[tuple[str, str]]:
    """Every picture into `folder`: (alt text, file name) for each, in the report's order."""
    folder = Path(folder)
    val_loss(curves, labels, folder / "val_loss.png")
    out = [("Validation loss against training seconds", "val_loss.png"),
           (test_ppl(ev, labels, folder / "test_ppl.png"), "test_ppl.png")]
    general = list(ev["pretrained"].get("general", {}))
    if general:
        tradeoff(ev, general[0], labels, folder / "tradeoff.png")
        out.append((f"Learning against forgetting ({general[0]})", "tradeoff.png"))
    if tasks and tasks["pretrained"]:
        tasks_vs_ppl(ev, tasks, labels, folder / "tasks.png")
        out.append(("Task scores against test perplexity", "tasks.png"))
    if updates and (alt := updates_by_depth(updates, labels, folder / "updates.png")):
        out.append((alt, "updates.png"))
    return out


def tasks_vs_ppl(ev: dict, tasks: dict, labels: dict, path: Path) -> None:
    """One panel per task metric: the score (y) against test perplexity (x), a point per model,
    each with its 95% intervals as bars where it has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftstudy.report.task_report import metrics_of

    panels = [(task, metric) for task, row in tasks["pretrained"].items() for metric in metrics_of(row)]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (task, metric) in zip(axes.flat, panels):
        ax.grid(alpha=0.3)
        for m, e in ev.items():
            row, x = tasks[m][task], e["test_ppl"]
            xerr = [[x - e["test_ppl_lo"]], [e["test_ppl_hi"] - x]] if "test_ppl_lo" in e else None
            y = row[metric]
            yerr = [[y - row[metric + "_lo"]], [row[metric + "_hi"] - y]] if metric + "_lo" in row else None
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=COLORS[m], capsize=3, label=labels[m])
        ax.set_xlabel("test perplexity")
        ax.set_ylabel(metric)
        ax.set_title(task, fontsize=9)
    axes.flat[0].legend(fontsize=7)
    _save(plt, fig, path)


def updates_by_depth(updates: dict, labels: dict, path: Path) -> str | None:
    """Stage updates' numbers per matrix against depth: full fine-tuning's effective rank (LoRA's r
    as a line), and each method's intruder count. Returns the alt text, or None when there is
    nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    info = updates["info"]
    layers = [row for row in info["layers"] if row["depth"] is not None]
    if not layers:
        return None
    fig, (ax, right) = plt.subplots(1, 2, figsize=(7.2, 3.4), dpi=100)
    ax.grid(alpha=0.3)
    marker = {"attention": "o", "mlp": "s", "other": "^"}
    for kind in sorted({row["type"] for row in layers}):
        rows = [row for row in layers if row["type"] == kind]
        x = [row["depth"] for row in rows]
        ax.scatter(x, [row["full"]["effective_rank"] for row in rows], marker=marker[kind], color=COLORS["full"],
                   label=f"{labels['full']}: {kind}", s=22)
        for offset, method in ((-0.1, "full"), (0.1, "lora")):
            right.scatter([d + offset for d in x], [row[method]["intruders"] for row in rows], marker=marker[kind],
                          color=COLORS[method], s=22, label=f"{labels[method]}: {kind}")
    ax.axhline(info["lora_r"], color=COLORS["lora"], linestyle="--", label=f"LoRA's r ({info['lora_r']})")
    ax.set_xlabel("block (depth)")
    ax.set_ylabel(f"effective rank ({info['energy']:.0%} of ‖ΔW‖²)")
    ax.set_title("Full fine-tuning's update rank", fontsize=9)
    ax.legend(fontsize=6)
    right.grid(alpha=0.3)
    for panel in (ax, right):
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("block (depth)")
    right.set_ylabel(f"intruders among the top {info['top_k']}")
    right.set_title("Intruder dimensions per matrix", fontsize=9)
    right.legend(fontsize=6)
    _save(plt, fig, path)
    return "Effective rank of full fine-tuning's update and intruder dimensions, per matrix against depth"
