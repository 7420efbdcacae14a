"""Renders a run's loss curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from softprompt.prompts.results import CurvePoint


def loss_plot_png(curve: Sequence[CurvePoint], *, title: str, best_step: int | None = None) -> bytes:
    """Training loss at every step and held-out loss where evaluated, with the kept step marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on servers and in CI
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    trained = [p for p in curve if p.train_loss is not None]
    ax.plot([p.step for p in trained], [p.train_loss for p in trained], label="train (running mean)", linewidth=1.2)
    held = [p for p in curve if p.eval_loss is not None]
    if held:
        ax.plot([p.step for p in held], [p.eval_loss for p in held], marker="o", markersize=3, label="held-out")
    if best_step:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"kept (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_yscale("log")  # the first steps fall by orders of magnitude; later gains would be invisible
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
