"""The `model` of an OpenAI request: the base model's id, or a registered task, version or alias.

`/v1/models` lists the base model and, for every task, its name (the newest version that is no candidate),
each version (`sentiment@3`) and each alias (`sentiment@prod`), as vLLM lists LoRA adapters: `parent` is the
base model's id. Each version's ids come together, its exact ref last. With `limit`, the list comes in pages
as OpenAI's paginated lists do (`limit`, `after`, `has_more`, `first_id`, `last_id`): a page holds at most
`limit` ids, whole versions only, and the next starts `after` the last one's `last_id`; without, every id
comes at once (what OpenAI's own clients expect of `/v1/models`). Either way the body is built as plain JSON
over the registry's pages, so listing 100,000 tasks costs what the versions do, not a response model each.

A `model` that names nothing is 404 with the closest ids in the message (from the ids near it, never a
listing of every task). A request's `model` is resolved once (`resolve`) to the exact version
("sentiment@3"), and that is what the request runs: a version registered or an alias moved while it is
admitted does not change it midway.
"""

from __future__ import annotations

import difflib
from datetime import datetime
from typing import Any

from softprompt.prompts.errors import InvalidNameError, PromptNotFoundError
from softprompt.server.http_api.auth import Caller
from softprompt.server.http_api.errors import ApiError
from softprompt.server.http_api.responses import Model
from softprompt.server.service.api import Services
from softprompt.server.service.types import PromptVersion

OWNER = "softprompt"
MAX_LIMIT = 1000  # ids a page may hold at most (the registry's largest page of versions)


def _created(version: PromptVersion) -> int:
    try:
        return int(datetime.fromisoformat(version.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _ids(version: PromptVersion, named: bool) -> list[str]:
    """A version's model ids: its task's name if the name means it (`named`), its aliases, its ref (last: a
    page's `last_id` is always an exact version, where the next page starts)."""
    return [*([version.name] if named else []), *(f"{version.name}@{a}" for a in version.aliases), version.ref]


def _object(model_id: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    """One model object, as `responses.Model` documents it."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER, "root": root, "parent": parent}


def list_models(services: Services, caller: Caller, started: int, *, limit: int | None = None,
                after: str | None = None) -> dict[str, Any]:
    """The `/v1/models` body: the models the caller may use, the base model first; with `limit`, one page of
    at most that many ids after the id `after` (the base model's id, or a previous page's `last_id`)."""
    if limit is not None and not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit must be 1 to {MAX_LIMIT}, got {limit}", param="limit")
    base = services.inference.model_id
    data: list[dict[str, Any]] = []
    if not after and caller.may_use(""):
        data.append(_object(base, started, base, None))
    cursor = "" if after in (None, "", base) else after
    named = _named_before(services, cursor)
    token, more = "", True
    while more:
        try:
            page, token = services.prompts.list_page(None, MAX_LIMIT if limit is None else limit, token,
                                                     after="" if token else cursor)
        except InvalidNameError:
            raise ApiError(400, f"after must be a model id a page ended with (its last_id, 'name@3'), or the base "
                                f"model's id; got {after!r}", param="after") from None
        more = bool(token)
        for v in page:
            # Versions come newest first: the first that is no candidate is what the task's name means.
            ids = _ids(v, v.name not in named and not v.candidate)
            if not v.candidate:
                named.add(v.name)
            if not caller.may_use(v.name):
                continue
            if limit is not None and data and len(data) + len(ids) > limit:
                return _page(data, has_more=True)
            created = _created(v)
            data += [_object(i, created, v.ref, base) for i in ids]
    return _page(data, has_more=False) if limit is not None else {"object": "list", "data": data}


def _page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last}


def _named_before(services: Services, cursor: str) -> set[str]:
    """The task whose name an earlier page already listed, when a page starts inside a task ("name@3"): the
    name goes with the version it means, which an earlier page held if it is newer than the cursor."""
    name, _, number = cursor.partition("@")
    if not number.isdigit():
        return set()
    try:
        return {name} if services.prompts.get(name).version >= int(number) else set()
    except (PromptNotFoundError, InvalidNameError):
        return set()


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
    base = services.inference.model_id
    if model == base:
        caller.check("", model)
        return Model(**_object(base, started, base, None))
    caller.check(model, model)
    try:
        version = services.prompts.get(model)
    except (PromptNotFoundError, InvalidNameError):
        raise _not_found(services, caller, model) from None
    # The name means its served version; "name@03" resolves but is no id.
    if model in _ids(version, named=model == version.name):
        return Model(**_object(model, _created(version), version.ref, base))
    raise _not_found(services, caller, model)


def _not_found(services: Services, caller: Caller, model: str) -> ApiError:
    known = [r for r in services.prompts.nearby(model) if caller.may_use(r.partition("@")[0])]
    close = difflib.get_close_matches(model, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; GET /v1/models lists them"
    return ApiError(404, f"model {model!r} does not exist{hint}", param="model", code="model_not_found")
