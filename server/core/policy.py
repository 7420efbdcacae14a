"""Per-task scheduling policy: weights, caps, token-rate limits and default priorities (`--task-policy FILE`).

The file is TOML (`.toml`) or YAML (`.yaml`, `.yml`); rules match task names with the token file's
patterns (shell-style globs, case-sensitive; `-` is the bare base model) and the first rule that
matches a task is its policy; a task no rule matches gets `[default]`:

    [default]                  # tasks no rule matches (leave out for: weight 1, no caps, priority 0)
    weight = 1

    [[tasks]]
    match = ["batch-*", "etl"]  # one pattern or a list
    weight = 1                  # its share of the server against other busy tasks (> 0)
    max_running = 8             # most rows it decodes at once; more wait in the queue
    max_queued = 200            # most requests it has queued; more are refused (RESOURCE_EXHAUSTED / 429)
    tokens_per_second = 2000    # token-rate limit (input + max_new_tokens of each request, unused ones refunded)
    burst = 8000                # the bucket's size (default: one second's worth)
    priority = 5                # default priority of its requests (lower is served first, as vLLM's)

    [priorities]                # the most urgent priority a token of each role may ask for
    infer = 0                   # (default: infer 0, admin unbounded; without --auth-tokens: admin's)

Without a file every task has weight 1, no caps and priority 0. `PolicyFile` re-reads the file when
it changes (checked at most once a second) or when told to (SIGHUP); a file that no longer parses
keeps the policy in force, logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from softprompt.server.access.tokens import Role

log = logging.getLogger(__name__)

# The most urgent priority a token of each role may ask for by default: infer tokens 0, the default (or
# their task's default, if that is more urgent), so they may only make requests less urgent; admin tokens
# anything (None).
DEFAULT_PRIORITY_FLOORS: Mapping[Role, int | None] = {Role.INFER: 0, Role.ADMIN: None}
_POLICY_KEYS = {"weight", "max_running", "max_queued", "tokens_per_second", "burst", "priority"}
_PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # the wire's int32


def _check_priority(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not _PRIORITY_RANGE[0] <= value <= _PRIORITY_RANGE[1]:
        raise ValueError(f"{name} must be a whole number (a 32-bit integer), got {value!r}")


class PolicyError(ValueError):
    """The policy file cannot be read or says something impossible; the message names the file and place."""


@dataclass(frozen=True)
class TaskPolicy:
    """What one task may take of the server."""

    weight: float = 1.0  # its share against the other busy tasks: 3 gets three times what 1 gets
    max_running: int | None = None  # rows decoding at once; None: no cap
    max_queued: int | None = None  # requests waiting; None: only the server's --max-queued-requests
    tokens_per_second: float | None = None  # the token bucket's refill; None: no rate limit
    burst: float | None = None  # the bucket's size; None: one second's worth
    priority: int = 0  # of its requests that name none; lower is served first

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a number > 0, got {self.weight!r}")
        for name in ("max_running", "max_queued"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.tokens_per_second is not None and not (math.isfinite(self.tokens_per_second)
                                                       and self.tokens_per_second > 0):
            raise ValueError(f"tokens_per_second must be a number > 0, got {self.tokens_per_second!r}")
        if self.burst is not None:
            if self.tokens_per_second is None:
                raise ValueError("burst needs tokens_per_second: it is the size of that rate limit's bucket")
            if not (math.isfinite(self.burst) and self.burst >= 1):
                raise ValueError(f"burst must be a number >= 1, got {self.burst!r}")
        _check_priority(self.priority, "priority")

    @property
    def bucket_size(self) -> float:
        """The rate limit's burst in tokens (one second's worth unless given); inf without a limit."""
        if self.tokens_per_second is None:
            return math.inf
        return self.burst if self.burst is not None else max(1.0, self.tokens_per_second)


@dataclass(frozen=True)
class TaskRule:
    """One `[[tasks]]` entry: the tasks it matches and their policy."""

    patterns: tuple[str, ...]
    policy: TaskPolicy

    def matches(self, task: str) -> bool:
        """Whether `task` (a name; `-` for the bare model) matches one of the patterns."""
        return any(fnmatchcase(task, p) for p in self.patterns)


@dataclass(frozen=True)
class PolicyTable:
    """Every task's policy: the first matching rule's, else the default; and the priority bound of each role."""

    rules: tuple[TaskRule, ...] = ()
    default: TaskPolicy = TaskPolicy()
    priority_floors: Mapping[Role, int | None] = field(default_factory=lambda: dict(DEFAULT_PRIORITY_FLOORS))
    # Per-table memo of task -> policy: tables are immutable, so this never goes stale.
    _memo: dict[str, TaskPolicy] = field(default_factory=dict, compare=False, repr=False)

    def for_task(self, task: str) -> TaskPolicy:
        """The policy of `task` (a name; `-` for the bare model)."""
        found = self._memo.get(task)
        if found is None:
            found = next((r.policy for r in self.rules if r.matches(task)), self.default)
            if len(self._memo) < 65536:  # bounded: task names come from requests
                self._memo[task] = found
        return found

    def priority_floor(self, role: Role | None) -> int | None:
        """The most urgent priority a caller with `role` may ask for (None: any); no role (a server without
        tokens, on loopback only) is the admin's."""
        return self.priority_floors.get(Role.ADMIN if role is None else role)


