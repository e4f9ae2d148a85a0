"""The module registry (``core.module.load_modules``), container wiring and task declarations.

Fake modules are real packages written to a temporary folder that is appended to
``modules.__path__`` for the test, so they are imported exactly as ``modules.<name>.module``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel

import modules
from containers import build_container
from core.messaging.queue import JobContext, Task, task
from core.module import Module, ModuleError, import_module, load_modules
from tests.support.settings import make_settings

HEADER = """\
from dependency_injector import containers, providers

from core.messaging.events import IntegrationEvent
from core.module import Module
from core.messaging.queue import JobContext, task
"""

MakeModule = Callable[..., None]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write ``modules/<name>/`` packages into a temporary folder importable as ``modules.<name>``."""
    root = tmp_path / "fake_modules"
    root.mkdir()
    monkeypatch.setattr(modules, "__path__", [*modules.__path__, str(root)])
    created: list[str] = []

    def make(
        name: str,
        *,
        declared_name: str | None = None,
        depends_on: Sequence[str] = (),
        container: str = "class Container(containers.DeclarativeContainer):\n    pass\n",
        extra: str = "",
        module_kwargs: str = "",
        body: str | None = None,
        with_module_py: bool = True,
    ) -> None:
        package = root / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        if with_module_py:
            source = body if body is not None else (
                HEADER + "\n" + textwrap.dedent(container) + "\n" + textwrap.dedent(extra) + "\n"
                + f"MODULE = Module(name={declared_name or name!r}, container=Container, "
                + f"depends_on={tuple(depends_on)!r}{', ' + module_kwargs if module_kwargs else ''})\n"
            )
            (package / "module.py").write_text(source)
        created.append(name)
        importlib.invalidate_caches()

    yield make

    for name in created:
        for key in [k for k in sys.modules if k == f"modules.{name}" or k.startswith(f"modules.{name}.")]:
            del sys.modules[key]
        if hasattr(modules, name):
            delattr(modules, name)


def names(found: Sequence[Module]) -> list[str]:
    return [m.name for m in found]


# --- load_modules: order ------------------------------------------------------------------------


def test_the_real_users_module_loads() -> None:
    [users] = load_modules(["users"])

    assert users.name == "users"
    assert users.tables == ["users", "user_sessions"]
    assert users.routes() == {"users.UserRegistered": ["users.send_welcome_email"]}


def test_modules_come_after_what_they_depend_on(make_module: MakeModule) -> None:
    make_module("fk_c")
    make_module("fk_b", depends_on=["fk_c"])
    make_module("fk_a", depends_on=["fk_b", "fk_c"])

    assert names(load_modules(["fk_a", "fk_b", "fk_c"])) == ["fk_c", "fk_b", "fk_a"]
    assert names(load_modules(["fk_c", "fk_a", "fk_b"])) == ["fk_c", "fk_b", "fk_a"]


def test_independent_modules_keep_the_listed_order(make_module: MakeModule) -> None:
    make_module("fk_x")
    make_module("fk_y")

    assert names(load_modules(["fk_y", "users", "fk_x"])) == ["fk_y", "users", "fk_x"]


def test_a_fake_module_may_depend_on_users(make_module: MakeModule) -> None:
    make_module("fk_shop", depends_on=["users"])

    assert names(load_modules(["fk_shop", "users"])) == ["users", "fk_shop"]


# --- load_modules: refusals ---------------------------------------------------------------------


def test_an_unknown_module_is_named_with_the_expected_path() -> None:
    with pytest.raises(ModuleError) as caught:
        load_modules(["users", "nosuchmodule"])

    message = str(caught.value)
    assert "'nosuchmodule'" in message
    assert "modules/nosuchmodule/module.py" in message


def test_a_package_without_module_py_is_reported_like_an_unknown_module(make_module: MakeModule) -> None:
    make_module("fk_empty", with_module_py=False)

    with pytest.raises(ModuleError, match=r"modules/fk_empty/module\.py"):
        load_modules(["fk_empty"])


