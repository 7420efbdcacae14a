"""The `model` of an OpenAI request: the base model's id, or a registered task, version or alias.

`/v1/models` lists the base model and, for every task, its name (the newest version), each version
(`sentiment@3`) and each alias (`sentiment@prod`), as vLLM lists LoRA adapters: `parent` is the base
model's id. A `model` that names nothing is 404 with the closest ids in the message.

A request's `model` is resolved once (`resolve`) to the exact version ("sentiment@3"), and that is what the
request runs: a version registered or an alias moved while it is admitted does not change it midway.
"""

from __future__ import annotations

import difflib
from datetime import datetime

from softprompt.prompts.errors import InvalidNameError, PromptNotFoundError
from softprompt.server.http_api.auth import Caller
from softprompt.server.http_api.errors import ApiError
from softprompt.server.http_api.responses import Model
from softprompt.server.service.api import Services
from softprompt.server.service.types import PromptVersion

OWNER = "softprompt"


def _created(version: PromptVersion) -> int:
    try:
        return int(datetime.fromisoformat(version.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _versions(services: Services) -> list[PromptVersion]:
    """Every stored version: tasks by name, each newest first."""
    out: list[PromptVersion] = []
    token = ""
    while True:
        page, token = services.prompts.list_page(None, 0, token)
        out += page
        if not token:
            return out


def model_objects(services: Services, caller: Caller, started: int) -> list[Model]:
    """The models the caller may use: the base model first, then each task's ids."""
    base = services.inference.model_id
    objects = [Model(id=base, created=started, owned_by=OWNER, root=base, parent=None)] if caller.may_use("") else []
    newest: set[str] = set()
    for v in _versions(services):
        if not caller.may_use(v.name):
            continue
        ids = [] if v.name in newest else [v.name]
        newest.add(v.name)
        ids += [v.ref, *(f"{v.name}@{a}" for a in v.aliases)]
        objects += [Model(id=i, created=_created(v), owned_by=OWNER, root=v.ref, parent=base) for i in ids]
    return objects


def resolve(services: Services, caller: Caller, model: str) -> str:
    """The exact prompt version a request's `model` names now ("name@3"; "" for the base model), which the
    request then runs; 404 when nothing matches, 403 when the caller may not use it."""
    if model == services.inference.model_id:
        caller.check("", model)
        return ""
    caller.check(model, model)
    try:
        return services.prompts.get(model).ref
    except (PromptNotFoundError, InvalidNameError):
        raise _not_found(services, caller, model) from None


def model_object(services: Services, caller: Caller, model: str, started: int) -> Model:
    """The model object of `model`; 404 or 403 as a request naming it would get."""
    resolve(services, caller, model)
    for m in model_objects(services, caller, started):
        if m.id == model:
            return m
    raise _not_found(services, caller, model)  # a reference that resolves but is not an id ("name@03")


def _not_found(services: Services, caller: Caller, model: str) -> ApiError:
    known = [m.id for m in model_objects(services, caller, 0)]
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; GET /v1/models lists them"
    return ApiError(404, f"model {model!r} does not exist{hint}", param="model", code="model_not_found")
