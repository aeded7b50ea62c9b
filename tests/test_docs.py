"""Docs that cannot rot: every ``continual`` command in README.md and docs/ parses with the real
CLI parser (nothing is run), and every relative link and repository path they name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from continual.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("adapters/", "fusion/", "streams/", "continual/", "tests/", "examples/", "benchmarks/", "docs/", "scripts/", ".ci/")


def code_lines(text: str, blocks: bool = True, inline: bool = True) -> list[str]:
    """Lines of fenced code blocks and inline code spans."""
    block_lines = [line for b in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) for line in b.splitlines()]
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    return (block_lines if blocks else []) + (spans if inline else [])


def commands(text: str) -> list[tuple[str, bool]]:
    """(arguments, whole) of every ``continual ...`` / ``python3 -m continual ...`` / ``-m continual``:
    whole in a code block (it must parse as it is), not in an inline span (which may name a
    command and some of its options in prose)."""
    found = []
    for whole in (True, False):
        for line in code_lines(text, blocks=whole, inline=not whole):
            line = re.sub(r"\s+#.*$", "", line.strip())  # a trailing comment
            m = re.search(r"(?:^|python3? -m |-m )continual ([a-z].*)$", line)
            if m and not line.startswith(("from ", "import ")):
                found.append((m.group(1), whole))
    return found


def as_argv(command: str) -> list[str]:
    """Placeholders become a value: ``RUN``-like words stay, ``<...>`` and ``$X`` become ``x``, ``...``
    (the rest of an earlier command) is dropped."""
    command = re.sub(r"<[^>]*>", "x", command).replace("$RANK", "0").replace("$HOST", "x")
    return [t for t in shlex.split(command) if t != "..."]


CASES = [(page, cmd, whole) for page in PAGES for cmd, whole in commands(page.read_text())]


def test_the_docs_name_commands():
    assert len(CASES) > 40  # the extraction itself works: README alone has more than a dozen


@pytest.mark.parametrize("page,command,whole", CASES, ids=[f"{p.name}:{c[:50]}" for p, c, _ in CASES])
def test_every_documented_command_parses(page, command, whole, capsys):
    argv = as_argv(command)
    parser = build_parser()
    if not whole:  # prose: the sub-command and every option it names must exist
        sub = next(a for a in parser._actions if a.dest == "command").choices
        assert argv[0] in sub, f"{page.name}: `continual {command}` names no sub-command"
        known = {o for a in sub[argv[0]]._actions for o in a.option_strings}
        unknown = [t.split("=")[0] for t in argv if t.startswith("--") and t.split("=")[0] not in known]
        assert not unknown, f"{page.name}: `continual {command}`: no such option {unknown}"
        return
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page.name}: `continual {command}` does not parse: {capsys.readouterr().err.strip()}")


def test_documented_exports_name_runs_whose_deltas_peft_can_hold():
    """``export runs/<stream>-per-task-<methods>-s0`` in a code block: the methods named by the run
    folder are ones PEFT holds (the README's tour exported the default bottleneck run, which
    exports nothing and fails)."""
    from adapters import make_config
    from adapters.peft_export import exportable

    found = [(c, re.match(r"export runs/[\w-]+?-per-task-([\w+]+)-s\d+ ", c)) for _, c, whole in CASES if whole]
    named = [(c, m) for c, m in found if m]  # a folder given by --out (runs/gen-lora) names no methods
    assert len(named) >= 2
    for command, m in named:
        why = exportable([make_config(x) for x in m.group(1).split("+")])
        assert why is None, f"`continual {command}` exports nothing: {why}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_and_named_path_exists(page):
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(f"link {target}")
    for span in code_lines(text):
        for token in re.findall(r"[\w./*-]+", span):
            path = token.rstrip(".,:;")
            if path.startswith(TOP) and not re.search(r"[<>]|\.\.\.", path) and not list(ROOT.glob(path)):
                missing.append(f"path {path}")
    if page.name == "benchmarks.md":  # its table names files of benchmarks/results/ by their own names
        for name in re.findall(r"`([\w*-]+\.(?:md|txt|png))`", text):
            if not list((ROOT / "benchmarks" / "results").glob(name)):
                missing.append(f"result {name}")
    assert not missing, f"{page.name} names what does not exist: {missing}"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.integration  # MiniLM and real data: the guide's programs run as written, shrunk
@pytest.mark.parametrize("page, index", [("README.md", 0), ("docs/library.md", 0)])
def test_the_guides_whole_programs_run(page, index, tmp_path, monkeypatch):
    """The README's Python example and the library page's first one are whole programs: they run
    as written (an API they name that moved would fail here), with fewer steps and examples and
    their output folders under a temporary directory."""
    code = python_blocks(ROOT / page)[index]
    shrunk = re.sub(r"max_steps=\d+", "max_steps=2", code)
    shrunk = re.sub(r"max_train=\d+", "max_train=32", re.sub(r"max_eval=\d+", "max_eval=16", shrunk))
    assert shrunk != code and '"runs/' in code  # the substitutions still find what they shrink
    monkeypatch.chdir(tmp_path)
    exec(compile(shrunk, f"{page} (python block {index})", "exec"), {"__name__": "__guide__"})
    assert any((tmp_path / "runs").iterdir())


@pytest.mark.integration  # MiniLM and real data
def test_the_library_guides_routing_program_runs(capsys):
    """The library page's routing example runs as written (fewer examples) and routes most test
    inputs of three unlike tasks to their own task."""
    (code,) = [b for b in python_blocks(ROOT / "docs" / "library.md") if "MahalanobisRouter" in b]
    shrunk = re.sub(r"max_train=\d+", "max_train=120", re.sub(r"max_eval=\d+", "max_eval=40", code))
    assert shrunk != code
    exec(compile(shrunk, "docs/library.md (routing)", "exec"), {"__name__": "__guide__"})
    shares = [float(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "sent to its own task" in line]
    assert len(shares) == 3 and min(shares) > 0.7
