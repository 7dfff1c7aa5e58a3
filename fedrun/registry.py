"""Named choices of one config key, each a class with its own settings and checks.

A method registers itself where it is written, with its name and a small dataclass of its own
config keys (``Settings``: each field with its default, its docstring under it and its facts,
and a ``validate`` for its own values)::

    SERVER_RULES = Registry("fed.server_opt", "fedavg", "Server rule ...", applies=FEDERATED)

    @dataclass
    class MomentumSettings(Settings):
        server_lr: float = 1.0
        \"\"\"Server learning rate.\"\"\"

    @SERVER_RULES.register("fedavgm", MomentumSettings)
    class FedAvgM(ServerRule):
        \"\"\"Hsu et al. 2019, server momentum.\"\"\"
        def __init__(self, settings: MomentumSettings): ...

The registry's key (``fed.server_opt``) and every settings field (``fed.server_lr``) become keys
of the config section (``fedrun.config``): the config's choices, its validation, ``--help`` and
the config reference (docs/config.md) are read from here. A choice may also check the whole
config when it is selected (a classmethod ``check(cfg)`` on the registered class; one
``ConfigError`` line naming the key and the fix). Several choices may share a settings class,
or a key (fields of the same name must agree): a key then applies when any of them is chosen.

The built-in methods live in their families' modules (fedrun.federated.server, .drift,
.compression, .placement, .participation, .client; fedrun.adapters; fedrun.privacy.mechanisms);
``fedrun.methods`` imports them all, and the config loads it before it reads a registered key.
A method defined anywhere else (a test file, a user's module) registers the same way.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

CATALOGUE = "fedrun.methods"  # imports every built-in method (a composition root)

NO_OFF = object()  # the "off" fact of a key that is no on/off switch (fedrun.config reads it)
_REGISTRIES: dict[str, Registry] = {}  # by key ("fed.server_opt"), in creation order
generation = 0  # changes whenever a choice is added or removed (the config's caches key on it)


def _bump() -> None:
    global generation
    generation += 1


def load_builtins() -> None:
    """Import the built-in methods once (each registers itself)."""
    importlib.import_module(CATALOGUE)


def registries() -> list[Registry]:
    """Every registry, built-ins loaded, by key ("fed.client_optimizer", "fed.compress", ...): an
    order that does not depend on which module was imported first."""
    load_builtins()
    return [_REGISTRIES[key] for key in sorted(_REGISTRIES)]


class Settings:
    """Base of a method's settings dataclass: its fields are config keys of the registry's
    section (``setting(...)`` from fedrun.config gives a field its facts). ``validate`` checks
    this method's own values (it runs for every registered method, selected or not, as a section
    checks all its keys); rules that need other keys go in the method's ``check(cfg)``."""

    def validate(self) -> None:
        """Raise one ``ConfigError`` line naming the key and the fix; nothing by default."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (torchtitan style), from its source; base
    classes' fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not hasattr(klass, "__dataclass_fields__"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where there is no source (an interactive session)
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@dataclass(frozen=True)
class Choice:
    """One registered method: its name, its class, its settings class (or None), its summary."""

    name: str
    target: Any
    settings: type[Settings] | None
    summary: str


@dataclass(frozen=True)
class Key:
    """A config key a registry brings into its section: the selector or a settings field."""

    section: str
    name: str
    hint: Any
    """the field's type (int, float, bool, str, list[int])"""
    default: Any
    owner: type | None
    """the settings class that declares it (None for the selector: the registry's doc)"""
    metadata: dict[str, Any]
    """the facts ``fedrun.config.setting`` stores (hashed, label, applies, off, choices)"""
    users: tuple[str, ...]
    """the registry's choices that read it (empty for the selector itself)"""
    registry: Registry

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def doc(self) -> str:
        """The key's docstring (the field's, or the registry's for its selector)."""
        return self.registry.doc if self.owner is None else field_docs(self.owner).get(self.name, "")


