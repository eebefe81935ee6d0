"""agent.envfile with literal inputs: one test per systemd 252 rule (oracle-checked in e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.envfile import (
    DEFAULT_ARG_MAX,
    MAX_ARG_STRLEN,
    MAX_FILE_BYTES,
    EnvFileError,
    EnvFileResult,
    env_assignment_is_valid,
    env_name_is_valid,
    environment_origins,
    execve_problem,
    load_environment_files,
    merge_environment,
    parse_env_file,
    read_env_file,
    utf8_is_valid,
)
from agent.errors import DriftwatchError


def env(text: str | bytes) -> dict[str, str]:
    """The variables systemd would take from the file."""
    return parse_env_file(text).as_dict()


def reasons(text: str | bytes) -> list[str]:
    """The file's warnings as 'line N: reason' strings."""
    return [str(w) for w in parse_env_file(text).warnings]


# -- comments and blank lines -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("# comment\nA=1\n", {"A": "1"}),
    ("; comment\nA=1\n", {"A": "1"}),
    ("   # indented comment\n\t; tabbed\nA=1\n", {"A": "1"}),
    ("A=1 # not a comment\n", {"A": "1 # not a comment"}),
    ("A=x;y\n", {"A": "x;y"}),
    ("A='x' # c\n", {"A": "x# c"}),         # after a closing quote, '#' is glued on
    ("\n\n   \n\t\nA=1\n\n", {"A": "1"}),
    ("", {}),
    ("# only a comment", {}),
])
def test_comments_and_blank_lines(text: str, expected: dict[str, str]) -> None:
    assert env(text) == expected


def test_comment_ending_in_backslash_swallows_next_line() -> None:
    # v252's COMMENT_ESCAPE eats any character, the newline included (v254 changed this).
    text = "# comment \\\nA=swallowed\nB=kept\n"
    assert env(text) == {"B": "kept"}
    assert reasons(text) == ["line 2: part of the comment on line 1, which ends with a "
                             "backslash (systemd 252 continues comments); ignored"]


def test_comment_continuation_chains_and_stops() -> None:
    assert env("; one \\\ntwo \\\nA=swallowed\nB=kept\n") == {"B": "kept"}
    assert env("# even \\\\\nA=1\n") == {"A": "1"}        # an escaped backslash: no swallow
    assert env("# crlf \\\r\nA=1\r\n") == {"A": "1"}      # the escape eats CR; LF ends it


# -- names ---------------------------------------------------------------------------------

def test_whitespace_around_name_and_equals_is_dropped() -> None:
    assert env("  A  =  1  \nB\t=\t2\t\n") == {"A": "1", "B": "2"}


def test_export_prefix_is_not_supported() -> None:
    text = "export A=1\nexport\tB=2\nC=3\n"
    assert env(text) == {"C": "3"}
    assert reasons(text)[0] == ("line 1: 'export A=' is shell syntax; systemd reads the name "
                                "as 'export ...', which is invalid, so the assignment is "
                                "ignored")


@pytest.mark.parametrize("line, why", [
    ("1A=x", "starts with a digit"),
    ("A-B=x", "contains '-'"),
    ("A.B=x", "contains '.'"),
    ("Ä=x", "non-ASCII"),
    ("A B=x", "whitespace"),
    ('"A"=x', "contains '\"'"),
    ("=A=1", "starts with '='"),
    ("A$=1", "contains '$'"),
])
def test_invalid_names_are_ignored(line: str, why: str) -> None:
    result = parse_env_file(f"{line}\nOK=1\n")
    assert result.as_dict() == {"OK": "1"}
    assert len(result.warnings) == 1 and result.warnings[0].line == 1
    assert why in result.warnings[0].reason


def test_valid_names() -> None:
    assert env("_=1\nlower=2\n__x9=3\nA1_b=4\n") == {"_": "1", "lower": "2", "__x9": "3",
                                                     "A1_b": "4"}
    assert env_name_is_valid("A_1") and not env_name_is_valid("")
    assert not env_name_is_valid("9A") and not env_name_is_valid("A-B")


@pytest.mark.parametrize("text", ["JUSTANAME\nA=1\n", "two words\nA=1\n", "=novalue\nA=1\n",
                                  "A=1\nLAST"])
def test_lines_without_equals_are_ignored(text: str) -> None:
    result = parse_env_file(text)
    assert result.as_dict() == {"A": "1"}
    assert len(result.warnings) == 1
    assert "no '='" in result.warnings[0].reason or "no name" in result.warnings[0].reason


def test_utf8_bom_becomes_part_of_the_first_name() -> None:
    assert env(b"\xef\xbb\xbfA=1\nB=2\n") == {"B": "2"}