def test_a_missing_import_inside_a_module_is_not_disguised_as_an_unknown_module(
    make_module: MakeModule,
) -> None:
    make_module("fk_broken", body="import not_a_real_library_atrium_xyz  # noqa\n")

    with pytest.raises(ModuleNotFoundError) as caught:
        load_modules(["fk_broken"])

    assert caught.value.name == "not_a_real_library_atrium_xyz"


def test_module_py_without_module_object_is_refused(make_module: MakeModule) -> None:
    make_module("fk_nomodule", body="MODULE = 'not a Module'\n")

    with pytest.raises(ModuleError, match=r"modules/fk_nomodule/module\.py must define MODULE"):
        load_modules(["fk_nomodule"])


def test_a_module_whose_declared_name_differs_is_refused(make_module: MakeModule) -> None:
    make_module("fk_named", declared_name="something_else")

    with pytest.raises(ModuleError) as caught:
        import_module("fk_named")

    message = str(caught.value)
    assert "'something_else'" in message
    assert "'fk_named'" in message


def test_a_dependency_that_is_not_enabled_names_both_modules(make_module: MakeModule) -> None:
    make_module("fk_needy", depends_on=["fk_absent"])
    make_module("fk_absent")

    with pytest.raises(ModuleError) as caught:
        load_modules(["users", "fk_needy"])

    message = str(caught.value)
    assert "'fk_needy'" in message
    assert "'fk_absent'" in message
    assert "not enabled" in message


def test_a_cycle_is_refused_and_shown(make_module: MakeModule) -> None:
    make_module("fk_p", depends_on=["fk_q"])
    make_module("fk_q", depends_on=["fk_r"])
    make_module("fk_r", depends_on=["fk_p"])

    with pytest.raises(ModuleError, match="cycle") as caught:
        load_modules(["fk_p", "fk_q", "fk_r"])

    assert "fk_p -> fk_q -> fk_r -> fk_p" in str(caught.value)


def test_a_module_depending_on_itself_is_a_cycle(make_module: MakeModule) -> None:
    make_module("fk_self", depends_on=["fk_self"])

    with pytest.raises(ModuleError, match="fk_self -> fk_self"):
        load_modules(["fk_self"])


def test_a_module_listed_twice_is_refused() -> None:
    with pytest.raises(ModuleError, match="listed twice"):
        load_modules(["users", "users"])


TASK_OUTSIDE = """
@task("fk_other.do_it")
async def do_it(ctx: JobContext, payload: dict) -> None:
    pass
"""


def test_a_task_outside_the_module_namespace_is_refused(make_module: MakeModule) -> None:
    make_module("fk_tasky", extra=TASK_OUTSIDE, module_kwargs="tasks=(do_it,)")

    with pytest.raises(ModuleError) as caught:
        load_modules(["fk_tasky"])

    message = str(caught.value)
    assert "'fk_tasky'" in message
    assert "'fk_other.do_it'" in message


def test_a_subscription_handler_outside_the_module_namespace_is_refused(make_module: MakeModule) -> None:
    extra = TASK_OUTSIDE + """
class Happened(IntegrationEvent):
    name = "fk_subby.Happened"
"""
    make_module("fk_subby", extra=extra, module_kwargs="subscriptions={Happened: (do_it,)}")

    with pytest.raises(ModuleError, match=r"'fk_other\.do_it'"):
        load_modules(["fk_subby"])


def test_tasks_inside_the_namespace_are_accepted(make_module: MakeModule) -> None:
    extra = """
@task("fk_good.do_it")
async def do_it(ctx: JobContext, payload: dict) -> None:
    pass
"""
    make_module("fk_good", extra=extra, module_kwargs="tasks=(do_it,)")

    [module] = load_modules(["fk_good"])

    assert [t.name for t in module.tasks] == ["fk_good.do_it"]


@pytest.mark.parametrize("bad", ["my-module", "users.sub", "1users", "", "users/../x", "a b"])
def test_a_module_name_must_be_an_identifier(bad: str) -> None:
    with pytest.raises(ModuleError, match="not a valid Python identifier"):
        load_modules([bad])


# --- build_container: wiring module dependencies ------------------------------------------------


