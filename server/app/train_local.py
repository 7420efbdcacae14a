"""`softprompt train --store DIR`: train in this process on a locally loaded base model.

The CLI parses the flags (torch-free); this module loads the model, shows progress (a bar on a
terminal, log lines otherwise), handles Ctrl-C (first: stop and keep the best prompt so far;
second: abort without registering) and writes the run's report and loss plot to its output folder.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from softprompt.prompts import pipeline
from softprompt.prompts.data import load_jsonl
from softprompt.prompts.errors import PromptError
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.registry import Registry, open_store
from softprompt.prompts.results import Progress
from softprompt.prompts.train import PromptTrainer

log = logging.getLogger("softprompt.train")



class _ProgressView:
    """A tqdm bar on a terminal; otherwise one log line the first time each phase starts (a few summary lines in
    all: a redirected run's log is read afterwards, not watched step by step)."""

    def __init__(self, *, interactive: bool) -> None:
        self.interactive = interactive
        self.bar: Any = None
        self.seen: set[str] = set()

    def update(self, p: Progress) -> None:
        if self.interactive:
            self._update_bar(p)
            return
        if p.phase in self.seen:
            return
        self.seen.add(p.phase)
        log.info("%s: step %d/%d, train loss %s, held-out loss %s", p.phase, p.step, p.total_steps,
                 _num(p.train_loss), _num(p.eval_loss))

    def _update_bar(self, p: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total_steps, unit="step", dynamic_ncols=True)
        self.bar.set_description(p.phase, refresh=False)
        self.bar.set_postfix_str(f"loss {_num(p.train_loss)}, held-out {_num(p.eval_loss)}", refresh=False)
        self.bar.update(p.step - self.bar.n)  # update(), not n=, so tqdm measures steps/s
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_local_training(
    *,
    task: str,
    train_path: Path,
    eval_path: Path | None,
    options: TrainingOptions,
    store: str | Path,
    description: str = "",
    tags: dict[str, str] | None = None,
    promote_alias: str = "",
    output_dir: Path | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    json_output: bool = False,
    s3_endpoint_url: str | None = None,
) -> int:
    """Trains a prompt on the local base model and registers it in `store`; returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train = load_jsonl(train_path)
        held_out = load_jsonl(eval_path) if eval_path is not None else None
        registry = Registry(store=open_store(str(store), endpoint_url=s3_endpoint_url))
    except (PromptError, ValueError) as e:  # bad data, or a store URL that is unsupported or unreachable
        print(f"error: {e}", file=sys.stderr)
        return 1
    from softprompt.server.app.loading import load_base_model  # torch and transformers: only after the data is good

    base = load_base_model(model, device=device, dtype=dtype)
    stop = threading.Event()
    view = _ProgressView(interactive=sys.stderr.isatty() and not json_output)
    previous = signal.signal(signal.SIGINT, _stop_then_abort(stop))
    started = time.monotonic()
    try:
        plan = pipeline.plan(registry, base.spec, task, train, held_out, options, description=description,
                             tags=tags, promote_alias=promote_alias)
        log.info("training %s on %s: %d examples, %d held out; %s", task, base.spec.model_id, len(plan.train),
                 len(plan.held_out), options)
        trainer = PromptTrainer(base.model, base.tokenizer, options, on_progress=view.update, stop=stop,
                                kv_layout=base.spec.kv_layout)
        outcome = pipeline.execute(plan, trainer, registry, base.spec, on_phase=lambda phase: log.info("%s", phase))
    except PromptError as e:
        view.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        view.close()
        print("aborted: nothing was registered", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    view.close()

    result, version = outcome.result, outcome.version
    out = output_dir or Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in registry.attachments(version).items():
        (out / name).write_bytes(data)
    summary = {
        "version": version.ref,
        "version_dir": registry.store.location(version.name, version.version),
        "output_dir": str(out),
        "steps": result.steps,
        "best_step": result.best_step,
        "stop_reason": result.stop_reason,
        "seconds": round(time.monotonic() - started, 1),
        "before": None if result.before is None else asdict(result.before),
        "after": None if result.after is None else asdict(result.after),
        "promoted": bool(outcome.promotion and outcome.promotion.promoted),
        "promotion": "" if outcome.promotion is None else outcome.promotion.message,
    }
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(f"registered {version.ref} after {result.steps} steps ({result.stop_reason}; kept step "
              f"{result.best_step}) in {summary['seconds']} s")
        for label, r in (("before", result.before), ("after", result.after)):
            if r is not None:
                print(f"  {label:6}  {r.describe()}")
        if outcome.promotion is not None:
            print(f"  {outcome.promotion.message}")
        print(f"  report and loss plot: {out}")
    return 0


def _stop_then_abort(stop: threading.Event) -> Any:
    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step; the best prompt so far will be evaluated and registered "
              "(Ctrl-C again to abort without registering)", file=sys.stderr)
    return handler


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