# -- unquoted values -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("A=two words  \n", "two words"),               # trailing whitespace stripped
    ("A=\ta\tb\t\n", "a\tb"),                       # leading too (before the value)
    ("A=a\\tb\n", "atb"),                           # backslash escapes any character
    ("A=a\\\\b\n", "a\\b"),
    ("A=\\ lead\n", " lead"),
    ("A=trail\\ \n", "trail "),                     # escaped whitespace is kept
    ("A=trail\\  \n", "trail "),                    # ... but not what follows it
    ('A=a\\"b\n', 'a"b'),
    ("A=b=c\n", "b=c"),
    ("A==1\n", "=1"),
    ("A=a\"b\"c\n", 'a"b"c'),                       # quotes mid-value are literal
    ("A=a'b'c\n", "a'b'c"),
    ("A=$HOME ${B} %i $$\n", "$HOME ${B} %i $$"),   # no expansion
    ("A=a\x1bb\x7fc\n", "a\x1bb\x7fc"),             # control characters are fine
    ("A=héllo ✓ 😀\n", "héllo ✓ 😀"),
])
def test_unquoted_values(text: str, expected: str) -> None:
    assert env(text) == {"A": expected}


@pytest.mark.parametrize("text, expected", [
    ("A=a\\\nb\n", {"A": "ab"}),
    ("A=c   \\\n  d  \n", {"A": "c     d"}),      # whitespace around the join is kept
    ("A=\\\n\nB=x\n", {"A": "", "B": "x"}),
    ("A=a\\\r\nb\r\n", {"A": "a"}),                # CRLF: the backslash eats only the CR
])
def test_unquoted_continuation(text: str, expected: dict[str, str]) -> None:
    assert env(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A=\nB=''\nC=\"\"\nD=   \nE=''  \n", {"A": "", "B": "", "C": "", "D": "", "E": ""}),
])
def test_empty_values(text: str, expected: dict[str, str]) -> None:
    assert env(text) == expected


# -- quotes --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("A='a b  '\n", "a b  "),
    ("A='a\\nb'\n", "a\\nb"),                       # no escapes at all in single quotes
    ("A='a\\\nb'\n", "a\\\nb"),                     # not even backslash-newline
    ("A='x\ny'\n", "x\ny"),
    ("A='it''s'\n", "its"),                         # adjacent quoted parts are joined
    ("A='#;'\n", "#;"),
    ("A=  'x'\n", "x"),
])
def test_single_quotes(text: str, expected: str) -> None:
    assert env(text) == {"A": expected}


@pytest.mark.parametrize("text, expected", [
    ('A="a\\"b"\n', 'a"b'),
    ('A="a\\\\b"\n', "a\\b"),
    ('A="a\\$b"\n', "a$b"),
    ('A="a\\`b"\n', "a`b"),
    ('A="a\\nb"\n', "a\\nb"),                       # other escapes keep their backslash
    ('A="a\\tb"\n', "a\\tb"),
    ("A=\"a\\'b\"\n", "a\\'b"),
    ('A="  pad  "\n', "  pad  "),
    ('A="line1\nline2"\n', "line1\nline2"),
    ('A="a\\\nb"\n', "ab"),                         # backslash-newline is a continuation
    ('A="a\\\r\nb"\r\n', "a\\\r\nb"),              # ... but backslash-CR is kept as is
    ('A="x\ry"\n', "x\ry"),
    ('A="x"y\n', "xy"),
    ("A='x' 'y'\n", "xy"),                          # whitespace between parts is dropped
    ('A="x" y z \n', "xy z"),
    ("A=\"a\"'b'\n", "ab"),
    ('A="$HOME"\n', "$HOME"),
])
def test_double_quotes(text: str, expected: str) -> None:
    assert env(text) == {"A": expected}


@pytest.mark.parametrize("text, expected", [
    ('A="abc\nB=1\n', {"A": "abc\nB=1\n"}),
    ("A='abc\nB=1", {"A": "abc\nB=1"}),
    ('A="abc\\', {"A": "abc"}),
])
def test_unterminated_quote_takes_rest_of_file(text: str, expected: dict[str, str]) -> None:
    result = parse_env_file(text)
    assert result.as_dict() == expected
    assert [w.line for w in result.warnings] == [1]
    assert "quote never closed" in result.warnings[0].reason


# -- line ends, final line -----------------------------------------------------------------

def test_crlf() -> None:
    assert env(b"A=1\r\nB='q'\r\nC=\"x\"\r\nD=  y  \r\n") == {"A": "1", "B": "q", "C": "x",
                                                             "D": "y"}


def test_lone_cr_ends_names_and_values() -> None:
    assert env(b"A\rB=1\nC=2\rD=3\n") == {"B": "1", "C": "2", "D": "3"}
    assert env(b"A='x\ry'\n") == {"A": "x\ry"}


