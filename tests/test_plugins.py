"""Plugin loading: each plugin is loaded whole or not at all, built-ins are replaced only on
purpose, and hooks are called through pluggy (tryfirst, trylast, wrappers).

Stub plugins are modules written to a temporary folder and loaded as installed plugins, either
through ``load_plugins(extra_modules=...)`` or through a fake distribution's entry points.
"""

from __future__ import annotations

import importlib
import json
import logging
import textwrap
import uuid

import pluggy
import pytest

from genserve import hookspecs
from genserve.attention.torch_ref import TorchAttention
from genserve.plugins import PluginLoadError, Plugins, load_plugins



@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("GENSERVE_PLUGINS", raising=False)
    return tmp_path


# Every stub has a class per registry kind to register (registries do not check contracts).
HEADER = """from genserve.hookspecs import hookimpl
import torch.nn
class Arch(torch.nn.Module): pass
class Attn: name = "stub"
class Lora: pass
"""


def write_plugin(folder, body: str) -> str:
    """A plugin module with a unique name (modules stay imported between tests)."""
    name = f"stub_plugin_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(HEADER + textwrap.dedent(body))
    importlib.invalidate_caches()
    return name


def install(folder, **plugins: str) -> None:
    """A fake installed distribution whose ``genserve`` entry points are ``plugins``."""
    info = folder / f"stub_dist_{uuid.uuid4().hex[:10]}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {info.name.split('-')[0]}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}\n" for name, module in plugins.items())
    (info / "entry_points.txt").write_text("[genserve]\n" + lines)


def info_of(plugins: Plugins, name: str):
    return next(i for i in plugins.infos if i.name == name)




def test_collision_with_a_builtin_fails_the_whole_plugin(plugin_dir):
    """The reported bug: the plugin was listed as failed, but what it registered before the
    collision stayed live. Now nothing of it is committed, in any hook."""
    mod = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_architectures(register):
            register("stub_arch", Arch)

        @hookimpl
        def genserve_register_attention(register):
            register("stub_attn", Attn)
            register("torch", Attn)  # the built-in torch attention's name
        """)
    plugins = load_plugins(extra_modules=(mod,))
    info = info_of(plugins, mod)
    assert info.error.startswith("PluginConflictError: attention implementation 'torch' is built in")
    assert "override=True" in info.error
    assert info.registered == {} and info.overrides == {}
    assert "stub_arch" not in plugins.architectures and "stub_attn" not in plugins.attention
    assert plugins.attention.get("torch") is TorchAttention
    assert plugins.attention.owner("torch") == "genserve.attention.torch_ref"
    assert plugins.manager.get_plugin(mod) is None  # the failed plugin is out of the manager
    assert [i.name for i in plugins.failed()] == [mod]


def test_a_plugin_that_raises_leaves_nothing_and_the_others_load(plugin_dir):
    broken = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_architectures(register):
            register("half_done", Arch)

        @hookimpl
        def genserve_register_lora(register):
            raise RuntimeError("no GPU library")
        """)
    fine = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("stub_lora", Lora)
        """)
    plugins = load_plugins(extra_modules=(broken, fine))
    assert info_of(plugins, broken).error == "RuntimeError: no GPU library"
    assert "half_done" not in plugins.architectures
    assert info_of(plugins, fine).error is None and plugins.lora.owner("stub_lora") == fine
    assert "torch" in plugins.lora and "llama" in plugins.architectures  # built-ins untouched


def test_malformed_plugins_are_reported(plugin_dir):
    typo = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_backend(register):  # no such hook
            pass
        """)
    bad_arg = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_backends(registrar):
            pass
        """)
    old_form = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register(Lora)  # the old register(cls) form
        """)
    not_a_name = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register(Lora, Lora)
        """)
    plugins = load_plugins(extra_modules=(typo, bad_arg, old_form, not_a_name))
    assert "PluginValidationError" in info_of(plugins, typo).error
    assert "genserve_register_backend" in info_of(plugins, typo).error
    assert "PluginValidationError" in info_of(plugins, bad_arg).error
    assert "registrar" in info_of(plugins, bad_arg).error
    assert info_of(plugins, old_form).error == \
        "TypeError: register() missing 1 required positional argument: 'obj'"
    assert info_of(plugins, not_a_name).error.startswith(
        "TypeError: register(name, obj): name must be a non-empty string")
    assert len(plugins.failed()) == 4


def test_overriding_a_builtin_is_declared_and_logged(plugin_dir, caplog):
    mod = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_attention(register):
            register("torch", Attn, override=True)
            register("stub_extra", Attn)
        """)
    with caplog.at_level(logging.WARNING, logger="genserve.plugins"):
        plugins = load_plugins(extra_modules=(mod,))
    info = info_of(plugins, mod)
    assert info.error is None
    assert plugins.attention.owner("torch") == mod and plugins.attention.get("torch").__module__ == mod
    assert info.registered == {"attention": ["torch", "stub_extra"]}
    assert info.overrides == {"attention": ["torch"]}
    assert f"plugin {mod!r} replaces the built-in attention implementation 'torch' of " \
           "genserve.attention.torch_ref" in caplog.text
    # without the plugin, the built-in is back: nothing leaks between loads
    assert load_plugins().attention.get("torch") is TorchAttention


