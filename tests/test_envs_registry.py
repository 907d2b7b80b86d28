"""The environment registry: lazy entries, clear errors, option checking."""

import pytest

from steppo_jax.envs import Environment, make, register, registered
from steppo_jax.envs import registry


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_built_ins_and_adapter_entries_are_registered():
    names = registered()
    for name in ("multihop_qa", "hotpotqa", "sokoban", "calculator",
                 "frozenlake", "textarena", "textworld"):
        assert name in names
    assert registry._REGISTRY["textworld"] == "steppo_jax.envs.adapters.textworld_env:TextWorldEnv"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown environment 'mazes'; known: calculator, ") as err:
        make("mazes")
    assert str(err.value).startswith("unknown environment")  # no KeyError quoting


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'hops' for environment "
                                        r"'multihop_qa'; accepted: difficulty, top_k"):
        make("multihop_qa", hops=3)


def test_lazy_entry_imports_only_when_built(clean_registry):
    register("broken", "steppo_jax.envs.not_a_module:Env")
    assert "broken" in registered()
    with pytest.raises(ImportError, match="environment 'broken' could not be imported"):
        make("broken")
    register("no_attr", "steppo_jax.envs.tools:NoSuchEnv")
    with pytest.raises(ImportError, match="has no 'NoSuchEnv'"):
        make("no_attr")


def test_register_callable_and_duplicates(clean_registry):
    class Tiny:
        name, max_steps = "tiny", 1

        def __init__(self, size: int = 1):
            self.size = size

        def reset(self, task_id, seed): ...

        def step(self, action_text): ...

        def expert_action(self): ...

    register("tiny", Tiny)
    env = make("tiny", size=3)
    assert isinstance(env, Environment) and env.size == 3
    with pytest.raises(ValueError, match="already registered"):
        register("tiny", Tiny)
    # A factory taking **kwargs checks its options itself.
    register("tiny", lambda **kw: Tiny(size=len(kw)), overwrite=True)
    assert make("tiny", anything=2, other=3).size == 2
    with pytest.raises(ValueError, match="module:Class"):
        register("bad", "no_colon")
    with pytest.raises(TypeError, match="callable"):
        register("bad", 3)


def test_environment_modules_never_import_jax():
    """DESIGN §1: environments are plain Python (checked on the sources: the package root may
    import JAX for the kernels)."""
    import ast
    import pathlib

    import steppo_jax.envs

    root = pathlib.Path(steppo_jax.envs.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) >= 10
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"jax", "jaxlib", "flax", "optax"}, (
                    f"{path.name} imports {name}")
