"""The documentation: every relative link in README.md and docs/ resolves (file and #anchor),
no tracked file points outside the repository, and the built-in help lists only what a
user can pick, with examples for every subcommand."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
PARENT_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*)")


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = anchor(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links in one Markdown file whose target (or #anchor) does not exist, or that
    leave the repository."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment})")
    return broken


def tracked_text_files(root: Path = ROOT) -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the ignored kinds
        names = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                 and not {".git", ".venv", "results", "__pycache__"} & set(p.relative_to(root).parts)]
    files = []
    for name in names:
        path = root / name
        if path.is_file() and not path.is_symlink() and b"\0" not in path.read_bytes()[:4096]:
            files.append(path)
    return files


def outside_paths(path: Path, root: Path = ROOT) -> list[str]:
    """Parent-relative paths (starting `..` and a slash) in a file that leave the repository.
    Comments cite paths from the repository root as often as from their own folder: a path
    is fine when, read from the file's folder, it stays inside and exists; read from the
    root, it must stay inside."""
    found, inside = [], root.resolve()
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        for token in PARENT_PATH.findall(line):
            near = (path.parent / token).resolve()
            if near.is_relative_to(inside) and (near.exists() or (root / token).resolve().is_relative_to(inside)):
                continue
            found.append(f"{path.relative_to(root)}:{number}: {token}")
    return found


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_relative_link_resolves():
    broken = {str(p.relative_to(ROOT)): b for p in markdown_files() if (b := broken_links(p))}
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    """A page no link leads to is a page nobody finds."""
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
        for target in LINK.findall(text):
            file_part = target.partition("#")[0]
            linked = (page.parent / file_part).resolve()
            if file_part.endswith(".md") and linked.is_file():
                todo.append(linked)
    unreached = sorted(str(p.relative_to(ROOT)) for p in markdown_files()
                       if p.resolve() not in {r.resolve() for r in reached})
    assert not unreached, unreached


def test_no_tracked_file_points_outside_the_repository():
    found = [hit for path in tracked_text_files() for hit in outside_paths(path)]
    assert not found, found


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checkers themselves: a broken link, a missing anchor, a path out of the tree.
    (`up` is spelt apart so that this file names no outside path itself.)"""
    up = ".." + "/"
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## The `x` option: 2\n")
    (tmp_path / "docs" / "sub" / "b.md").write_text(f"[back]({up}a.md#title)\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#the-x-option-2) [ok](#top) [web](https://x.org)\n"
                    "# Top\n`[not a link](nowhere.md)`\n")
    assert broken_links(page, tmp_path) == []
    assert broken_links(tmp_path / "docs" / "sub" / "b.md", tmp_path) == []
    page.write_text(f"[a](docs/b.md) [b](docs/a.md#nope) [c]({up}x.md)\n")
    assert broken_links(page, tmp_path) == ["docs/b.md (no such file)", "docs/a.md#nope (no heading #nope)",
                                            f"{up}x.md (outside the repository)"]
    code = tmp_path / "docs" / "m.py"
    code.write_text(f'"""see {up}shared/methods.md"""\nx = "{up}docs/a.md"\ny = "{up}{up}elsewhere.md"\n')
    assert outside_paths(code, tmp_path) == [f"docs/m.py:1: {up}shared/methods.md", f"docs/m.py:3: {up}{up}elsewhere.md"]


COMMAND = re.compile(r"(?:^|`|\s)(stabbench (run|probe|bench) [^`#\\]*)")
CONFIG_OF = {"run": "config", "probe": "probe", "bench": "bench"}


def documented_commands() -> list[tuple[str, str, str | None]]:
    """(page, command, error) for every concrete `stabbench run|probe|bench ...` in README.md
    and docs/: placeholders (`<sweep>`, `...`, `[overrides]`) and GPU-only lines left out.
    `error` is the message a page shows on the next line (`stabbench: error: ...`) for a
    command it documents as refused, else None."""
    found = {}
    for page in markdown_files():
        lines = page.read_text(encoding="utf-8").splitlines()
        for line, following in zip(lines, lines[1:] + [""]):
            match = COMMAND.search(line)
            command = match and match.group(1).strip()
            if not command or any(mark in command for mark in ("<", "...", "[", "--help", "key=")):
                continue
            error = following.split("stabbench: error: ", 1)[1] if following.startswith("stabbench: error: ") else None
            found.setdefault(command, (str(page.relative_to(ROOT)), error))
    return [(page, command, error) for command, (page, error) in found.items()]


def test_documented_commands_compose_and_pass_the_checks(tmp_path, monkeypatch):
    """Each command the docs show is one stabbench accepts: known keys, types, ranges (the
    up-front checks of `stabbench run`, without running anything); a command a page shows
    refused by those checks is refused with the message the page shows."""
    import shlex

    import torch

    from stabbench.app import find_bad_config
    from stabbench.config import validate
    from stabbench.errors import UserError

    monkeypatch.chdir(tmp_path)
    commands = documented_commands()
    assert len(commands) > 30  # the pattern still finds the docs' commands
    assert any(error for _, _, error in commands)  # and the refusals they show
    bad = []
    for page, command, shown_error in commands:
        words = shlex.split(command)
        if "device=cuda" in words and not torch.cuda.is_available():
            continue
        # one point of a sweep is enough to catch a bad key or value, at a fraction of the cost
        args = [w if "[" in w else re.sub(r"=([^,]*),.*", r"=\1", w) for w in words[2:]
                if w not in ("-m", "--cfg", "job")]
        try:
            find_bad_config(args, CONFIG_OF[words[1]], validate)
        except UserError as error:
            if str(error) != shown_error:
                bad.append(f"{page}: {command}: {error}")
        # a refusal that depends on the machine (the memory estimate) is made later, at run time
    assert not bad, bad


# -- the built-in help ---------------------------------------------------------------------

def group_section(help_text: str) -> dict[str, list[str]]:
    section = help_text.split("== Config groups")[1].split("== Config (")[0]
    return {line.split(":")[0]: line.split(": ")[1].split(", ") for line in section.splitlines()[1:] if ": " in line}


@pytest.mark.parametrize("subcommand", ["run", "probe", "bench"])
def test_help_lists_only_real_choices_and_examples(cli, subcommand):
    code, out, err = cli(subcommand, "--help")
    assert code == 0, err
    groups = group_section(out)
    for group in ("method", "dataset", "optimizer", "experiment"):
        files = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        assert groups[group] == files, (group, groups.get(group))
    assert "_schema" not in out
    assert "Examples:" in out and f"stabbench {subcommand} " in out.split("Examples:")[1]
    assert "depth: 20" in out  # the config itself is still shown


def test_help_shows_the_config_the_overrides_compose(cli):
    code, out, _ = cli("run", "method=bsnn", "--help")
    assert code == 0 and "constraint: rownorm" in out


def test_report_and_top_level_help_have_examples(cli):
    code, out, _ = cli("report", "--help")
    assert code == 0 and "examples:" in out and "stabbench report results/" in out
    code, out, _ = cli("--help")
    assert code == 0 and "examples:" in out and "stabbench run method=" in out