class Registry:
    """The choices of one config key (module docstring). ``key``: "section.name"; ``default``: the
    choice that is the key's default (and its "off" value when ``off`` is True); ``doc``: the
    key's docstring; ``hashed``, ``label``: the key's facts (fedrun.config); ``applies``: when the
    key and its settings mean anything (a ``fedrun.config.When``; None: whenever the section
    does); ``federated``: a centralized run refuses every choice but the default; ``requires``: the
    settings class every choice but the default extends (the keys the family's shared code reads,
    e.g. every compressor's ``fed.error_feedback``)."""

    def __init__(self, key: str, default: str, doc: str, *, hashed: str = "always", label: bool = True,
                 off: bool = True, applies: Any = None, federated: bool = False,
                 requires: type[Settings] | None = None):
        section, _, name = key.partition(".")
        if not section or not name or key in _REGISTRIES:
            raise ValueError(f"registry key {key!r}: expected a new 'section.name'")
        self.key, self.section, self.name = key, section, name
        self.default, self.doc, self.hashed, self.label = default, doc, hashed, label
        self.off, self.applies, self.federated, self.requires = off, applies, federated, requires
        self.choices: dict[str, Choice] = {}
        self._keys: tuple[int, list[Key]] | None = None  # (generation, keys()) cached
        _REGISTRIES[key] = self
        _bump()

    # -- registering ---------------------------------------------------------------------------

    def register(self, name: str, settings: type[Settings] | None = None) -> Callable[[T], T]:
        """Decorator: register the class (or factory) under ``name`` with its ``settings``."""
        def add(target: T) -> T:
            if name in self.choices:
                raise ValueError(f"{self.key}: {name!r} is registered already")
            if self.requires is not None and name != self.default and not (
                    settings is not None and issubclass(settings, self.requires)):
                raise ValueError(f"{self.key}: {name!r} needs settings that extend {self.requires.__name__} "
                                 f"(the keys every {self.key} choice has); register it with one")
            summary = (inspect.getdoc(target) or "").strip().splitlines()
            self.choices[name] = Choice(name, target, settings, summary[0] if summary else "")
            _bump()  # before the check: the keys' cache must see the new choice
            try:
                self._check_keys()
            except ValueError:
                del self.choices[name]
                _bump()
                raise
            return target
        return add

    def unregister(self, name: str) -> None:
        """Remove a choice (tests that register their own method clean up with it)."""
        self.choices.pop(name, None)
        _bump()

    def _check_keys(self) -> None:
        """A key belongs to one registry; choices that share a field name must agree on it."""
        hints: dict[str, tuple[Any, Any]] = {}
        for choice in self.choices.values():
            if choice.settings is None:
                continue
            types = _hints(choice.settings)
            for f in fields(choice.settings):
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                if hints.setdefault(f.name, (types[f.name], default)) != (types[f.name], default):
                    raise ValueError(f"{self.section}.{f.name}: declared by two {self.key} choices with "
                                     f"different types or defaults")
        mine = {key.name for key in self.keys()}
        for registry in _REGISTRIES.values():
            if registry is not self and registry.section == self.section:
                shared = mine & {key.name for key in registry.keys()}
                if shared:
                    raise ValueError(f"{self.section}.{sorted(shared)[0]}: a key of {registry.key} "
                                     f"already; a key belongs to one registry")

    # -- reading -------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self.choices

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def names(self) -> tuple[str, ...]:
        return tuple(self.choices)

    def choice(self, name: str) -> Choice:
        return self.choices[name]

    def _section(self, cfg: Any) -> Any:
        """``cfg``'s section of this registry (``cfg`` may be the whole config or that section)."""
        return getattr(cfg, self.section) if hasattr(type(cfg), "__dataclass_fields__") and \
            self.section in type(cfg).__dataclass_fields__ else cfg

    def selected(self, cfg: Any) -> Choice:
        """The choice ``cfg`` (the config, or its section) selects (validated configs only name
        registered choices)."""
        return self.choices[getattr(self._section(cfg), self.name)]

    def settings(self, cfg: Any, name: str | None = None) -> Any:
        """The settings object of choice ``name`` (default: the selected one) filled from ``cfg``
        (the config, or its section); None for a choice without settings."""
        choice = self.choices[name] if name is not None else self.selected(cfg)
        if choice.settings is None:
            return None
        section = self._section(cfg)
        return choice.settings(**{f.name: getattr(section, f.name) for f in fields(choice.settings)})

    def keys(self) -> list[Key]:
        """The selector first, then every settings field (once, with the choices that read it)."""
        if self._keys is not None and self._keys[0] == generation:
            return self._keys[1]
        out = [Key(self.section, self.name, str, self.default, None,
                   {"hashed": self.hashed, "label": self.label, "applies": self.applies,
                    "off": self.default if self.off else NO_OFF, "choices": self},
                   (), self)]
        found: dict[str, Key] = {}
        for choice in self.choices.values():
            if choice.settings is None:
                continue
            hints = _hints(choice.settings)
            for f in fields(choice.settings):
                if f.name in found:
                    found[f.name] = _with_user(found[f.name], choice.name)
                    continue
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                found[f.name] = Key(self.section, f.name, hints[f.name], default, choice.settings,
                                    dict(f.metadata), (choice.name,), self)
        self._keys = (generation, out + list(found.values()))
        return self._keys[1]


def _with_user(key: Key, user: str) -> Key:
    return Key(key.section, key.name, key.hint, key.default, key.owner, key.metadata, (*key.users, user),
               key.registry)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def registered_keys(section: str | None = None) -> list[Key]:
    """Every key the registries bring (of ``section``, or all), in registry order."""
    return [key for registry in registries() if section in (None, registry.section)
            for key in registry.keys()]


def registry_of(key: str) -> Registry | None:
    """The registry whose selector is ``key`` ("fed.drift"), if any."""
    load_builtins()
    return _REGISTRIES.get(key)


_CHECKS: list[Callable[[Any], None]] = []


def config_check(check: Callable[[Any], None]) -> Callable[[Any], None]:
    """Decorator: a check of the whole config that belongs to no registered choice (the
    experimental grouped trainer's, keyed on ``train.clients_at_once``); run after the chosen
    methods' checks, in registration order."""
    _CHECKS.append(check)
    return check


def checks() -> list[Callable[[Any], None]]:
    load_builtins()
    return list(_CHECKS)


def kept_state(cfg: Any) -> tuple[str, ...]:
    """The kinds of per-client state the chosen methods keep between rounds (the trainer's Adam
    moments, SCAFFOLD's control variates, error feedback, ...): a chosen class says so with a
    ``state_kinds`` tuple, or a classmethod ``kept_state(settings)`` when it depends on a setting.
    Clients that keep state train on their home ranks (fedrun.federated.placement); the built
    parts declare the same kinds (``fedrun.train`` asserts it)."""
    kinds: list[str] = []
    for reg in registries():
        choice = reg.selected(cfg)
        declared = getattr(choice.target, "kept_state", None)
        if declared is not None:
            kinds += declared(reg.settings(cfg))
        else:
            kinds += getattr(choice.target, "state_kinds", ())
    return tuple(kinds)
