"""Pure: systemd's EnvironmentFile= syntax, exactly as systemd 252 reads it for a service.

The scanner below is a byte-for-byte port of parse_env_file_internal() in systemd's
src/basic/env-file.c (v252), fed through the load_env_file() callback path that
exec_context_load_environment() in src/core/execute.c uses; the checks after it mirror
check_utf8ness_and_warn() (env-file.c), strv_env_replace_consume() and
strv_env_clean_with_callback() / env_assignment_is_valid() (src/basic/env-util.c).

Rules worth knowing (every one checked against a real systemd 252 in
tests/e2e/test_envfile_oracle.py):

* '#' or ';' starts a comment only where a name could start (after leading whitespace);
  elsewhere it is an ordinary character: A='x' # c gives "x# c". A comment line ending in
  a backslash swallows the next line too (v252 only; v254 changed that).
* No 'export' keyword: "export A=1" has the name "export A", which is invalid and ignored.
  No $VAR or %i expansion either: values are taken literally.
* Whitespace around the name and after '=' is dropped; an unquoted value loses trailing
  whitespace; a backslash escapes any character and backslash-newline joins lines.
* Quotes count only at the start of a value (or right after a closing quote): 'single'
  quotes take everything literally (newlines too); "double" quotes unescape only
  \\" \\\\ \\` \\$ and backslash-newline, other backslashes stay. Text after a closing
  quote is glued on: A="x"y gives xy. An unclosed quote takes the rest of the file.
* CR is a line end for names and unquoted values (so CRLF files work), but inside quotes
  it is kept. An unquoted backslash eats a CR too, so in a CRLF file a trailing backslash
  ends the value instead of continuing it.
* A line without '=' is ignored; so is an assignment with an invalid name (only ASCII
  letters, digits and '_', not starting with a digit). The last assignment of a name
  wins, at the position of the first one; if that last one is too long for ARG_MAX the
  variable is dropped altogether.
* A NUL byte anywhere, invalid UTF-8 (systemd's strict flavour, which also refuses
  noncharacters such as U+FFFE) in a name or value, or a file over 64 MiB makes systemd
  refuse the whole file: the unit fails to start ("Failed to load environment files"),
  or, for an optional '-' file, the whole file is skipped, lines before the bad one too.
  Bytes in comments and in lines without '=' are never checked.
* A value systemd accepts can still be too long for the kernel (128 KiB per string):
  execve() then fails with E2BIG; see execve_problem().
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DriftwatchError

# READ_FULL_BYTES_MAX in src/basic/fileio.c: read_full_file() refuses larger files (-E2BIG).
MAX_FILE_BYTES = 64 * 1024 * 1024 - 1
# sysconf(_SC_ARG_MAX) as PID 1 sees it with the kernel's default 8 MiB stack limit
# (glibc: RLIMIT_STACK / 4); env_value_is_valid() and friends measure against it.
DEFAULT_ARG_MAX = 2 * 1024 * 1024
# MAX_ARG_STRLEN in the kernel (32 pages of 4 KiB): execve() fails with E2BIG when one
# environment string, its NUL included, is longer, so systemd keeps such a variable but the
# service then fails at exec (status 203/EXEC).
MAX_ARG_STRLEN = 32 * 4096

# The character classes of src/basic/string-util.h and escape.h, as byte values.
_WHITESPACE = frozenset(b" \t\n\r")
_NEWLINE = frozenset(b"\n\r")
_COMMENTS = frozenset(b"#;")
_SHELL_NEED_ESCAPE = frozenset(b'"\\`$')
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_EQ, _BACKSLASH, _SQUOTE, _DQUOTE, _LF = b"=", 0x5C, 0x27, 0x22, 0x0A
_EQ_BYTE = 0x3D

# parse_env_file_internal()'s states.
(_PRE_KEY, _KEY, _PRE_VALUE, _VALUE, _VALUE_ESCAPE, _SINGLE_QUOTE_VALUE,
 _DOUBLE_QUOTE_VALUE, _DOUBLE_QUOTE_VALUE_ESCAPE, _COMMENT, _COMMENT_ESCAPE) = range(10)
# Runs of bytes that a state just appends (or, in a comment, skips): never a newline, and
# for a name or an unquoted value never whitespace, whose position the scanner tracks.
_RUNS = {
    _KEY: re.compile(rb"[^\n\r= \t]+"),
    _VALUE: re.compile(rb"[^\n\r \t\\]+"),
    _SINGLE_QUOTE_VALUE: re.compile(rb"[^'\n]+"),
    _DOUBLE_QUOTE_VALUE: re.compile(rb'[^"\\\n]+'),
    _COMMENT: re.compile(rb"[^\\\n\r]+"),
}
# States in which reaching the end of the file still pushes the pending assignment.
_PUSH_AT_EOF = frozenset({_PRE_VALUE, _VALUE, _VALUE_ESCAPE, _SINGLE_QUOTE_VALUE,
                          _DOUBLE_QUOTE_VALUE, _DOUBLE_QUOTE_VALUE_ESCAPE})


class EnvFileError(DriftwatchError, ValueError):
    """systemd would refuse this environment file as a whole (the message holds no value)."""


@dataclass(frozen=True)
class EnvFileWarning:
    """One ignored or surprising line; the reason never contains a value."""

    line: int
    reason: str

    def __str__(self) -> str:
        """'line N: reason', ready for /status and agentctl."""
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class EnvFileResult:
    """What systemd takes from one file: assignments in its order, and what it ignored."""

    assignments: tuple[tuple[str, str], ...]
    warnings: tuple[EnvFileWarning, ...] = ()

    def as_dict(self) -> dict[str, str]:
        """The assignments as a dict (names are already unique)."""
        return dict(self.assignments)

    @property
    def names(self) -> tuple[str, ...]:
        """The variable names the file sets, in systemd's order."""
        return tuple(name for name, _ in self.assignments)


