"""The user docs (README.md, docs/*.md) against the code: every `cpsl` command in a code block names
a real subcommand and real, visible flags; every relative link resolves inside the repository; no
path outside it and no issue numbers; the README's figures carry a date and a machine."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from cpsl.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "export" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def shell_commands(block: str) -> list[list[str]]:
    """The ``cpsl ...`` invocations of a shell block (comments, continuations, ``&&``/``;``/``|`` split)."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;|\|\|?", line):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            words = [w.strip("[]") for w in words]
            for k, w in enumerate(words):
                if w == "cpsl" and (k == 0 or words[k - 1] == "-m"):
                    out.append(words[k + 1:])
                    break
    return out


def resolve(words: list[str]) -> tuple[click.Command, list[str], str]:
    """The (sub)command the words name, its remaining words and its path."""
    cmd, path = main, "cpsl"
    words = list(words)
    while isinstance(cmd, click.Group) and words and not words[0].startswith("-"):
        name = words.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"{path} has no subcommand {name!r}"
        cmd, path = sub, f"{path} {name}"
    return cmd, words, path


def visible_flags(cmd: click.Command) -> set[str]:
    flags = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            flags.update(p.opts)
            flags.update(p.secondary_opts)
    return flags


def documented():
    for doc in DOCS:
        for lang, block in code_blocks(doc):
            if lang in ("bash", "sh", "shell", ""):
                for words in shell_commands(block):
                    yield doc.relative_to(REPO), words


DOCUMENTED = list(documented())


def test_the_docs_document_commands():
    assert len(DOCUMENTED) >= 20, "the walker found too few cpsl commands: is the fence pattern broken?"
    assert {w[0] for _, w in DOCUMENTED} >= {"train", "eval", "export", "predict", "data", "config"}


@pytest.mark.parametrize("doc,words", DOCUMENTED, ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_documented_command_and_flags_exist(doc, words):
    cmd, rest, path = resolve(words)
    assert not isinstance(cmd, click.Group), f"{doc}: `{path}` needs a subcommand"
    flags = visible_flags(cmd)
    for w in rest:
        if w.startswith("--") or (w.startswith("-") and len(w) == 2 and w[1].isalpha()):
            name = w.split("=", 1)[0]
            assert name in flags, f"{doc}: `{path}` has no option {name} (documented: {' '.join(words)})"


def test_the_walker_catches_a_wrong_flag_and_a_wrong_subcommand():
    cmd, rest, _ = resolve(["train", "--data", "synth", "--no-such-flag"])
    assert "--no-such-flag" not in visible_flags(cmd)
    with pytest.raises(AssertionError, match="no subcommand"):
        resolve(["trian"])
    assert shell_commands("x && cpsl data info s.pkl  # c\ntorchrun -m cpsl train --out r \\\n  --seeds 1") == [
        ["data", "info", "s.pkl"], ["train", "--out", "r", "--seeds", "1"]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    text = FENCE.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        p = (doc.parent / target.split("#", 1)[0]).resolve()
        assert p.exists(), f"{doc.name}: link {target} does not resolve"
        assert REPO.resolve() in p.parents or p == REPO.resolve(), f"{doc.name}: link {target} leaves the repository"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_user_docs_have_no_outside_paths_and_no_issue_numbers(doc):
    text = doc.read_text()
    assert "../shared" not in text
    hits = re.findall(r"\b[Ii]ssues? \d+|(?<![\w&])#\d+\b", text)
    assert not hits, f"{doc.name}: {hits}"


def test_readme_is_short_and_its_figures_carry_date_and_machine():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| figure")]
    assert len(rows) >= 3
    for r in rows:
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", r), f"no date: {r[:80]}"
        assert "VM" in r, f"no machine: {r[:80]}"
