"""What a training run reports, torch-free: held-out metrics (`EvalResult`), progress snapshots (`Progress`)
and the loss curve's points (`CurvePoint`).

The trainer (`train.py`, torch) produces them; the server's jobs hold them and the transports read them,
which is why they live apart from the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one prompt."""

    examples: int
    loss: float
    exact_match: float
    accuracy: float | None = None

    def metrics(self) -> dict[str, float]:
        """The metrics as a flat name -> value map (what the registry records)."""
        out = {"eval_loss": self.loss, "exact_match": self.exact_match}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out

    def describe(self) -> str:
        """One line for logs and the CLI."""
        acc = "" if self.accuracy is None else f"accuracy {self.accuracy:.3f}, "
        return f"{acc}exact match {self.exact_match:.3f}, held-out loss {self.loss:.4f} ({self.examples} examples)"

    def key(self) -> tuple[float, float]:
        """Orders results: accuracy (classification) or exact match first, then lower loss."""
        return (self.accuracy if self.accuracy is not None else self.exact_match, -self.loss)


@dataclass(frozen=True)
class Progress:
    """A snapshot of a run, sent to the progress callback after every step and phase change."""

    phase: str
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None
    eval_loss: float | None
    best_eval_loss: float | None
    steps_per_second: float
    elapsed_seconds: float


@dataclass(frozen=True)
class CurvePoint:
    """One point of the loss curves (eval_loss only where the held-out set was evaluated)."""

    step: int
    train_loss: float | None  # None at step 0, before training
    eval_loss: float | None = None