@dataclass(frozen=True)
class _Raw:
    """One assignment as the scanner pushes it: still bytes, name not yet validated."""

    line: int
    key: bytes
    value: bytes


def _to_bytes(text: str | bytes) -> bytes:
    """The file's bytes; str input is UTF-8 (lone surrogates kept so they stay invalid)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _unichar_is_valid(ch: int) -> bool:
    """unichar_is_valid() of src/basic/utf8.c: stricter than Python's UTF-8 decoder."""
    if ch >= 0x110000 or (ch & 0xFFFFF800) == 0xD800:
        return False
    if 0xFDD0 <= ch <= 0xFDEF:  # "reserved" noncharacters
        return False
    return (ch & 0xFFFE) != 0xFFFE  # U+xxFFFE and U+xxFFFF in every plane


def utf8_is_valid(data: bytes) -> bool:
    """systemd's utf8_is_valid(): strict UTF-8 that also refuses Unicode noncharacters."""
    try:
        text = data.decode("utf-8")  # rejects overlongs, surrogates, > U+10FFFF, truncation
    except UnicodeDecodeError:
        return False
    if text.isascii():
        return True
    return all(_unichar_is_valid(ord(ch)) for ch in text)


def env_name_is_valid(name: str | bytes, arg_max: int = DEFAULT_ARG_MAX) -> bool:
    """env_name_is_valid() of env-util.c: [A-Za-z_][A-Za-z0-9_]*, bash's rule."""
    data = _to_bytes(name)
    if not data or data[0] in b"0123456789" or len(data) > arg_max - 2:
        return False
    return all(b in _NAME_CHARS for b in data)


def env_assignment_is_valid(assignment: str | bytes, arg_max: int = DEFAULT_ARG_MAX) -> bool:
    """env_assignment_is_valid() of env-util.c: a valid name, '=', a valid value, in size."""
    data = _to_bytes(assignment)
    name, eq, value = data.partition(_EQ)
    if not eq or not env_name_is_valid(name, arg_max):
        return False
    # env_value_is_valid(): UTF-8 and at most ARG_MAX-3 bytes; the whole at most ARG_MAX-1.
    return utf8_is_valid(value) and len(value) <= arg_max - 3 and len(data) <= arg_max - 1


def _no_equals(line: int, key: bytearray) -> EnvFileWarning:
    """The warning for a line systemd drops because no '=' follows its name."""
    if key[:1] == _EQ:  # PRE_KEY takes a leading '=' as the first character of the name
        return EnvFileWarning(line, "line starts with '=' and has no name; ignored")
    return EnvFileWarning(line, "no '=' on this line; ignored")


def _swallowed(line: int, comment_line: int) -> EnvFileWarning:
    """The warning for a line a backslash-continued comment eats."""
    return EnvFileWarning(line, f"part of the comment on line {comment_line}, which ends "
                          "with a backslash (systemd 252 continues comments); ignored")


