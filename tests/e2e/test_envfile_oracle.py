"""agent.envfile against the real systemd as oracle: every file, what the service really got.

One sandbox per test; every case is a template instance envcase@ID.service whose
EnvironmentFile= is /etc/envcases/ID.env, all started with one systemctl call. Type=exec
makes the start job wait for execve(), so /proc/MAINPID/environ is the service's own.
"""

from __future__ import annotations

import itertools
import resource
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent.envfile import (
    MAX_ARG_STRLEN,
    EnvFileError,
    EnvFileResult,
    environment_origins,
    execve_problem,
    load_environment_files,
    merge_environment,
    parse_env_file,
)
from tests.harness.sandbox import Sandbox

pytestmark = pytest.mark.systemd

TEMPLATE = """[Unit]
Description=envfile oracle case %i

[Service]
Type=exec
EnvironmentFile=/etc/envcases/%i.env
ExecStart=/bin/sleep infinity
"""
BASELINE = "baseline"  # an empty file: what systemd adds by itself


@dataclass(frozen=True)
class Outcome:
    """What one started unit ended up as."""

    unit: str
    active: bool
    result: str
    exec_status: str
    environ: tuple[tuple[str, str], ...]  # in the process's order

    def env(self) -> dict[str, str]:
        """The process environment as a dict."""
        return dict(self.environ)


def unit_name(case_id: str) -> str:
    """The template instance for one case."""
    return f"envcase@{case_id}.service"


def read_environ(sb: Sandbox, pid: int) -> tuple[tuple[str, str], ...]:
    """A sandbox process's environment block, NUL separated, as (name, value) pairs."""
    raw = sb.path(f"/proc/{pid}/environ").read_bytes()
    pairs = []
    for item in raw.split(b"\0"):
        if item:
            name, _, value = item.decode("utf-8").partition("=")
            pairs.append((name, value))
    return tuple(pairs)


def start_all(sb: Sandbox, units: list[str]) -> dict[str, Outcome]:
    """Start every unit in one call and collect each one's state and environment."""
    sb.systemctl("start", *units, check=False)  # non-zero when any failed: expected here
    shown = sb.systemctl("show", "-p", "Id,ActiveState,Result,MainPID,ExecMainStatus",
                         *units).stdout
    outcomes = {}
    for block in shown.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        active = props["ActiveState"] == "active"
        environ = read_environ(sb, int(props["MainPID"])) if active else ()
        outcomes[props["Id"]] = Outcome(props["Id"], active, props["Result"],
                                        props["ExecMainStatus"], environ)
    assert set(outcomes) == set(units), shown
    return outcomes


def stop_all(sb: Sandbox, units: list[str]) -> None:
    """Stop the units and forget the failed ones, in one call into the sandbox."""
    sb.run(["sh", "-c", 'systemctl stop "$@"; systemctl reset-failed "$@"; true', "sh",
            *units])