def test_an_unsatisfiable_dependency_names_the_module_and_the_provider(make_module: MakeModule) -> None:
    make_module("fk_wants", container="""
        class Container(containers.DeclarativeContainer):
            not_a_core_provider = providers.Dependency()
    """)

    with pytest.raises(ModuleError) as caught:
        build_container(make_settings(modules=("users", "fk_wants")))

    message = str(caught.value)
    assert "'fk_wants'" in message
    assert "'not_a_core_provider'" in message


PROVIDER_MODULE = """
    class Container(containers.DeclarativeContainer):
        greeter = providers.Singleton(lambda: {"greeting": "hello"})
"""

CONSUMER_MODULE = """
    class Container(containers.DeclarativeContainer):
        greeter = providers.Dependency(instance_of=dict)
        email_sender = providers.Dependency()
        message = providers.Factory(lambda g: g["greeting"] + " world", greeter)
"""


def test_a_dependency_exported_by_a_module_it_depends_on_is_wired(make_module: MakeModule) -> None:
    make_module("fk_giver", container=PROVIDER_MODULE)
    make_module("fk_taker", container=CONSUMER_MODULE, depends_on=["fk_giver"])

    container = build_container(make_settings(modules=("fk_taker", "fk_giver")))

    assert container.fk_taker.message() == "hello world"
    assert container.fk_taker.greeter() is container.fk_giver.greeter()
    assert container.fk_taker.email_sender() is container.email_sender()  # core providers too


def test_a_provider_of_a_module_not_in_depends_on_is_not_wired(make_module: MakeModule) -> None:
    make_module("fk_giver2", container=PROVIDER_MODULE)
    make_module("fk_taker2", container=CONSUMER_MODULE)  # forgot depends_on=["fk_giver2"]

    with pytest.raises(ModuleError, match="'greeter'"):
        build_container(make_settings(modules=("fk_giver2", "fk_taker2")))


def test_the_users_module_is_wired_to_core(tmp_path: Path) -> None:
    container = build_container(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db"))

    assert container.users.password_hasher() is container.password_hasher()
    assert container.users.outbox() is container.outbox()
    assert container.users.service() is container.users.service()


@pytest.mark.parametrize("clashing", ["cache", "outbox"])
def test_a_module_named_like_a_core_provider_is_refused(make_module: MakeModule, clashing: str) -> None:
    make_module(clashing)

    with pytest.raises(ModuleError, match=f"'{clashing}'"):
        build_container(make_settings(modules=("users", clashing)))


# --- core.messaging.queue.task ------------------------------------------------------------------------------


class Payload(BaseModel):
    user_id: int


@pytest.mark.parametrize("bad", ["Users.Send", "users", "users.send-mail", "users.Send", ".send",
                                 "users.", "users.send.mail", "1users.send", "users._send"])
def test_task_names_must_be_module_dot_verb_in_snake_case(bad: str) -> None:
    with pytest.raises(ValueError, match=r"<module>\.<verb>"):
        task(bad)


def test_a_task_must_be_async() -> None:
    def not_async(ctx: JobContext, payload: Payload) -> None:
        pass

    with pytest.raises(TypeError, match="async def"):
        task("users.send_mail")(not_async)  # type: ignore[arg-type]


def test_a_task_takes_exactly_a_context_and_a_payload() -> None:
    async def three(ctx: JobContext, payload: Payload, extra: int) -> None:
        pass

    with pytest.raises(TypeError, match=r"users\.send_mail"):
        task("users.send_mail")(three)  # type: ignore[arg-type]


def test_a_task_validates_its_payload_by_annotation() -> None:
    async def send(ctx: JobContext, payload: Payload) -> None:
        pass

    declared = task("users.send_mail", max_retries=2, time_limit_ms=1000)(send)

    assert isinstance(declared, Task)
    assert declared.name == "users.send_mail"
    assert declared.module == "users"
    assert declared.fn is send
    assert (declared.max_retries, declared.time_limit_ms) == (2, 1000)
    assert declared.payload.validate_python({"user_id": 7}) == Payload(user_id=7)
    with pytest.raises(ValueError, match="user_id"):
        declared.payload.validate_python({"user": 7})