@pytest.mark.parametrize("text, expected", [
    ("A=1\nB=last", {"A": "1", "B": "last"}),
    ("A=1\nB=last   ", {"A": "1", "B": "last"}),
    ("A=abc  \\", {"A": "abc  "}),                  # the escape at EOF stops the strip
    ("A=", {"A": ""}),
])
def test_final_line_without_newline(text: str, expected: dict[str, str]) -> None:
    assert env(text) == expected


# -- duplicates ----------------------------------------------------------------------------

def test_last_assignment_wins_at_first_position() -> None:
    result = parse_env_file("A=1\nB=1\nA=2\nC=3\nB=\n")
    assert result.assignments == (("A", "2"), ("B", ""), ("C", "3"))
    assert [str(w) for w in result.warnings] == [
        "line 1: A is set again on line 3; this earlier value is overridden",
        "line 2: B is set again on line 5; this earlier value is overridden"]


def test_too_long_last_assignment_drops_the_variable() -> None:
    # strv_env_replace_consume() replaces first, strv_env_clean() drops after.
    big = "x" * (DEFAULT_ARG_MAX - 2)
    result = parse_env_file(f"A=short\nB=1\nA={big}\n")
    assert result.as_dict() == {"B": "1"}
    assert any("ARG_MAX" in w.reason and w.line == 3 for w in result.warnings)


# -- files systemd refuses whole -----------------------------------------------------------

@pytest.mark.parametrize("data, what", [
    (b"A=1\nB=\x00x\n", "NUL"),
    (b"# \x00\nA=1\n", "NUL"),                       # even inside a comment
    (b"A=1\nB=\xff\n", "UTF-8 in a value"),
    (b"\xffA=1\n", "UTF-8 in a variable name"),
    ("A=\ufffe\n".encode(), "UTF-8"),               # noncharacters: systemd is stricter
    ("A=x\ufdd0\n".encode(), "UTF-8"),              # than Python's decoder
    ("A=\U0001ffff\n".encode(), "UTF-8"),
    (b"A=\xed\xa0\x80\n", "UTF-8"),                 # an encoded surrogate
    (b"A=\xc0\xaf\n", "UTF-8"),                     # an overlong form
    (b"A=\xe2\x9c\n", "UTF-8"),                     # a truncated sequence
])
def test_refused_files_raise(data: bytes, what: str) -> None:
    with pytest.raises(EnvFileError, match=what):
        parse_env_file(data)


def test_refusal_line_number() -> None:
    with pytest.raises(EnvFileError, match="^line 3: invalid UTF-8 in a value"):
        parse_env_file(b"A=1\n\nB=\xff\n")


def test_oversized_file_is_refused() -> None:
    with pytest.raises(EnvFileError, match="larger than"):
        parse_env_file(b"#" * (MAX_FILE_BYTES + 1))


@pytest.mark.parametrize("data", [b"# \xff\xfe\nA=1\n", b"\xff\nA=1\n", b"# c\\\nB=\xff\nA=1\n"])
def test_bad_bytes_outside_assignments_are_never_checked(data: bytes) -> None:
    assert env(data) == {"A": "1"}


def test_env_file_error_is_a_value_error_and_a_driftwatch_error() -> None:
    assert issubclass(EnvFileError, ValueError)
    assert issubclass(EnvFileError, DriftwatchError)


def test_utf8_is_valid_mirrors_systemd() -> None:
    assert utf8_is_valid("héllo ✓ 😀".encode()) and utf8_is_valid(b"")
    assert not utf8_is_valid("\ufffe".encode()) and not utf8_is_valid("\uffff".encode())
    assert not utf8_is_valid("\ufdef".encode()) and utf8_is_valid("\ufdf0".encode())
    assert not utf8_is_valid("\U0010ffff".encode()) and utf8_is_valid("\U0010fffd".encode())


# -- limits --------------------------------------------------------------------------------

def test_assignment_length_limits_follow_arg_max() -> None:
    arg_max = 1000
    assert env_assignment_is_valid("A=" + "v" * (arg_max - 3), arg_max)
    assert not env_assignment_is_valid("A=" + "v" * (arg_max - 2), arg_max)
    assert env_assignment_is_valid("ABCD=" + "v" * (arg_max - 6), arg_max)
    assert not env_assignment_is_valid("ABCD=" + "v" * (arg_max - 5), arg_max)
    assert not env_assignment_is_valid("NOEQUALS", arg_max)
    assert parse_env_file("ABCD=" + "v" * (arg_max - 5), arg_max=arg_max).as_dict() == {}