def sandbox_arg_max(sb: Sandbox) -> int:
    """sysconf(_SC_ARG_MAX) for the sandbox's PID 1: glibc's max(128 KiB, stack limit / 4)."""
    for line in sb.path("/proc/1/limits").read_text().splitlines():
        if line.startswith("Max stack size"):
            soft = line.split()[3]
            return 2**62 if soft == "unlimited" else max(131072, int(soft) // 4)
    raise AssertionError("no stack limit in /proc/1/limits")


def predict(data: bytes, arg_max: int) -> EnvFileResult | None:
    """Our parser's view: the file's result, or None when systemd should refuse the file."""
    try:
        return parse_env_file(data, arg_max=arg_max)
    except EnvFileError:
        return None


def show(data: bytes, limit: int = 400) -> str:
    """A file's bytes for a failure message, shortened when huge."""
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"


def mismatch(case: str, data: bytes, outcome: Outcome, baseline: dict[str, str],
             arg_max: int) -> str | None:
    """Why systemd's outcome differs from the prediction, or None when they agree."""
    predicted = predict(data, arg_max)
    if predicted is None:
        if outcome.active or outcome.result != "resources":
            return (f"{case}: predicted refusal, systemd gave active={outcome.active} "
                    f"result={outcome.result} for {show(data)}")
        return None
    exec_error = execve_problem(merge_environment([], [("f", predicted.assignments)]))
    if exec_error:
        if outcome.active or outcome.exec_status != "203":
            return (f"{case}: predicted an execve() failure ({exec_error}), systemd gave "
                    f"active={outcome.active} status={outcome.exec_status}")
        return None
    if not outcome.active:
        return (f"{case}: systemd failed the unit (result={outcome.result} "
                f"status={outcome.exec_status}) but we predicted success for {show(data)}")
    expected = predicted.as_dict()
    actual = outcome.env()
    # Drop what systemd adds by itself (PATH, INVOCATION_ID, ...) unless the file set it.
    got = {k: v for k, v in actual.items() if k not in baseline or k in expected}
    if got != expected:
        return f"{case}: systemd {got!r} != parser {expected!r} for {show(data)}"
    # Order: systemd appends the file's names after its own, first position wins.
    got_order = [k for k, _ in outcome.environ if k in expected and k not in baseline]
    want_order = [k for k in predicted.names if k not in baseline]
    if got_order != want_order:
        return f"{case}: order {got_order} != {want_order} for {show(data)}"
    return None


def boot_cases(make_sandbox: Callable[[], Sandbox], cases: dict[str, bytes]) -> Sandbox:
    """A booted sandbox holding the template and one env file per case (plus baseline)."""
    sb = make_sandbox()
    sb.add_unit("envcase@.service", TEMPLATE)
    sb.add_file(f"/etc/envcases/{BASELINE}.env", b"")
    for case_id, data in cases.items():
        sb.add_file(f"/etc/envcases/{case_id}.env", data)
    return sb.boot()


BIG = 3 * 1024 * 1024          # over ARG_MAX-3 (2 MiB with an 8 MiB stack): systemd drops it
MEDIUM = 200 * 1024            # under ARG_MAX but over MAX_ARG_STRLEN: execve() says E2BIG

HAND_CASES: dict[str, bytes] = {
    "basic": b"A=1\nB=two words\n",
    "comments": b"# c\n; c2\n  # indented\n\t; tabbed\nA=1 # not a comment\nB=x;y\n",
    "blank": b"\n\n   \n\t\nA=1\n\n\n",
    "spaces-around": b"  A  =  1  \nB\t=\t2\t\n   C=3\n",
    "export": b"export A=1\nexport\tB=2\nC=3\nexport\n",
    "unquoted-escapes": b"A=a\\tb\nB=a\\\\b\nC=\\ lead\nD=trail\\ \nE=a\\\"b\nF=\\'x\\'\n",
    "single-quotes": b"A='a b  '\nB='a\\nb'\nC='it''s'\nD='x\ny'\nE='#;'\n",
    "double-quotes": (b'A="a\\"b"\nB="a\\\\b"\nC="a\\$b"\nD="a\\`b"\nE="a\\nb"\n'
                      b'F="a\\tb"\nG="a\\\'b"\nH="  pad  "\n'),
    "double-multiline": b'A="line1\nline2"\nB=after\n',
    "continuation": b"A=a\\\nb\nB=c   \\\n  d  \nC=\\\n\nD=x\n",
    "continuation-dq": b'A="a\\\nb"\nB="c\\\n"\n',
    "continuation-sq": b"A='a\\\nb'\n",
    "comment-continues": b"# comment \\\nA=swallowed\nB=kept\n",
    "comment-continues-twice": b"; one \\\ntwo \\\nA=swallowed\nB=kept\n",
    "comment-escape-crlf": b"# c \\\r\nA=1\r\n",
    "comment-double-backslash": b"# c \\\\\nA=1\n",
    "no-equals": b"JUSTANAME\nA=1\nanother line here\n=novalue\n",
    "invalid-names": ("1A=x\nA-B=x\nA.B=x\nÄ=x\nA B=x\n_ok=1\nok_2=2\n\"Q\"=x\n=A=1\n"
                      "A$=1\n").encode(),
    "crlf": b"A=1\r\nB='q'\r\nC=\"x\"\r\nD=  y  \r\n",
    "cr-in-quotes": b"A=\"x\ry\"\nB='x\ry'\n",
    "lone-cr": b"A\rB=1\nC=2\rD=3\n",
    "no-final-newline": b"A=1\nB=last",
    "no-final-newline-spaces": b"A=1\nB=last   ",
    "eof-backslash": b"A=abc  \\",
    "eof-dq-backslash": b'A="abc\\',
    "unterminated-dq": b'A="abc\nB=1\n',
    "unterminated-sq": b"A='abc\nB=1",
    "duplicates": b"A=1\nB=1\nA=2\nC=3\nB=\n",
    "equals-in-value": b"A=b=c\nB===\nC=\nD=x=\n",
    "empty-values": b"A=\nB=''\nC=\"\"\nD=   \nE=''  \n",
    "quotes-mid-value": b"A=a\"b\"c\nB=a'b'c\nC=\"x\"y\nD='x' 'y'\nE=\"x\" y z \nF=\"a\"'b'\n",
    "unicode": "A=héllo wörld ✓\nB='日本'\nC=😀\nD=\"ß\\ü\"\n".encode(),
    "bom": b"\xef\xbb\xbfA=1\nB=2\n",
    "nul": b"A=1\nB=\x00x\n",
    "nul-in-comment": b"# \x00\nA=1\n",
    "bad-utf8-value": b"A=1\nB=\xff\n",
    "bad-utf8-key": b"\xffA=1\nB=2\n",
    "bad-utf8-comment": b"# \xff\xfe\nA=1\n",
    "bad-utf8-no-equals": b"\xff\nA=1\n",
    "bad-utf8-swallowed": b"# c\\\nB=\xff\nA=1\n",
    "noncharacter-fffe": "A=\ufffe\n".encode(),
    "noncharacter-fdd0": "A=x\ufdd0\n".encode(),
    "noncharacter-plane1": "A=\U0001fffe\n".encode("utf-8"),
    "surrogate": b"A=\xed\xa0\x80\n",
    "overlong": b"A=\xc0\xaf\n",
    "tabs": b"A=\ta\tb\t\n",
    "control-chars": b"A=a\x1bb\x7fc\x01\n",
    "quoted-key": b"\"A\"=1\n'B'=2\n",
    "semicolon-mid": b"A=1;B=2\n  ;C=3\n",
    "leading-ws-quote": b"A=  'x'\nB=\t\"y\"\n",
    "crlf-continuation": b"A=a\\\r\nb\r\nC=1\r\n",
    "crlf-continuation-dq": b'A="a\\\r\nb"\r\n',
    "tab-in-key": b"A\tB=1\nC\t=2\n",
    "double-equals": b"A==1\n",
    "no-expansion": b"A=$HOME ${B} %i $$ \\$x\nB=\"$HOME\"\n",
    "override-path": b"PATH=/custom/bin\nLANG=xx\n",
    "lowercase": b"lower=1\n_=2\n__x9=3\n",
    "only-comments": b"# nothing\n",
    "empty": b"",
    "long-name": b"N" * 5000 + b"=1\n",
    "big-value-dropped": b"A=short\nB=1\nA=" + b"x" * BIG + b"\n",
    "medium-value-e2big": b"A=" + b"y" * MEDIUM + b"\n",
    # The kernel's per-string limit, exactly: "A=" + value + NUL == MAX_ARG_STRLEN fits.
    "value-at-kernel-limit": b"A=" + b"z" * (MAX_ARG_STRLEN - 3) + b"\n",
    "value-over-kernel-limit": b"A=" + b"z" * (MAX_ARG_STRLEN - 2) + b"\n",
    "comment-after-quote": b"A='x' # c\nB=\"y\";z\n",
}


def arg_max_cases(arg_max: int) -> dict[str, bytes]:
    """systemd's own ARG_MAX bounds: at the bound kept (then E2BIG), one past it dropped."""
    return {"name4-at-arg-max": b"ABCD=" + b"v" * (arg_max - 6) + b"\n",
            "name4-over-arg-max": b"ABCD=" + b"v" * (arg_max - 5) + b"\nB=1\n"}


def host_arg_max() -> int:
    """sysconf(_SC_ARG_MAX) the sandbox's PID 1 will have: it inherits our stack limit."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return 2**62 if soft == resource.RLIM_INFINITY else max(131072, soft // 4)


def test_hand_written_cases_match_systemd(make_sandbox: Callable[[], Sandbox]) -> None:
    """Every rule, one file each, all in one sandbox, compared with the real systemd."""
    cases = dict(HAND_CASES)
    if host_arg_max() < 16 * 1024 * 1024:  # keep the files small enough to write quickly
        cases.update(arg_max_cases(host_arg_max()))
    ids = {name: f"h{i:02d}" for i, name in enumerate(cases)}
    sb = boot_cases(make_sandbox, {ids[n]: data for n, data in cases.items()})
    arg_max = sandbox_arg_max(sb)
    assert arg_max == host_arg_max()
    units = [unit_name(BASELINE)] + [unit_name(i) for i in ids.values()]
    outcomes = start_all(sb, units)
    baseline = outcomes[unit_name(BASELINE)].env()
    assert "INVOCATION_ID" in baseline  # sanity: the baseline really came from systemd

    problems = [problem for name, data in cases.items()
                if (problem := mismatch(name, data, outcomes[unit_name(ids[name])],
                                        baseline, arg_max))]
    assert not problems, "\n".join(problems)

    # The surprising rules, spelled out so a regression reads clearly.
    env = {name: outcomes[unit_name(ids[name])].env() for name in cases}
    assert "A" not in env["comment-continues"] and env["comment-continues"]["B"] == "kept"
    assert "A" not in env["export"] and env["export"]["C"] == "3"
    assert env["double-quotes"]["E"] == "a\\nb" and env["double-quotes"]["A"] == 'a"b'
    assert env["quotes-mid-value"]["C"] == "xy" and env["quotes-mid-value"]["A"] == 'a"b"c'
    assert env["override-path"]["PATH"] == "/custom/bin"
    assert "A" not in env["big-value-dropped"] and env["big-value-dropped"]["B"] == "1"
    assert env["no-expansion"]["A"] == "$HOME ${B} %i $$ $x"
    for refused in ("nul", "bad-utf8-value", "bad-utf8-key", "noncharacter-fffe",
                    "surrogate", "overlong"):
        assert not outcomes[unit_name(ids[refused])].active, refused
    # Bad bytes inside a comment (or a line the comment swallowed) are never checked.
    assert env["bad-utf8-swallowed"] == {**env["bad-utf8-swallowed"], "A": "1"}
    assert "B" not in env["bad-utf8-swallowed"]
    assert not outcomes[unit_name(ids["medium-value-e2big"])].active
    assert outcomes[unit_name(ids["value-at-kernel-limit"])].active
    assert not outcomes[unit_name(ids["value-over-kernel-limit"])].active
    assert env["comment-after-quote"]["A"] == "x# c"
    if "name4-at-arg-max" in cases:
        assert not outcomes[unit_name(ids["name4-at-arg-max"])].active
        assert env["name4-over-arg-max"] == {**env["name4-over-arg-max"], "B": "1"}
        assert "ABCD" not in env["name4-over-arg-max"]


# -- generated files ---------------------------------------------------------------------

VALID_NAMES = ["A", "B", "C", "_c", "d9", "Long_Name_2", "PATH_X", "e"]
INVALID_NAMES = ["9x", "a-b", "a b", "ä", "a.b", "$A", ""]
PLAIN = st.sampled_from(["x", "y", "0", " ", "\t", "=", "#", ";", "$", "`", "é", "✓",
                         "😀", "a b", "{", "}", "%"])
QUOTED_CHARS = st.sampled_from(["x", " ", "\n", "\r", "\\", "\\\\", "\\\"", "\\$", "\\`",
                                "\\n", "\\\n", "'", "é", "#", "="])


@st.composite
def value_parts(draw: st.DrawFn) -> str:
    """An unquoted / quoted / escaped mixture, biased to what the scanner treats specially."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["plain", "plain", "sq", "dq", "esc", "cont", "ws"]))
        if kind == "plain":
            parts.append(draw(PLAIN))
        elif kind == "sq":
            body = "".join(draw(st.lists(QUOTED_CHARS, max_size=4))).replace("'", "")
            parts.append(f"'{body}" + draw(st.sampled_from(["'"] * 7 + [""])))
        elif kind == "dq":
            body = "".join(draw(st.lists(QUOTED_CHARS, max_size=4)))
            parts.append(f'"{body}' + draw(st.sampled_from(['"'] * 7 + [""])))
        elif kind == "esc":
            parts.append("\\" + draw(st.sampled_from(["x", " ", "\\", "'", '"', "#", "\t",
                                                        "\r", "é"])))
        elif kind == "cont":
            parts.append(draw(st.sampled_from(["\\\n", "\\\r\n"])))
        else:
            parts.append(draw(st.sampled_from([" ", "  ", "\t"])))
    return "".join(parts)


@st.composite
def env_line(draw: st.DrawFn) -> str:
    """One line of an env file, terminator included."""
    kind = draw(st.sampled_from(["assign", "assign", "assign", "assign", "comment",
                                 "blank", "name-only", "junk"]))
    ws = st.sampled_from(["", "", " ", "\t", "  "])
    if kind == "assign":
        name = draw(st.sampled_from(VALID_NAMES * 4 + INVALID_NAMES))
        export = draw(st.sampled_from(["", "", "", "", "export "]))
        text = (draw(ws) + export + name + draw(ws) + "=" + draw(ws) + draw(value_parts())
                + draw(ws))
    elif kind == "comment":
        text = (draw(ws) + draw(st.sampled_from(["#", ";"])) + draw(PLAIN)
                + draw(st.sampled_from(["", "", "\\", "\\\\", " A=1"])))
    elif kind == "blank":
        text = draw(ws)
    elif kind == "name-only":
        text = draw(ws) + draw(st.sampled_from(VALID_NAMES)) + draw(ws)
    else:
        text = "".join(draw(st.lists(st.sampled_from(["A", "=", "'", '"', "\\", " ", "#",
                                                      "\r", "x"]), max_size=6)))
    return text + draw(st.sampled_from(["\n", "\n", "\n", "\n", "\r\n", "\\\n", "\r"]))


@st.composite
def env_file(draw: st.DrawFn) -> bytes:
    """A whole file: lines, maybe no final newline, rarely a byte systemd refuses."""
    text = "".join(draw(st.lists(env_line(), min_size=1, max_size=12)))
    if draw(st.integers(0, 3)) == 0:
        text = text.rstrip("\n")
    data = text.encode("utf-8")
    spoil = draw(st.sampled_from([b""] * 27 + [b"\0", b"\xff", "\ufffe".encode()]))
    if spoil:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + spoil + data[at:]
    return data


def test_generated_files_match_systemd(make_sandbox: Callable[[], Sandbox]) -> None:
    """Property: for grammar-generated files, the parser agrees with systemd exactly."""
    sb = boot_cases(make_sandbox, {})
    arg_max = sandbox_arg_max(sb)
    baseline = start_all(sb, [unit_name(BASELINE)])[unit_name(BASELINE)].env()
    counter = itertools.count()
    checked: list[int] = []
    stats = {"refused": 0, "assignments": 0, "warnings": 0}

    @settings(max_examples=12, derandomize=True, database=None, deadline=None,
              # No shrinking: each try costs a batch of real unit starts, and the failure
              # message already quotes the exact file(s) that disagree.
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(env_file(), min_size=20, max_size=20))
    def check(batch: list[bytes]) -> None:
        ids = [f"g{next(counter)}" for _ in batch]
        for case_id, data in zip(ids, batch, strict=True):
            sb.write_file(f"/etc/envcases/{case_id}.env", data)
        outcomes = start_all(sb, [unit_name(i) for i in ids])
        problems = [problem for case_id, data in zip(ids, batch, strict=True)
                    if (problem := mismatch(case_id, data, outcomes[unit_name(case_id)],
                                            baseline, arg_max))]
        checked.append(len(batch))
        for data in batch:
            predicted = predict(data, arg_max)
            stats["refused" if predicted is None else "assignments"] += (
                1 if predicted is None else len(predicted.assignments))
            stats["warnings"] += len(predicted.warnings) if predicted else 0
        stop_all(sb, [unit_name(i) for i in ids])  # keep the sandbox small between batches
        assert not problems, "\n".join(problems)

    check()
    # Guard the grammar itself: it must keep producing both outcomes and plenty to compare.
    assert sum(checked) >= 240, checked
    assert stats["refused"] >= 5 and stats["assignments"] >= 200 and stats["warnings"] >= 200, \
        stats
    print(f"{sum(checked)} generated files checked against systemd: {stats}")


# -- Environment= plus several files ------------------------------------------------------

MERGE_UNIT = """[Service]
Type=exec
Environment=A=env B=env C=env "Q=quoted value"
EnvironmentFile=/etc/envmerge/one.env
EnvironmentFile=-/etc/envmerge/missing.env
EnvironmentFile=-/etc/envmerge/refused.env
EnvironmentFile=/etc/envmerge/two.env
ExecStart=/bin/sleep infinity
"""
MERGE_ENVIRONMENT = ["A=env", "B=env", "C=env", "Q=quoted value"]  # as D-Bus lists them
MERGE_FILES = [("/etc/envmerge/one.env", False), ("/etc/envmerge/missing.env", True),
               ("/etc/envmerge/refused.env", True), ("/etc/envmerge/two.env", False)]
REQUIRED_MISSING_UNIT = """[Service]
Type=exec
Environment=A=env
EnvironmentFile=/etc/envmerge/missing.env
ExecStart=/bin/sleep infinity
"""
REQUIRED_REFUSED_UNIT = """[Service]
Type=exec
EnvironmentFile=/etc/envmerge/one.env
EnvironmentFile=/etc/envmerge/refused.env
ExecStart=/bin/sleep infinity
"""


def test_merge_order_environment_then_files(make_sandbox: Callable[[], Sandbox]) -> None:
    """Environment= first, then each EnvironmentFile= in order; '-' skips a file whole."""
    sb = make_sandbox()
    sb.add_unit("envmerge.service", MERGE_UNIT)
    sb.add_unit("envmerge-missing.service", REQUIRED_MISSING_UNIT)
    sb.add_unit("envmerge-refused.service", REQUIRED_REFUSED_UNIT)
    sb.add_unit("envcase@.service", TEMPLATE)
    sb.add_file(f"/etc/envcases/{BASELINE}.env", b"")
    sb.add_file("/etc/envmerge/one.env", b"A=one\nB=one\nE=one\n")
    # Valid lines before the bad byte: systemd still drops the whole file.
    sb.add_file("/etc/envmerge/refused.env", b"E=refused\nF=refused\nG=\xff\n")
    sb.add_file("/etc/envmerge/two.env", b"B=two\nD=two\nA=two\nA=two-again\n")
    sb.boot()
    outcomes = start_all(sb, ["envmerge.service", "envmerge-missing.service",
                              "envmerge-refused.service", unit_name(BASELINE)])
    baseline = outcomes[unit_name(BASELINE)].env()

    loaded = load_environment_files(MERGE_FILES, lambda p: sb.path(p).read_bytes())
    assert [path for path, _ in loaded] == ["/etc/envmerge/one.env", "/etc/envmerge/two.env"]
    files = [(path, result.assignments) for path, result in loaded]
    merged = merge_environment(MERGE_ENVIRONMENT, files)
    assert merged == {"A": "two-again", "B": "two", "C": "env", "Q": "quoted value",
                      "E": "one", "D": "two"}
    assert environment_origins(MERGE_ENVIRONMENT, files) == {
        "A": "/etc/envmerge/two.env", "B": "/etc/envmerge/two.env", "C": "Environment=",
        "Q": "Environment=", "E": "/etc/envmerge/one.env", "D": "/etc/envmerge/two.env"}

    actual = outcomes["envmerge.service"]
    assert actual.active, actual
    got = {k: v for k, v in actual.environ if k not in baseline or k in merged}
    assert got == merged
    # systemd's order: Environment= names first (their first position kept), then new ones.
    assert [k for k, _ in actual.environ if k in merged] == list(merged)

    # A required file that is missing or refused fails the start, as predicted.
    for unit, files_spec in (("envmerge-missing.service",
                              [("/etc/envmerge/missing.env", False)]),
                             ("envmerge-refused.service",
                              [("/etc/envmerge/one.env", False),
                               ("/etc/envmerge/refused.env", False)])):
        with pytest.raises(EnvFileError):
            load_environment_files(files_spec, lambda p: sb.path(p).read_bytes())
        assert not outcomes[unit].active and outcomes[unit].result == "resources", \
            outcomes[unit]


# -- unit-level settings: UnsetEnvironment=, PassEnvironment= -----------------------------

UNIT_LEVEL_CASES = {
    "unset": """[Service]
Type=exec
Environment=A=1 B=2 C=3 E=5
EnvironmentFile=/etc/envunit/one.env
UnsetEnvironment=A C=nomatch D=file E=5
ExecStart=/bin/sleep infinity
""",
    "pass": """[Service]
Type=exec
PassEnvironment=PM1 PM2 MISSING
Environment=PM2=unit Z=z
UnsetEnvironment=PM3
ExecStart=/bin/sleep infinity
""",
    "unset-systemds-own": """[Service]
Type=exec
Environment=X=1
UnsetEnvironment=PATH LANG
ExecStart=/bin/sleep infinity
""",
}
PREDICT = """
import json
from agent.privileged.inspection import inspect_unit
from agent.privileged.sources.systemd import SystemdSource
s = SystemdSource()
out = {{}}
for name in {names!r}:
    ctx = inspect_unit(s, name).context
    out[name] = {{"env": list(ctx.environment.items()), "sources": ctx.environment_sources,
                 "unset": list(ctx.unset_variables)}}
print(json.dumps(out))
"""


def test_unit_level_settings_match_systemd(make_sandbox: Callable[[], Sandbox]) -> None:
    """UnsetEnvironment= (VAR and VAR=value) and PassEnvironment= as systemd applies them."""
    from tests.harness.agent import agent_python

    sb = make_sandbox()
    for case, text in UNIT_LEVEL_CASES.items():
        sb.add_unit(f"envunit-{case}.service", text)
    sb.add_unit("envcase@.service", TEMPLATE)
    sb.add_file(f"/etc/envcases/{BASELINE}.env", b"")
    sb.add_file("/etc/envunit/one.env", b"B=file\nD=file\n")
    sb.boot()
    sb.systemctl("set-environment", "PM1=m1", "PM2=m2", "PM3=m3")
    units = [f"envunit-{c}.service" for c in UNIT_LEVEL_CASES]
    outcomes = start_all(sb, units + [unit_name(BASELINE)])
    baseline = outcomes[unit_name(BASELINE)].env()
    predicted = agent_python(sb, PREDICT.format(names=units))
    for unit in units:
        actual = outcomes[unit]
        assert actual.active, actual
        want = dict(predicted[unit]["env"])
        got = [(k, v) for k, v in actual.environ if k not in baseline or k in want]
        assert dict(got) == want, unit
        assert [k for k, _ in got] == list(want), unit  # systemd's order
    unset = dict(predicted["envunit-unset.service"]["env"])
    assert unset == {"B": "file", "C": "3"}
    passed = predicted["envunit-pass.service"]
    assert dict(passed["env"]) == {"PM1": "m1", "PM2": "unit", "Z": "z"}
    assert passed["sources"]["PM1"] == "PassEnvironment=" and passed["sources"]["PM2"] == \
        "Environment="
    own = outcomes["envunit-unset-systemds-own.service"].env()
    assert "PATH" not in own and "PATH" in baseline
    assert predicted["envunit-unset-systemds-own.service"]["unset"] == ["PATH", "LANG"]
