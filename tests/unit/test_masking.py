"""Masking against the real parsers: whatever libpq or SQLAlchemy read as the password never
appears in what driftwatch shows (literal edges, then generated URLs and conninfo strings)."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg2.extensions import parse_dsn
from sqlalchemy.engine import make_url

from agent.secrets import MASK, mask_argv, mask_environment, mask_url, mask_value

PW = "Hunter2xyz"


@pytest.mark.parametrize(("text", "shown"), [
    # empty user
    (f"redis://:{PW}@cache:6379/0", f"redis://:{MASK}@cache:6379/0"),
    # upper-case query parameter names
    (f"postgresql://app@db/prod?PASSWORD={PW}", f"postgresql://app@db/prod?PASSWORD={MASK}"),
    (f"postgresql://app@db/prod?sslmode=require&SSLPassword={PW}&x=1",
     f"postgresql://app@db/prod?sslmode=require&SSLPassword={MASK}&x=1"),
    # unencoded '@', '/', '?', '#', ':' in the password
    (f"postgresql://app:{PW}@x@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql://app:a/{PW}@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql://app:a?{PW}@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql://app:a#{PW}@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql://app:a:{PW}@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql+psycopg2://app:{quote(PW + '@/')}@db:5432/prod",
     f"postgresql+psycopg2://app:{MASK}@db:5432/prod"),
    # libpq key=value strings
    (f"host=db dbname=prod user=app password={PW}", f"host=db dbname=prod user=app password={MASK}"),
    (f"host=db password = '{PW} with spaces' user=app",
     f"host=db password = '{MASK}' user=app"),
    (f"password='it\\'s {PW}' host=db", f"password='{MASK}' host=db"),
    (f"host=db sslpassword={PW}", f"host=db sslpassword={MASK}"),
    (f"host=db password='unclosed {PW}", f"host=db password={MASK}"),
    # a URL inside a message
    (f'could not connect to "postgresql://app:{PW}@db/prod": refused',
     f'could not connect to "postgresql://app:{MASK}@db/prod": refused'),
    # nothing to mask
    ("postgresql://app@db/prod?sslmode=require", "postgresql://app@db/prod?sslmode=require"),
    ("postgresql:///prod?host=/run/postgresql", "postgresql:///prod?host=/run/postgresql"),
    ("host=db dbname=prod user=app", "host=db dbname=prod user=app"),
])
def test_mask_url_edges(text: str, shown: str) -> None:
    masked = mask_url(text)
    assert masked == shown
    assert PW not in masked


@pytest.mark.parametrize("value", [
    f"https://{PW}@o1.ingest.sentry.io/1",           # a Sentry DSN: the key is the user
    f"postgresql://app:{PW}@db/prod",
    PW, f"'{PW}'", "x" * 3,
])
@pytest.mark.parametrize("name", ["SECRET_KEY", "SENTRY_DSN", "DB_PASSWORD", "PGPASSWORD",
                                  "API_TOKEN", "aws_secret_access_key"])
def test_secret_names_are_masked_whatever_the_value(name: str, value: str) -> None:
    assert mask_value(name, value) == MASK


def test_empty_secret_stays_empty() -> None:
    assert mask_value("SECRET_KEY", "") == ""


def test_plain_names_keep_their_value_but_not_passwords() -> None:
    assert mask_value("FLASK_APP", "wsgi:app") == "wsgi:app"
    assert mask_value("DATABASE_URL", f"postgresql://app:{PW}@db/prod") == \
        f"postgresql://app:{MASK}@db/prod"
    assert mask_value("DATABASE_URL", f"host=db password={PW}") == f"host=db password={MASK}"
    assert mask_value("OPTIONS", "-c statement_timeout=5s") == "-c statement_timeout=5s"


def test_mask_environment() -> None:
    env = {"DATABASE_URL": f"postgresql://u:{PW}1@h/d", "SECRET_KEY": f"{PW}2",
           "SENTRY_DSN": f"https://{PW}3@sentry/1", "FLASK_APP": "wsgi"}
    shown = mask_environment(env)
    assert PW not in str(shown)
    assert shown["FLASK_APP"] == "wsgi"


@pytest.mark.parametrize(("argv", "shown"), [
    (["gunicorn", "-e", f"SECRET_KEY={PW}", "wsgi:app"],
     ["gunicorn", "-e", f"SECRET_KEY={MASK}", "wsgi:app"]),
    (["gunicorn", "--env", f"DATABASE_URL=postgresql://u:{PW}@h/d", "wsgi:app"],
     ["gunicorn", "--env", f"DATABASE_URL=postgresql://u:{MASK}@h/d", "wsgi:app"]),
    (["gunicorn", f"--env=API_TOKEN={PW}"], ["gunicorn", f"--env=API_TOKEN={MASK}"]),
    (["gunicorn", f"-eSECRET_KEY={PW}"], ["gunicorn", f"-eSECRET_KEY={MASK}"]),
    (["env", f"PGPASSWORD={PW}", "gunicorn"], ["env", f"PGPASSWORD={MASK}", "gunicorn"]),
    (["/bin/sh", "-c", f"exec gunicorn -e SECRET_KEY={PW} -e 'DB_PASSWORD={PW} x' app:app"],
     ["/bin/sh", "-c", f"exec gunicorn -e 'SECRET_KEY={MASK}' -e 'DB_PASSWORD={MASK}' app:app"]),
    (["gunicorn", "-e", "FLASK_ENV=production", "-w", "2"],
     ["gunicorn", "-e", "FLASK_ENV=production", "-w", "2"]),
])
def test_mask_argv(argv: list[str], shown: list[str]) -> None:
    masked = mask_argv(argv)
    assert PW not in " ".join(masked)
    assert masked == shown


# -- generated: every URL form SQLAlchemy and libpq accept ---------------------------------
# Passwords as people write them: any printable characters, unencoded or percent-encoded.
PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&()*+,-./:;<=>?@[]^_{|}~",
                    min_size=6, max_size=24).filter(lambda p: any(c.isalnum() for c in p))
USERS = st.sampled_from(["", "app", "app_user", "a.b-c", "u%40x"])
HOSTS = st.sampled_from(["db", "db.example.com", "10.0.0.5", "[::1]", "db:5432", "h1:5432,h2"])
SCHEMES = st.sampled_from(["postgresql", "postgres", "postgresql+psycopg2",
                           "postgresql+psycopg", "mysql+pymysql", "redis"])
SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow])


def _shown_everywhere(name: str, value: str) -> list[str]:
    """Every rendering of a value driftwatch has: a URL-ish string, an env var, an argv."""
    message = mask_url(f"error: could not use {value} (refused)")
    assert message.startswith("error: could not use ") and message.endswith(" (refused)")
    return [mask_url(value), mask_value(name, value), " ".join(mask_argv(["-e", f"{name}={value}"])),
            " ".join(mask_argv([value])), message[len("error: could not use "):-len(" (refused)")]]


def _leaks(secret: str, texts: list[str]) -> bool:
    return any(form in text for text in texts
               for form in {secret, quote(secret, safe=""), quote(secret)})


@given(scheme=SCHEMES, user=USERS, password=PASSWORDS, host=HOSTS,
       encode=st.booleans(), db=st.sampled_from(["", "/prod", "/my-db"]),
       query=st.sampled_from(["", "?sslmode=require", "?application_name=x&sslmode=disable"]))
@example(scheme="postgresql", user="", password="pw@with@ats", host="db", encode=False,
         db="/prod", query="")
@SETTINGS
def test_generated_url_passwords_never_shown(scheme: str, user: str, password: str, host: str,
                                             encode: bool, db: str, query: str) -> None:
    written = quote(password, safe="") if encode else password
    url = f"{scheme}://{user}:{written}@{host}{db}{query}"
    # What the real parsers would take as the password (they may split differently).
    secrets = {password, written}
    try:
        parsed = make_url(url).password
        if parsed:
            secrets.add(str(parsed))
    except Exception:
        pass
    shown = _shown_everywhere("DATABASE_URL", url)
    public = f"{scheme}://{user}:@{host}{db}{query}"   # a password like "applic" is in "application_name"
    for secret in secrets:
        if len(secret) >= 4 and not _leaks(secret, [public]):
            assert not _leaks(secret, shown), (url, shown)


@given(password=PASSWORDS, key=st.sampled_from(["password", "sslpassword"]),
       quoted=st.booleans(), before=st.sampled_from(["", "host=db ", "host=db  dbname=x "]),
       after=st.sampled_from(["", " user=app", " sslmode=require"]))
@SETTINGS
def test_generated_conninfo_passwords_never_shown(password: str, key: str, quoted: bool,
                                                  before: str, after: str) -> None:
    if quoted:
        value = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        value = password.replace(" ", "")
        if not value or value[0] in "'":
            return
    conninfo = f"{before}{key}={value}{after}"
    try:
        parsed = parse_dsn(conninfo)
    except Exception:
        return  # libpq refuses it: nothing connects with it
    secret = parsed[key]
    shown = _shown_everywhere("DATABASE_URL", conninfo)
    # A password that is part of the key's own name ("passwo") is in "password=****" itself.
    if len(secret) >= 4 and secret not in f"{key}=":
        assert not _leaks(secret, shown), (conninfo, shown)


@given(name=st.sampled_from(["SECRET_KEY", "DB_PASSWORD", "SENTRY_DSN", "API_TOKEN",
                             "MYSQL_PWD", "STRIPE_API_KEY"]),
       value=st.text(min_size=1, max_size=40))
@SETTINGS
def test_generated_secret_named_values_never_shown(name: str, value: str) -> None:
    assert mask_value(name, value) == MASK
    assert mask_environment({name: value}) == {name: MASK}
    masked = mask_argv(["gunicorn", "-e", f"{name}={value}", "wsgi:app"])
    assert masked[2] == f"{name}={MASK}"


def test_agentctl_context_shows_no_exec_start_secret() -> None:
    import io
    import json

    from agent.cli import main as cli
    from agent.context import ContextInputs, build_context
    from agent.privileged.inspection import UnitReport
    from agent.model import ExecCommand, ProcessInfo, UnitProperties

    argv = ("/srv/venv/bin/gunicorn", "-e", f"SECRET_KEY={PW}", f"--env=DB_PASSWORD={PW}",
            "-e", f"DATABASE_URL=postgresql://app:{PW}@db/prod", "wsgi:app")
    p = UnitProperties(name="gunicorn.service", load_state="loaded", active_state="active",
                       sub_state="running", exec_start=(ExecCommand(argv[0], argv),))
    ctx = build_context(p, ContextInputs(venvs={"/srv/venv": True}))
    proc = ProcessInfo(pid=10, ppid=1, role="master", argv=argv, exe="/usr/bin/python3",
                       cwd="/", create_time=0.0, username="www-data")
    report = UnitReport(p, ctx, [proc])

    class NoSystemd:
        def close(self) -> None:
            """Nothing to release."""

    for extra in ([], ["--json"]):
        out = io.StringIO()
        original = cli.inspect_unit
        cli.inspect_unit = lambda systemd, name: report  # type: ignore[assignment]
        try:
            cli.main(["context", "gunicorn", *extra], out=out, systemd=NoSystemd())  # type: ignore[arg-type]
        finally:
            cli.inspect_unit = original  # type: ignore[assignment]
        assert PW not in out.getvalue()
        assert "SECRET_KEY" in out.getvalue()
    data = json.loads(out.getvalue())
    assert data["exec_start"][2] == f"SECRET_KEY={MASK}"
    assert data["processes"][0]["argv"][5] == f"DATABASE_URL=postgresql://app:{MASK}@db/prod"


@pytest.mark.parametrize(("text", "shown"), [
    # libpq: a backslash escapes in unquoted values too
    (f"host=db password={PW}\\ more user=app", f"host=db password={MASK} user=app"),
    # a space in a URL password: only SQLAlchemy's own parse finds it (the parser net)
    (f"postgresql://app:{PW} more@db/prod", f"postgresql://app:{MASK}@db/prod"),
    (f"postgresql://app:x {PW}@db/prod", f"postgresql://app:{MASK}@db/prod"),
    # percent-encoded and raw forms of what the parser read are both hidden
    (f"postgresql://app:{PW}%20more@db/prod?x=1", f"postgresql://app:{MASK}@db/prod?x=1"),
    # a short password found by the net is not replaced inside other words
    ("postgresql://app:p g@db/postgres", f"postgresql://app:{MASK}@db/postgres"),
])
def test_parser_net(text: str, shown: str) -> None:
    assert mask_url(text) == shown


def test_quoted_values_keep_their_quotes() -> None:
    assert mask_url("password=''") == f"password='{MASK}'"
    assert mask_url("password='x'") == f"password='{MASK}'"
    assert mask_url('password="x"') == f'password="{MASK}"'
    assert mask_url("password='") == f"password={MASK}"
    assert mask_url("password=x'") == f"password={MASK}"


def test_argv_forms_mask_exactly() -> None:
    assert mask_argv(["/bin/sh", "-c", "gunicorn # password=x"]) == \
        ["/bin/sh", "-c", f"gunicorn '#' 'password={MASK}'"]
    assert mask_argv(["sh", "-c", "echo 'unbalanced password=x"]) == \
        ["sh", "-c", f"echo 'unbalanced password={MASK}"]
    assert mask_argv(["gunicorn", "-c", "password=x"]) == ["gunicorn", "-c", f"password={MASK}"]
    assert mask_argv(["gunicorn", "-e"]) == ["gunicorn", "-e"]
    assert mask_argv(["gunicorn", "-e", "JUSTANAME", "-w", "2"]) == \
        ["gunicorn", "-e", "JUSTANAME", "-w", "2"]
    assert mask_argv(["gunicorn", "--env", f"TOKEN={PW}", "--ENV", f"TOKEN={PW}"]) == \
        ["gunicorn", "--env", f"TOKEN={MASK}", "--ENV", f"TOKEN={MASK}"]
    assert mask_argv(["gunicorn", f"--envx=TOKEN={PW}"]) == ["gunicorn", f"--envx=TOKEN={MASK}"]