def test_kernel_per_string_limit_is_flagged() -> None:
    fits = "A=" + "z" * (MAX_ARG_STRLEN - 3)          # plus its NUL: exactly the limit
    over = "A=" + "z" * (MAX_ARG_STRLEN - 2)
    assert execve_problem([fits]) is None
    assert parse_env_file(fits).warnings == ()
    problem = execve_problem(parse_env_file(over).as_dict())
    assert problem is not None and "E2BIG" in problem and "zzz" not in problem
    assert "E2BIG" in reasons(over)[0]


# -- input forms and the I/O helper --------------------------------------------------------

def test_str_and_bytes_agree() -> None:
    text = "A='é'\nB=\"✓\"\n"
    assert parse_env_file(text) == parse_env_file(text.encode())


def test_lone_surrogate_in_str_input_is_refused() -> None:
    with pytest.raises(EnvFileError):
        parse_env_file("A=\ud800\n")


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_bytes(b"DATABASE_URL=postgresql://app@db/prod\n")
    assert read_env_file(path).as_dict() == {"DATABASE_URL": "postgresql://app@db/prod"}
    with pytest.raises(FileNotFoundError):
        read_env_file(tmp_path / "missing.env")


def test_result_helpers() -> None:
    result = parse_env_file("B=1\nA=2\n")
    assert isinstance(result, EnvFileResult)
    assert result.names == ("B", "A") and result.as_dict() == {"B": "1", "A": "2"}


# -- secrets never leak into warnings or errors --------------------------------------------

SECRET = "hunter2"


def test_warnings_never_contain_values() -> None:
    text = (f"export PASSWORD={SECRET}\n{SECRET}\nA-B={SECRET}\nA=1\nA={SECRET}\n"
            f"# \\\nC={SECRET}\n{SECRET} {SECRET}=x\nD='{SECRET}")
    result = parse_env_file(text)
    assert len(result.warnings) >= 6
    for warning in result.warnings:
        assert SECRET not in str(warning)


def test_errors_never_contain_values() -> None:
    with pytest.raises(EnvFileError) as info:
        parse_env_file(f"A={SECRET}".encode() + b"\xff\n")
    assert SECRET not in str(info.value)


@given(st.binary(max_size=200) | st.text(alphabet="AB=#;'\"\\ \t\r\nxé$", max_size=60))
def test_arbitrary_input_parses_or_is_refused(data: str | bytes) -> None:
    try:
        result = parse_env_file(data)
    except EnvFileError:
        return
    for name, value in result.assignments:
        assert env_name_is_valid(name) and env_assignment_is_valid(f"{name}={value}")
    assert len(set(result.names)) == len(result.names)
    assert all(w.line >= 1 for w in result.warnings)


# -- merging Environment= and files ---------------------------------------------------------

def test_merge_order_environment_then_files_in_order() -> None:
    environment = ["A=env", "B=env", "C=env"]
    files = [("/etc/one.env", [("A", "one"), ("D", "one")]),
             ("/etc/two.env", [("A", "two"), ("B", "two")])]
    merged = merge_environment(environment, files)
    assert merged == {"A": "two", "B": "two", "C": "env", "D": "one"}
    assert list(merged) == ["A", "B", "C", "D"]     # first position kept, like env_append()
    assert environment_origins(environment, files) == {
        "A": "/etc/two.env", "B": "/etc/two.env", "C": "Environment=", "D": "/etc/one.env"}


def test_merge_keeps_equals_in_environment_values_and_drops_invalid() -> None:
    assert merge_environment(["URL=a=b", "NOEQUALS", "1X=y"], []) == {"URL": "a=b"}


def test_merge_accepts_parsed_results() -> None:
    one = parse_env_file("A=1\nB=1\n")
    two = parse_env_file("B=2\n")
    assert merge_environment([], [("one", one.assignments), ("two", two.assignments)]) == \
        {"A": "1", "B": "2"}


def test_load_environment_files_optional_and_required() -> None:
    contents = {"/etc/one.env": b"A=1\n", "/etc/bad.env": b"E=1\nF=\xff\n",
                "/etc/two.env": b"A=2\n"}

    def read(path: str) -> bytes:
        if path not in contents:
            raise FileNotFoundError(2, "No such file or directory", path)
        return contents[path]

    loaded = load_environment_files([("/etc/one.env", False), ("/etc/missing.env", True),
                                     ("/etc/bad.env", True), ("/etc/two.env", False)], read)
    assert [path for path, _ in loaded] == ["/etc/one.env", "/etc/two.env"]
    assert merge_environment([], [(p, r.assignments) for p, r in loaded]) == {"A": "2"}
    with pytest.raises(EnvFileError, match="missing.env: No such file"):
        load_environment_files([("/etc/missing.env", False)], read)
    with pytest.raises(EnvFileError, match="bad.env: line 2: invalid UTF-8"):
        load_environment_files([("/etc/bad.env", False)], read)