def parse_policy(data: Any, where: str = "the policy") -> PolicyTable:
    """Builds a table from a parsed file (a mapping of `default`, `tasks`, `priorities`); PolicyError says what
    is wrong and where."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where}: expected a table with `default`, `tasks` and `priorities`, got {type(data).__name__}")
    unknown = set(data) - {"default", "tasks", "priorities"}
    if unknown:
        raise PolicyError(f"{where}: unknown section(s) {sorted(unknown)}: use default, tasks and priorities")
    default = _task_policy(data.get("default", {}), f"{where}, [default]", TaskPolicy())
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list):
        raise PolicyError(f"{where}: `tasks` must be a list of tables ([[tasks]] in TOML)")
    rules = tuple(_rule(entry, f"{where}, tasks entry {i + 1}") for i, entry in enumerate(tasks))
    return PolicyTable(rules, default, _floors(data.get("priorities", {}), f"{where}, [priorities]"))


def load_policy(path: Path) -> PolicyTable:
    """Reads a TOML or YAML policy file (by its suffix)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read the task policy file {path}: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # transformers' own dependency: always there beside the server

            data = yaml.safe_load(text) or {}
        else:
            raise PolicyError(f"{path}: name the file .toml, .yaml or .yml so its format is known")
    except PolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - the parsers' own errors carry the line
        raise PolicyError(f"{path} does not parse: {e}") from None
    return parse_policy(data, str(path))


class PolicyFile:
    """The policy in force: a file's, re-read when it changes (checked at most every `check_every_s`) or on
    `reload()` (SIGHUP); without a file, the defaults."""

    def __init__(self, path: Path | None = None, *, check_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._table = PolicyTable() if path is None else load_policy(path)  # a bad file fails the start
        self._checked = clock()

    def current(self) -> PolicyTable:
        """The table in force, re-read first if the file changed since it was last checked."""
        if self.path is not None and self._clock() - self._checked >= self.check_every_s:
            with self._lock:
                self._checked = self._clock()
                if self._file_stamp() != self._stamp:
                    self._load_locked()
        return self._table

    def reload(self) -> bool:
        """Re-reads the file now (SIGHUP); False, and the old policy kept, if it does not parse."""
        if self.path is None:
            return True
        with self._lock:
            return self._load_locked()

    def _load_locked(self) -> bool:
        assert self.path is not None
        self._stamp = self._file_stamp()
        try:
            self._table = load_policy(self.path)
        except PolicyError as e:
            log.error("task policy not reloaded, the one in force stays: %s", e)
            return False
        log.info("task policy reloaded from %s: %d rules", self.path, len(self._table.rules))
        return True

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size


def _toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise PolicyError("TOML policy files need Python 3.11 or later: write the policy as YAML") from None
    return tomllib.loads(text)


def _rule(entry: Any, where: str) -> TaskRule:
    if not isinstance(entry, Mapping) or "match" not in entry:
        raise PolicyError(f"{where}: each entry needs `match`, a task pattern or a list of them")
    match = entry["match"]
    patterns = (match,) if isinstance(match, str) else tuple(match) if isinstance(match, list) else ()
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise PolicyError(f"{where}: `match` must be a non-empty pattern or list of patterns, got {match!r}")
    rest = {k: v for k, v in entry.items() if k != "match"}
    return TaskRule(patterns, _task_policy(rest, f"{where} ({' '.join(patterns)})", TaskPolicy()))


def _task_policy(values: Any, where: str, base: TaskPolicy) -> TaskPolicy:
    if not isinstance(values, Mapping):
        raise PolicyError(f"{where}: expected a table of {', '.join(sorted(_POLICY_KEYS))}")
    unknown = set(values) - _POLICY_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(_POLICY_KEYS))}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(f"{where}: {name} must be a number, got {value!r}")
    try:
        return TaskPolicy(**{**base.__dict__, **values})
    except ValueError as e:
        raise PolicyError(f"{where}: {e}") from None


def _floors(values: Any, where: str) -> dict[Role, int | None]:
    if not isinstance(values, Mapping):
        raise PolicyError(f"{where}: expected a table of role = most urgent priority")
    floors = dict(DEFAULT_PRIORITY_FLOORS)
    for name, value in values.items():
        try:
            role = Role(name)
        except ValueError:
            raise PolicyError(f"{where}: unknown role {name!r}: use {', '.join(r.value for r in Role)}") from None
        if value is None:  # YAML's null: any priority
            floors[role] = None
            continue
        try:
            _check_priority(value, name)
        except ValueError as e:
            raise PolicyError(f"{where}: {e}") from None
        floors[role] = value
    return floors
