"""The transport-neutral service layer: what a request means, between a transport and the serving core.

A transport (today `grpc_api`) converts its messages to these services' dataclasses, makes one call and
converts the answer back; checks, registry and cache bookkeeping, warming and metrics live here, so a
second transport is a thin sibling of the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.server.service.inference import InferenceService
from softprompt.server.service.prompts import PromptService
from softprompt.server.service.training import TrainingService


@dataclass(frozen=True)
class Services:
    """The services a transport serves, built once per process."""

    inference: InferenceService
    prompts: PromptService
    training: TrainingService
