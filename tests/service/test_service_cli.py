"""`m2 serve`'s flags and the README's settings table, both held to `Settings`: every
`M2_*` setting is a flag, shown with its default, and documented with the same default."""

from __future__ import annotations

import re
import subprocess

import pytest
from svc_helpers import REPO, m2_command, server_env

from service.cli import build_parser, flag, main, settings_from_args
from service.settings import Settings, env_name, shown_default

FIELDS = list(Settings.model_fields)


def _readme_defaults() -> dict[str, str]:
    """`| \\`M2_A\\` / \\`M2_B\\` | a / b | ... |` rows of the README's Configuration table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Configuration", 1)[1].split("\n#", 1)[0]
    table: dict[str, str] = {}
    for row in re.findall(r"^\| *(`M2_.*)$", section, flags=re.M):
        names, defaults = (cell.strip() for cell in row.split("|")[:2])
        names_, defaults_ = names.split(" / "), defaults.split(" / ")
        assert len(names_) == len(defaults_), f"README row {names!r}: one default per setting"
        table |= {n.strip("`"): d.strip("`") for n, d in zip(names_, defaults_, strict=True)}
    return table


def test_serve_help_lists_every_setting_with_its_default():
    p = subprocess.run(
        [*m2_command(), "serve", "--help"],
        capture_output=True, text=True, timeout=60, env=server_env(), cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())  # as read, not as wrapped
    for name in FIELDS:
        assert flag(name) in text and f"({env_name(name)}; default: {shown_default(name)})" in text
    assert "--max-body-bytes N" in text and "(M2_MAX_BODY_BYTES; default: 16 MiB)" in text
    assert "--warmup, --no-warmup" in text and "--device {auto,cpu,cuda}" in text


def test_readme_settings_table_lists_every_setting_with_the_same_default():
    table = _readme_defaults()
    assert set(table) == {env_name(n) for n in FIELDS}
    assert {n: table[env_name(n)] for n in FIELDS} == {n: shown_default(n) for n in FIELDS}


def test_a_flag_beats_its_environment_variable_which_beats_the_default(monkeypatch):
    monkeypatch.setenv("M2_MAX_QUEUE", "5")
    monkeypatch.setenv("M2_MAX_STEPS", "6")
    args = build_parser().parse_args(
        ["--max-queue", "7", "--no-warmup", "--cors-origins", "http://a", "http://b"]
    )
    s = settings_from_args(args)
    assert (s.max_queue, s.max_steps, s.max_batch_size) == (7, 6, 8)
    assert s.warmup is False and s.cors_origins == ["http://a", "http://b"]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [(["--max-steps", "0"], {}, "--max-steps"), ([], {"M2_MAX_QUEUE": "many"}, "M2_MAX_QUEUE")],
)
def test_a_bad_value_is_one_line_naming_where_it_came_from(argv, env, named, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"m2 serve: error: {named}: ") and err.count("\n") == 1