def test_installed_plugins_never_replace_each_other(plugin_dir):
    first = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("shared", Lora)
        """)
    second = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("mine", Lora)
            register("shared", Lora, override=True)  # override is for built-ins only
        """)
    plugins = load_plugins(extra_modules=(first, second))
    assert plugins.lora.owner("shared") == first and "mine" not in plugins.lora
    assert info_of(plugins, second).error == \
        f"PluginConflictError: LoRA method 'shared' is already registered by plugin {first!r}"


def test_one_plugin_registering_a_name_twice_fails(plugin_dir):
    mod = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("twice", Lora)
            register("TWICE", Arch)
        """)
    plugins = load_plugins(extra_modules=(mod,))
    assert "registers LoRA method 'twice' twice, with different objects" in info_of(plugins, mod).error
    assert "twice" not in plugins.lora


def test_hooks_are_called_through_pluggy(plugin_dir):
    """tryfirst/trylast order the calls across plugins, whatever the load order, and wrappers
    (new style and old style) run around the others; registrations stay attributed."""
    (plugin_dir / "genserve_plugin_calls.py").write_text("log = []\n")
    last = write_plugin(plugin_dir, """
        import genserve_plugin_calls as calls
        @hookimpl(trylast=True)
        def genserve_register_lora(register):
            calls.log.append("trylast")
            register("from_last", Lora)
        """)
    plain = write_plugin(plugin_dir, """
        import genserve_plugin_calls as calls
        @hookimpl
        def genserve_register_lora(register):
            calls.log.append("plain")
        """)
    first = write_plugin(plugin_dir, """
        import genserve_plugin_calls as calls
        @hookimpl(tryfirst=True)
        def genserve_register_lora(register):
            calls.log.append("tryfirst")
        """)
    wrapper = write_plugin(plugin_dir, """
        import genserve_plugin_calls as calls
        @hookimpl(wrapper=True)
        def genserve_register_lora(register):
            calls.log.append("wrapper before")
            result = yield
            calls.log.append("wrapper after")
            register("from_wrapper", Lora)
            return result
        """)
    old_wrapper = write_plugin(plugin_dir, """
        import genserve_plugin_calls as calls
        @hookimpl(hookwrapper=True)
        def genserve_register_lora(register):
            calls.log.append("old wrapper before")
            outcome = yield
            calls.log.append("old wrapper after")
        """)
    import genserve_plugin_calls

    plugins = load_plugins(extra_modules=(last, plain, first, wrapper, old_wrapper))
    # pluggy: wrappers outermost (the later-registered one outside), then tryfirst, plain, trylast
    assert genserve_plugin_calls.log == ["old wrapper before", "wrapper before", "tryfirst", "plain",
                                         "trylast", "wrapper after", "old wrapper after"]
    assert not plugins.failed()
    assert plugins.lora.owner("from_wrapper") == wrapper and plugins.lora.owner("from_last") == last


def test_a_wrapper_that_raises_fails_alone(plugin_dir):
    before = write_plugin(plugin_dir, """
        @hookimpl(wrapper=True)
        def genserve_register_lora(register):
            register("never", Lora)
            raise ValueError("before yield")
            yield
        """)
    after = write_plugin(plugin_dir, """
        @hookimpl(wrapper=True)
        def genserve_register_lora(register):
            register("never_either", Lora)
            yield
            raise ValueError("after yield")
        """)
    fine = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("still_here", Lora)
        """)
    plugins = load_plugins(extra_modules=(fine, before, after))
    assert info_of(plugins, before).error == "ValueError: before yield"
    assert info_of(plugins, after).error == "ValueError: after yield"
    assert "never" not in plugins.lora and "never_either" not in plugins.lora
    assert plugins.lora.owner("still_here") == fine