def _scan(data: bytes) -> tuple[list[_Raw], list[EnvFileWarning]]:
    """parse_env_file_internal(), state for state; also notes lines worth a warning."""
    pushed: list[_Raw] = []
    notes: list[EnvFileWarning] = []
    state = _PRE_KEY
    key = bytearray()
    value = bytearray()
    last_key_ws: int | None = None    # index where trailing whitespace of the key starts
    last_value_ws: int | None = None  # same for an unquoted value
    line = 1              # physical line (systemd's own counter skips blank lines)
    key_line = 1          # line where the pending name started
    quote_line = 1        # line where the open quote started
    comment_line = 1      # line of the comment being continued
    swallowed_line = 0    # a line a continued comment is eating; reported once if not blank

    def push(strip_value: bool) -> None:
        k = bytes(key[:last_key_ws] if last_key_ws is not None else key)
        v = bytes(value[:last_value_ws] if strip_value and last_value_ws is not None
                  else value)
        pushed.append(_Raw(key_line, k, v))
        key.clear()
        value.clear()

    pos, end = 0, len(data)
    while pos < end:
        # Fast path: a run of bytes the current state only appends (no newline, so the line
        # count is unaffected) is taken in one go; results are identical to byte by byte.
        run = _RUNS.get(state)
        if run is not None and (m := run.match(data, pos)):
            chunk = m.group()
            pos = m.end()
            if state == _KEY:
                key += chunk
                last_key_ws = None
            elif state == _VALUE:
                value += chunk
                last_value_ws = None
            elif state == _COMMENT:
                if swallowed_line == line and chunk.strip(b" \t\r"):
                    notes.append(_swallowed(line, comment_line))
                    swallowed_line = -1
            else:  # inside quotes
                value += chunk
            continue
        c = data[pos]
        pos += 1
        if state == _PRE_KEY:
            if c in _COMMENTS:
                state = _COMMENT
                comment_line = line
                swallowed_line = 0
            elif c not in _WHITESPACE:
                state = _KEY
                last_key_ws = None
                key_line = line
                key.append(c)
        elif state == _KEY:
            if c in _NEWLINE:
                # A name with no '=' before the line ends is dropped without a word.
                notes.append(_no_equals(key_line, key))
                state = _PRE_KEY
                key.clear()
            elif c == _EQ_BYTE:
                state = _PRE_VALUE
                last_value_ws = None
            else:
                if c not in _WHITESPACE:
                    last_key_ws = None
                elif last_key_ws is None:
                    last_key_ws = len(key)
                key.append(c)
        elif state == _PRE_VALUE:
            if c in _NEWLINE:
                state = _PRE_KEY
                push(strip_value=False)
            elif c == _SQUOTE:
                state = _SINGLE_QUOTE_VALUE
                quote_line = line
            elif c == _DQUOTE:
                state = _DOUBLE_QUOTE_VALUE
                quote_line = line
            elif c == _BACKSLASH:
                state = _VALUE_ESCAPE
            elif c not in _WHITESPACE:
                state = _VALUE
                value.append(c)
        elif state == _VALUE:
            if c in _NEWLINE:
                state = _PRE_KEY
                push(strip_value=True)
            elif c == _BACKSLASH:
                state = _VALUE_ESCAPE
                last_value_ws = None
            else:
                if c not in _WHITESPACE:
                    last_value_ws = None
                elif last_value_ws is None:
                    last_value_ws = len(value)
                value.append(c)
        elif state == _VALUE_ESCAPE:
            state = _VALUE
            if c not in _NEWLINE:  # an escaped CR or LF is eaten: a continuation line
                value.append(c)
        elif state == _SINGLE_QUOTE_VALUE:
            if c == _SQUOTE:
                state = _PRE_VALUE
            else:
                value.append(c)
        elif state == _DOUBLE_QUOTE_VALUE:
            if c == _DQUOTE:
                state = _PRE_VALUE
            elif c == _BACKSLASH:
                state = _DOUBLE_QUOTE_VALUE_ESCAPE
            else:
                value.append(c)
        elif state == _DOUBLE_QUOTE_VALUE_ESCAPE:
            state = _DOUBLE_QUOTE_VALUE
            if c in _SHELL_NEED_ESCAPE:
                value.append(c)
            elif c != _LF:  # only LF continues here; "\<CR>" keeps both, like the shell
                value += b"\\"
                value.append(c)
        elif state == _COMMENT:
            if swallowed_line == line and c not in _WHITESPACE:
                notes.append(_swallowed(line, comment_line))
                swallowed_line = -1
            if c == _BACKSLASH:
                state = _COMMENT_ESCAPE
            elif c in _NEWLINE:
                state = _PRE_KEY
        else:  # _COMMENT_ESCAPE: v252 eats any one character, a newline included
            state = _COMMENT
            if c == _LF:
                swallowed_line = line + 1
        if c == _LF:
            line += 1

    if state in _PUSH_AT_EOF:
        if state in (_SINGLE_QUOTE_VALUE, _DOUBLE_QUOTE_VALUE, _DOUBLE_QUOTE_VALUE_ESCAPE):
            notes.append(EnvFileWarning(
                quote_line, "quote never closed; systemd takes the rest of the file as the "
                "value"))
        push(strip_value=state == _VALUE)
    elif state == _KEY:
        notes.append(_no_equals(key_line, key))
    return pushed, notes


