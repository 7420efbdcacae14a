"""Prompt versions as a transport sees them: register an upload, warm it, get, list, alias and delete.

Uploads arrive as `types.PromptUpload` (no protobuf). Registering checks the upload against the base
model and the server's limits, stores it, keeps its matrix in the host tier and on the device, and
computes its prefix on the worker unless another registration's is being computed (so a burst of
registrations never queues a forward per registration: those versions' first requests compute their
prefixes in their own forwards); deleting also drops the version from every tier.
"""

from __future__ import annotations

import logging
import threading

from softprompt.prompts.errors import InvalidNameError
from softprompt.prompts.format.tensor import check_base_model
from softprompt.prompts.format.uploads import parse_peft_adapter, parse_raw_tensor
from softprompt.prompts.refs import PromptRef
from softprompt.prompts.registry import PromptVersion, Registry
from softprompt.server.core import omp
from softprompt.server.core.admission import Admission
from softprompt.server.core.engine import Engine
from softprompt.server.core.prefix_warmer import PrefixWarmer
from softprompt.server.core.prompt_cache import PromptCache
from softprompt.server.core.scheduler import Scheduler
from softprompt.server.observability.logs import RequestIdFilter
from softprompt.server.service.metadata import check_description
from softprompt.server.service.types import PeftUpload, PromptFiles, PromptUpload

log = logging.getLogger(__name__)
log.addFilter(RequestIdFilter())

# Registration waits this long for the worker to prepare the new version; a busier worker does it later.
_WARM_TIMEOUT_S = 5.0


class PromptService:
    """Registers, warms, inspects, lists, aliases and deletes prompt versions."""

    def __init__(self, registry: Registry, admission: Admission, engine: Engine, prompts: PromptCache,
                 scheduler: Scheduler, *, max_virtual_tokens: int, warmer: PrefixWarmer | None = None) -> None:
        self.registry = registry
        self.admission = admission
        self.engine = engine
        self.prompts = prompts
        self.scheduler = scheduler
        self.base = engine.base.spec
        self.max_virtual_tokens = max_virtual_tokens
        self._warming = threading.Lock()  # held while one registration's prefix is computed on the worker
        self.warmer = warmer  # warms, when the worker is next idle, the versions registered while it was busy

    def register(self, upload: PromptUpload) -> PromptVersion:
        """Checks an upload, stores it as the task's next version and warms it; raises what the caller must fix."""
        ref = PromptRef.parse(upload.name)
        if ref.version is not None or ref.alias is not None:
            raise InvalidNameError(f"register under a bare task name, not {upload.name!r}; versions are numbered by the server")
        check_description(upload.description, upload.tags)
        source = upload.source
        if isinstance(source, PeftUpload):
            prompt = parse_peft_adapter(source.config_json, source.safetensors, self.base,
                                        max_virtual_tokens=self.max_virtual_tokens, force=upload.force,
                                        task_id=source.task_id)
        else:
            prompt = parse_raw_tensor(list(source.shape), source.dtype, source.data, self.base,
                                      max_virtual_tokens=self.max_virtual_tokens)
        check_base_model(upload.base_model_fingerprint, self.base, force=upload.force)
        version = self.registry.register(ref.name, prompt, self.base, description=upload.description,
                                         tags=dict(upload.tags))
        log.info("registered %s (%s, %d virtual tokens, sha256 %s)", version.ref, version.method,
                 version.num_virtual_tokens, version.sha256[:12])
        # The matrix just stored is in hand: the host tier keeps it without reading the store again.
        self.prompts.keep((version.name, version.version, version.sha256), prompt.embeddings)
        self.warm(version)
        omp.release_pool()  # a transport's thread: its tensor checks must not slow the worker (core/omp.py)
        return version

    def warm(self, version: PromptVersion) -> None:
        """Loads a new version onto the device and computes its prefix keys and values on the worker, waiting
        up to a few seconds, so the next request for it costs what a request for any cached version costs.

        The prefix is computed only while no other registration's is: registrations faster than the worker
        computes prefixes skip it rather than queue a forward each (their first requests compute their own
        prefixes in their own forwards), so registering costs the same however many arrive together.
        Never raises: the version is stored either way, and its first request does this work itself.
        """
        try:
            prompt, _, key = self.admission.resolve(version.ref)
            assert prompt is not None and key is not None
            if not self._warming.acquire(blocking=False):
                if self.warmer is not None:
                    self.warmer.add(version)
                return
            try:
                self.scheduler.call(lambda: self.engine.warm([(prompt, key)]), timeout=_WARM_TIMEOUT_S)
            finally:
                self._warming.release()
        except Exception:  # noqa: BLE001 - see above
            log.warning("could not prepare %s ahead of its first request", version.ref, exc_info=True)

    def get(self, ref: str) -> PromptVersion:
        """The version a reference ("name", "name@3", "name@prod") names."""
        return self.registry.resolve(ref)

    def list_page(self, name: str | None, page_size: int = 0, page_token: str = "", *,
                  after: str = "") -> tuple[list[PromptVersion], str]:
        """One page of versions (of task `name`, or of all tasks) and the token of the next ("" after the last);
        `page_size` 0 means the registry's default, and it caps larger sizes. `after` ("name@3") starts the page
        after that version, in place of a token."""
        return self.registry.list_page(name or None, page_size, page_token, after=after)

    def nearby(self, ref: str) -> list[str]:
        """References near `ref`, which names nothing: its task's versions and aliases, or tasks spelt like it."""
        return self.registry.nearby(ref)

    def delete(self, ref: str, *, all_versions: bool = False, force: bool = False) -> list[str]:
        """Deletes a version (or, with `all_versions`, a whole task) and drops it from the caches; returns the
        deleted refs."""
        deleted = self.registry.delete(ref, all_versions=all_versions, force=force)
        for gone in map(PromptRef.parse, deleted):
            self.prompts.evict(gone.name, gone.version)
            self.engine.prefixes.evict(gone.name, gone.version)
        log.info("deleted %s", ", ".join(deleted))
        return deleted

    def export(self, ref: str) -> PromptFiles:
        """The version `ref` names and every file of it, the weights checked against their checksum."""
        version = self.registry.resolve(ref)
        return PromptFiles(version, self.registry.files(version))

    def set_alias(self, name: str, alias: str, version: int) -> PromptVersion:
        """Points ``name@alias`` at `version` and returns that version."""
        result = self.registry.set_alias(name, alias, version)
        log.info("alias %s@%s -> %s", name, alias, result.ref)
        return result