def test_allow_list(plugin_dir, monkeypatch, caplog):
    good = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("good_lora", Lora)
        """)
    clash = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("torch", Lora)
        """)
    install(plugin_dir, good=good, clash=clash)
    # not asked for: a failed plugin is skipped and reported
    plugins = load_plugins()
    assert "good_lora" in plugins.lora and "built in" in info_of(plugins, "clash").error
    # GENSERVE_PLUGINS leaves out the others
    monkeypatch.setenv("GENSERVE_PLUGINS", "good")
    plugins = load_plugins()
    assert "good_lora" in plugins.lora and "clash" not in [i.name for i in plugins.infos]
    assert {i.name for i in plugins.infos if not i.builtin} == {"good"}
    # asked for by name and unable to load: a clear error, not a silent skip
    monkeypatch.setenv("GENSERVE_PLUGINS", "good,clash")
    with pytest.raises(PluginLoadError, match=r"plugin 'clash' .* was asked for in GENSERVE_PLUGINS "
                                              r"but failed to load: PluginConflictError: LoRA method "
                                              r"'torch' is built in"):
        load_plugins()
    # a name that matches no installed plugin is logged
    monkeypatch.setenv("GENSERVE_PLUGINS", "good,no_such_plugin")
    with caplog.at_level(logging.WARNING, logger="genserve.plugins"):
        load_plugins()
    assert "GENSERVE_PLUGINS names no_such_plugin, which no installed plugin is called" in caplog.text


def test_two_plugins_with_one_name_fail_the_second(plugin_dir):
    a = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("lora_a", Lora)
        """)
    b = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("lora_b", Lora)
        """)
    install(plugin_dir, same=a)
    install(plugin_dir, same=b)
    plugins = load_plugins()
    same = [i for i in plugins.infos if i.name == "same"]
    assert len(same) == 2 and [i.error is None for i in same].count(True) == 1
    failed = next(i for i in same if i.error)
    assert "already registered" in failed.error  # pluggy refuses a second plugin of one name
    assert ("lora_a" in plugins.lora) != ("lora_b" in plugins.lora)


def test_the_registries_are_the_hooks():
    """Each hook in hookspecs fills the registry named after it; nothing else lists them."""
    hooks = {n for n in dir(hookspecs) if n.startswith(hookspecs.HOOK_PREFIX)}
    assert {hookspecs.HOOK_PREFIX + kind for kind in hookspecs.REGISTRIES} == hooks
    assert "linear_kernels" in hookspecs.REGISTRIES
    plugins = load_plugins()
    assert set(plugins.registries) == set(hookspecs.REGISTRIES)
    for kind, entry in hookspecs.REGISTRIES.items():
        assert getattr(plugins, kind) is plugins.registries[kind] and plugins.registries[kind].kind == entry
    with pytest.raises(AttributeError, match="no registry 'backend'"):
        plugins.backend  # noqa: B018
    pm = pluggy.PluginManager("genserve")
    pm.add_hookspecs(hookspecs)
    assert {h for h in dir(pm.hook) if h.startswith(hookspecs.HOOK_PREFIX)} == hooks


def test_genserve_plugins_lists_overrides_and_failures(plugin_dir, capsys):
    from genserve.cli import main

    replacing = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_lora(register):
            register("torch", Lora, override=True)
        """)
    clashing = write_plugin(plugin_dir, """
        @hookimpl
        def genserve_register_architectures(register):
            register("llama", Arch)
        """)
    install(plugin_dir, replacing=replacing, clashing=clashing)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"replacing ({replacing}, installed)\n  lora: torch\n  replaces built-in lora: torch\n" in out
    assert f"clashing ({clashing}, installed)\n  FAILED to load: PluginConflictError: architecture " \
           "'llama' is built in" in out
    assert main(["plugins", "--json"]) == 0
    data = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert data["replacing"]["overrides"] == {"lora": ["torch"]} and data["clashing"]["registered"] == {}
