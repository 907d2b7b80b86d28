"""Environments by name: ``make("multihop_qa", difficulty=2)``.

Entries are factories or lazy ``"module:Class"`` strings, so an environment's optional
dependencies are imported only when it is built.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from steppo_jax.envs.base import Environment

Factory = Callable[..., Environment]

_REGISTRY: dict[str, str | Factory] = {
    "multihop_qa": "steppo_jax.envs.multihop_qa:MultihopQAEnv",
    "hotpotqa": "steppo_jax.envs.hotpotqa:HotpotQAEnv",
    "sokoban": "steppo_jax.envs.sokoban:SokobanEnv",
    "calculator": "steppo_jax.envs.calculator:CalculatorEnv",
    "frozenlake": "steppo_jax.envs.adapters.gym_text:FrozenLakeEnv",
    "textarena": "steppo_jax.envs.adapters.textarena_env:TextArenaEnv",
    "textworld": "steppo_jax.envs.adapters.textworld_env:TextWorldEnv",
}


class UnknownEnvironmentError(KeyError):
    """``make`` or lookup of a name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str, factory: str | Factory, *, overwrite: bool = False) -> None:
    """Register ``factory`` (a callable or a ``"module:Class"`` string) under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"environment name must be a non-empty string, got {name!r}")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"lazy factory must look like 'module:Class', got {factory!r}")
    if not (isinstance(factory, str) or callable(factory)):
        raise TypeError(f"factory for {name!r} must be callable or 'module:Class', "
                        f"got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"environment {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    """Names of all registered environments, sorted."""
    return sorted(_REGISTRY)


def resolve(name: str) -> Factory:
    """The factory registered as ``name`` (a lazy ``'module:Class'`` imported): picklable when
    it is a module-level class or function, for environments built in other processes."""
    if name not in _REGISTRY:
        raise UnknownEnvironmentError(f"unknown environment {name!r}; "
                                      f"known: {', '.join(registered())}")
    factory = _REGISTRY[name]
    if not isinstance(factory, str):
        return factory
    module_name, attr = factory.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"environment {name!r} could not be imported from {module_name!r}: "
                          f"{err}. Is its optional dependency installed "
                          "(pip install 'steppo_jax[envs]')?") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"environment {name!r}: module {module_name!r} has no {attr!r}") from err


def make(name: str, **options: Any) -> Environment:
    """Build the environment registered as ``name`` with keyword ``options``.

    Unknown options are rejected with the list of accepted ones (unless the factory takes
    ``**kwargs``).
    """
    factory = resolve(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items()
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for environment "
                            f"{name!r}; accepted: {', '.join(accepted) or 'none'}")
    return factory(**options)
