"""Pure: the one option reader, each server's grammar: what the older per-server loops did
and no test pinned (last value wins, a value option swallows the next word, no gluing for
uvicorn, a grammar of one's own)."""

from __future__ import annotations

import pytest

from agent.execstart import OptionGrammar, parse_gunicorn_args, parse_uvicorn_args, read_options


@pytest.mark.parametrize("args,expected", [
    (["--app-dir", "a", "--app-dir=b", "m:app"],
     {"app_spec": "m:app", "app_dir": "b", "env_file": "", "factory": False}),
    (["--host", "m:app", "other:app"],          # --host takes the next word as its value
     {"app_spec": "other:app", "app_dir": "", "env_file": "", "factory": False}),
    (["-k4", "m:app"],                          # no short options to glue: -k4 takes m:app
     {"app_spec": "", "app_dir": "", "env_file": "", "factory": False}),
    (["m:make", "--factory", "--env-file"],     # a value option at the end: empty value
     {"app_spec": "m:make()", "app_dir": "", "env_file": "", "factory": True}),
    (["--factory=1", "m:make"],                 # only the bare flag is the switch
     {"app_spec": "m:make", "app_dir": "", "env_file": "", "factory": False}),
])
def test_uvicorn_grammar(args: list[str], expected: dict[str, object]) -> None:
    assert parse_uvicorn_args(args) == expected


@pytest.mark.parametrize("args,expected", [
    (["-k4", "m:app"], {"app_spec": "m:app", "chdir": "", "config_file": "", "env": []}),
    (["--chdir", "/a", "--chdir=/b", "-eX=1", "--factory", "m:app"],   # --factory: a value
     {"app_spec": "", "chdir": "/b", "config_file": "", "env": ["X=1"]}),
    (["-R", "-D", "m:app", "-c"],
     {"app_spec": "m:app", "chdir": "", "config_file": "", "env": []}),
])
def test_gunicorn_grammar(args: list[str], expected: dict[str, object]) -> None:
    assert parse_gunicorn_args(args) == expected


def test_a_grammar_is_a_table() -> None:
    grammar = OptionGrammar(flags=frozenset({"-q"}), glued_short=True,
                            values={"-o": "out"}, lists={"-I": "include"},
                            switches={"-q": "quiet"})
    assert read_options(["-q", "-Ia", "-I", "b", "-ox", "main", "-o", "y"], grammar) == {
        "app_spec": "main", "out": "y", "include": ["a", "b"], "quiet": True}