def _show(name: bytes, limit: int = 64) -> str:
    """A valid variable name for a message, shortened when absurdly long."""
    text = name.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_bad_name(key: bytes) -> str:
    """Why a name is invalid, without echoing it unless it is harmless shell syntax."""
    words = key.split()
    if len(words) == 2 and words[0] == b"export" and env_name_is_valid(words[1]):
        return (f"'export {_show(words[1])}=' is shell syntax; systemd reads the name as "
                "'export ...', which is invalid, so the assignment is ignored")
    if not key:
        why = "the name is empty"
    elif key[:1] == _EQ:
        why = "the line starts with '='"
    elif key[0] in b"0123456789":
        why = "the name starts with a digit"
    elif any(b in _WHITESPACE for b in key):
        why = "the name contains whitespace"
    elif not key.isascii():
        why = "the name contains a non-ASCII character"
    else:
        bad = sorted({chr(b) for b in key if b not in _NAME_CHARS})
        why = "the name contains " + ", ".join(repr(ch) for ch in bad)
    return f"invalid variable name ({why}); ignored"


def parse_env_file(text: str | bytes, arg_max: int = DEFAULT_ARG_MAX) -> EnvFileResult:
    """Parse one EnvironmentFile= the way systemd 252 loads it for a service."""
    data = _to_bytes(text)
    # read_full_file(): too big is -E2BIG; an embedded NUL is -EBADMSG (the caller asked for
    # no size, so a NUL would make the end of the contents ambiguous).
    if len(data) > MAX_FILE_BYTES:
        raise EnvFileError(f"file is larger than {MAX_FILE_BYTES} bytes; "
                           "systemd refuses to read it")
    nul = data.find(b"\0")
    if nul >= 0:
        nul_line = data.count(b"\n", 0, nul) + 1
        raise EnvFileError(f"line {nul_line}: NUL byte; systemd refuses the whole file")
    pushed, warnings = _scan(data)

    # load_env_file_push(): check_utf8ness_and_warn() fails the whole load, not the line.
    for raw in pushed:
        if not utf8_is_valid(raw.key):
            raise EnvFileError(f"line {raw.line}: invalid UTF-8 in a variable name; "
                               "systemd refuses the whole file")
        if not utf8_is_valid(raw.value):
            raise EnvFileError(f"line {raw.line}: invalid UTF-8 in a value; "
                               "systemd refuses the whole file")

    # strv_env_replace_consume(): a repeated name replaces the earlier entry in place, so the
    # last value wins at the first position, even when that last value is invalid.
    entries: dict[bytes, _Raw] = {}
    for raw in pushed:
        name = raw.key.partition(_EQ)[0]
        earlier = entries.get(name)
        if earlier is not None and env_name_is_valid(raw.key, arg_max):
            warnings.append(EnvFileWarning(
                earlier.line, f"{_show(raw.key)} is set again on line {raw.line}; "
                "this earlier value is overridden"))
        entries[name] = raw

    # strv_env_clean_with_callback() with invalid_env() in execute.c: invalid entries are
    # logged and dropped; the rest of the file still applies.
    assignments: list[tuple[str, str]] = []
    for raw in entries.values():
        assignment = raw.key + b"=" + raw.value
        if not env_name_is_valid(raw.key.partition(_EQ)[0], arg_max):
            warnings.append(EnvFileWarning(raw.line, _describe_bad_name(raw.key)))
            continue
        if not env_assignment_is_valid(assignment, arg_max):
            # env_value_is_valid() / env_assignment_is_valid(): longer than ARG_MAX allows.
            warnings.append(EnvFileWarning(
                raw.line, f"{_show(raw.key)}: assignment of {len(assignment)} bytes is over "
                f"systemd's limit of {arg_max - 1} (ARG_MAX); the variable is dropped, "
                "an earlier value of it too"))
            continue
        if len(assignment) + 1 > MAX_ARG_STRLEN:
            warnings.append(EnvFileWarning(
                raw.line, f"{_show(raw.key)}: assignment of {len(assignment)} bytes is over "
                f"the kernel's per-string limit of {MAX_ARG_STRLEN - 1}; execve() will fail "
                "with E2BIG and the service will not start (status 203/EXEC)"))
        assignments.append((raw.key.decode(), raw.value.decode()))
    warnings.sort(key=lambda w: w.line)
    return EnvFileResult(tuple(assignments), tuple(warnings))


