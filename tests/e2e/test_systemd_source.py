"""Reading units over D-Bus from a real systemd: properties, drop-ins, discovery, errors."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.harness.agent import agent_python, agentctl
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

FAKE_GUNICORN = "#!/bin/sh\nexec sleep infinity\n"
READ = """
import json, dataclasses
from agent.privileged.sources.systemd import SystemdSource
s = SystemdSource()
print(json.dumps(dataclasses.asdict(s.read_unit({name!r}))))
"""


@pytest.fixture
def sb(make_sandbox: Callable[[], Sandbox]) -> Sandbox:
    sandbox = make_sandbox()
    sandbox.add_file("/opt/app/venv/bin/gunicorn", FAKE_GUNICORN, mode=0o755)
    sandbox.add_file("/opt/app/venv/pyvenv.cfg", "home = /usr/bin\n")
    sandbox.add_file("/etc/app/env", "DATABASE_URL=postgresql://app:pw@127.0.0.1/app\n")
    sandbox.add_unit("gunicorn.service", """[Unit]
Description=app
[Service]
User=www-data
Group=www-data
SupplementaryGroups=adm
WorkingDirectory=-/opt/app
Environment="FLASK_APP=wsgi.py" 'GREETING=hello world'
EnvironmentFile=/etc/app/env
EnvironmentFile=-/etc/app/optional.env
ExecStart=/opt/app/venv/bin/gunicorn --workers 2 wsgi:app
""", dropins={"override.conf": "[Service]\nEnvironment=EXTRA=1\nExecStart=\n"
              "ExecStart=/opt/app/venv/bin/gunicorn --workers 3 wsgi:application\n"})
    sandbox.add_unit("gunicorn@.service", "[Service]\nExecStart=/opt/app/venv/bin/gunicorn %i:app\n")
    sandbox.add_unit("wrapped.service",
                     "[Service]\nExecStart=/bin/sh -c 'cd /opt/app && exec venv/bin/gunicorn w:a'\n")
    sandbox.add_unit("other.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    sandbox.boot()
    sandbox.systemctl("start", "gunicorn.service", "gunicorn@shop.service",
                      "gunicorn@blog.service", "wrapped.service", "other.service")
    return sandbox


def test_unit_properties_as_systemd_applies_them(sb: Sandbox) -> None:
    props = agent_python(sb, READ.format(name="gunicorn"))
    assert props["name"] == "gunicorn.service"
    assert props["active_state"] == "active"
    assert props["environment"] == ["FLASK_APP=wsgi.py", "GREETING=hello world", "EXTRA=1"]
    assert props["environment_files"] == [["/etc/app/env", False],
                                          ["/etc/app/optional.env", True]]
    # The drop-in reset ExecStart= and replaced it: exactly one command, the drop-in's.
    assert [c["argv"] for c in props["exec_start"]] == [
        ["/opt/app/venv/bin/gunicorn", "--workers", "3", "wsgi:application"]]
    assert props["drop_in_paths"] == ["/etc/systemd/system/gunicorn.service.d/override.conf"]
    assert props["user"] == "www-data" and props["group"] == "www-data"
    assert props["supplementary_groups"] == ["adm"]
    assert props["working_directory"] in ("!/opt/app", "-/opt/app")
    assert props["main_pid"] == sb.main_pid("gunicorn.service")
    assert abs(props["exec_main_start_timestamp"] - time.time()) < 60
    assert props["need_daemon_reload"] is False


def test_need_daemon_reload_after_editing_the_unit_file(sb: Sandbox) -> None:
    path = "/etc/systemd/system/gunicorn.service"
    sb.write_file(path, sb.path(path).read_text() + "\n# edited\n")
    assert agent_python(sb, READ.format(name="gunicorn.service"))["need_daemon_reload"] is True
    sb.systemctl("daemon-reload")
    assert agent_python(sb, READ.format(name="gunicorn.service"))["need_daemon_reload"] is False


DISCOVER = ("import json\nfrom agent.privileged.sources.systemd import SystemdSource\n"
            "print(json.dumps(SystemdSource().discover({args})))")


def test_discovery_finds_every_gunicorn_service(sb: Sandbox) -> None:
    found = agent_python(sb, DISCOVER.format(args=""))
    assert found[0] == "gunicorn.service"
    assert set(found) == {"gunicorn.service", "gunicorn@shop.service", "gunicorn@blog.service",
                          "wrapped.service"}
    patterned = agent_python(sb, DISCOVER.format(
        args="names=['other'], patterns=['gunicorn@s*'], discover_gunicorn=False"))
    assert patterned == ["other.service", "gunicorn@shop.service"]


def test_a_stopped_gunicorn_service_is_still_watched(sb: Sandbox) -> None:
    sb.systemctl("stop", "gunicorn.service")
    found = agent_python(sb, DISCOVER.format(args=""))
    assert found[0] == "gunicorn.service"  # exactly what the admin needs to hear about


def test_discovery_without_gunicorn_service(make_sandbox: Callable[[], Sandbox]) -> None:
    sandbox = make_sandbox()
    sandbox.add_file("/opt/app/venv/bin/gunicorn", FAKE_GUNICORN, mode=0o755)
    sandbox.add_unit("shop.service", "[Service]\nExecStart=/opt/app/venv/bin/gunicorn shop:app\n")
    sandbox.boot()
    # Nothing runs gunicorn yet: "gunicorn.service not found" beats an empty answer.
    assert agent_python(sandbox, DISCOVER.format(args="")) == ["gunicorn.service"]
    sandbox.systemctl("start", "shop.service")
    assert agent_python(sandbox, DISCOVER.format(args="")) == ["shop.service"]


def test_unknown_unit_is_one_clear_line(sb: Sandbox) -> None:
    proc = agentctl(sb, "context", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "agentctl: unit nope.service not found"
    assert proc.stdout == ""


def test_no_dbus_is_one_clear_line(sb: Sandbox) -> None:
    proc = agentctl(sb, "env", "gunicorn", user="nobody", group="nogroup",
                    env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "cannot reach systemd over D-Bus" in proc.stderr


def test_unreadable_env_file_is_one_clear_line(sb: Sandbox) -> None:
    sb.path("/etc/app/env").chmod(0o600)
    proc = agentctl(sb, "env", "gunicorn", user="nobody", group="nogroup")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("agentctl: cannot read /etc/app/env: permission denied "
                                   "(run agentctl as root)")
    assert proc.stdout == ""


def test_reveal_needs_root(sb: Sandbox) -> None:
    proc = agentctl(sb, "env", "gunicorn", "--reveal", user="nobody", group="nogroup")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "agentctl: --reveal shows secrets and is for root only"
    assert "pw" not in proc.stdout