def read_env_file(path: str | Path, arg_max: int = DEFAULT_ARG_MAX) -> EnvFileResult:
    """Read and parse one file; OSError passes through, EnvFileError when systemd refuses it."""
    return parse_env_file(Path(path).read_bytes(), arg_max)


def load_environment_files(
        files: Iterable[tuple[str, bool]],
        read_bytes: Callable[[str], bytes] | None = None,
        arg_max: int = DEFAULT_ARG_MAX,
) -> list[tuple[str, EnvFileResult]]:
    """exec_context_load_environment(): (path, optional) pairs as D-Bus lists them, in order.

    An optional ('-') file that is missing or refused is skipped whole; a required one raises
    EnvFileError, as the unit would fail with "Failed to load environment files".
    Globbing of the path, which systemd also does, is left to the caller.
    """
    read = read_bytes or (lambda p: Path(p).read_bytes())
    loaded: list[tuple[str, EnvFileResult]] = []
    for path, optional in files:
        try:
            result = parse_env_file(read(path), arg_max)
        except OSError as exc:
            if optional:
                continue
            raise EnvFileError(f"{path}: {exc.strerror or exc}") from exc
        except EnvFileError as exc:
            if optional:
                continue
            raise EnvFileError(f"{path}: {exc}") from exc
        loaded.append((path, result))
    return loaded


def _merge(environment: Iterable[str],
           files: Iterable[tuple[str, Iterable[tuple[str, str]]]],
           arg_max: int) -> dict[str, tuple[str, str]]:
    """name -> (value, origin) after systemd's merge and final clean."""
    merged: dict[str, tuple[str, str]] = {}
    # exec_child(): strv_env_merge(..., context->environment, files_env) then
    # strv_env_clean(); env_append() overrides by "NAME=" and keeps the first position.
    for assignment in environment:
        name, eq, value = assignment.partition("=")
        if eq:
            merged[name] = (value, "Environment=")
    for path, pairs in files:
        for name, value in pairs:
            merged[name] = (value, path)
    return {name: (value, origin) for name, (value, origin) in merged.items()
            if env_assignment_is_valid(f"{name}={value}", arg_max)}


def merge_environment(environment: Iterable[str],
                      files: Iterable[tuple[str, Iterable[tuple[str, str]]]],
                      arg_max: int = DEFAULT_ARG_MAX) -> dict[str, str]:
    """Environment= ("K=V" as D-Bus gives them), then each loaded file, later ones winning."""
    return {name: value for name, (value, _) in _merge(environment, files, arg_max).items()}


def environment_origins(environment: Iterable[str],
                        files: Iterable[tuple[str, Iterable[tuple[str, str]]]],
                        arg_max: int = DEFAULT_ARG_MAX) -> dict[str, str]:
    """For each merged name, where its value came from: "Environment=" or the file's path."""
    return {name: origin for name, (_, origin) in _merge(environment, files, arg_max).items()}


def execve_problem(environment: Mapping[str, str] | Sequence[str]) -> str | None:
    """Why execve() would refuse this environment with E2BIG (per-string limit), or None."""
    items = (environment if not isinstance(environment, Mapping)
             else [f"{k}={v}" for k, v in environment.items()])
    for item in items:
        size = len(_to_bytes(item)) + 1
        if size > MAX_ARG_STRLEN:
            name = item.partition("=")[0]
            return (f"{name}: {size - 1} bytes is over the kernel's per-string limit "
                    f"({MAX_ARG_STRLEN - 1}); execve() fails with E2BIG (status 203/EXEC)")
    return None
