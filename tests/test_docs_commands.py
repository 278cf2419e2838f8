"""The commands README.md and docs/*.md mark runnable run as pasted: each is checked without doing its work
(`--dry_run`, `--dry-run`, or the flags its `--help` lists), so that a mistyped flag fails. The marks and the rule
for each kind of command: docs/README.md, "Runnable commands". Also: every docs page is in the index, every
link resolves, and the README stays short.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_FENCE = "bash runnable"
COMMAND_COLUMN = "command"
FLOWER_PROGRAMS = {"flwr", "flower-superlink", "flower-supernode"}
NODE_CONFIG_KEYS = {"partition-id", "num-partitions", "data-file"}  # flower_app/config.py: parse_node_config
TIMEOUT_S = 60


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str

    def __str__(self):
        return f"{self.page}:{self.line}: {self.text}"


def fenced_commands(page: str, lines: list[str]) -> list[Command]:
    """Commands of the `bash runnable` blocks: continuation lines joined, comments and blank lines dropped."""
    commands, in_block, runnable, pending, start = [], False, False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block, runnable = not in_block, (not in_block) and line.strip()[3:].strip() == RUNNABLE_FENCE
            continue
        if not (in_block and runnable) or (not pending and not line.strip()) or line.lstrip().startswith("#"):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].rstrip() + " "
            continue
        commands.append(Command(page, start, pending + line.strip()))
        pending = ""
    return commands


def table_commands(page: str, lines: list[str]) -> list[Command]:
    """The inline-code spans of every table column headed `command`."""
    commands, column = [], None
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index(COMMAND_COLUMN) if COMMAND_COLUMN in cells else -1
        elif column >= 0 and column < len(cells) and not set(cells[column]) <= set("-: "):
            commands += [Command(page, number, span) for span in re.findall(r"`([^`]+)`", cells[column])]
    return commands


def runnable_commands() -> list[Command]:
    commands = []
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        page = str(path.relative_to(ROOT))
        commands += fenced_commands(page, lines) + table_commands(page, lines)
    return commands


def run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A program in a subprocess; Flower's CLI keeps its files in a temporary FLWR_HOME, not in ~/.flwr."""
    flwr_home = Path(tempfile.gettempdir()) / "test_docs_commands_flwr_home"
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "FLWR_HOME": str(flwr_home),
                               **(env or {})})


def run_python(target: list[str]) -> tuple[object, str]:
    """`python TARGET...` in this process (`-m module` or a script path), so that torch and transformers are imported
    once for all the commands: its exit code (None when main() returned) and what it printed."""
    module = target[1] if target[0] == "-m" else None
    argv = target[2:] if module else target[1:]
    saved, sys.argv = sys.argv, [module or str(ROOT / target[0]), *argv]
    output, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(output):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / target[0]), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    return code, output.getvalue()


@functools.lru_cache(maxsize=None)
def help_text(*program: str) -> str:
    if program[0] == sys.executable and program[1:3] != ("-m", "pytest"):  # pytest is not run inside pytest
        code, text = run_python([*program[1:], "--help"])
    else:
        result = run([*program, "--help"])
        code, text = result.returncode, result.stdout + result.stderr
    assert code in (0, None), f"`{' '.join(program)} --help` failed ({code}):\n{text[-2000:]}"
    return text


def config_keys(value: str) -> list[str]:
    """Keys of a Flower `k1=v1 k2="v 2"` config string."""
    return re.findall(r'(?:^|\s)([A-Za-z0-9_.-]+)=', value)


def option_value(argv: list[str], flag: str) -> str | None:
    return next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag), None)


def flags_of(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if re.match(r"-{1,2}[A-Za-z]", arg)]


def check_listed_in_help(argv: list[str], program: list[str]) -> None:
    text = help_text(*program)
    unknown = [flag for flag in flags_of(argv) if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not unknown, f"`{' '.join(program)} --help` does not list {', '.join(unknown)}"


def check_flower(argv: list[str]) -> None:
    program = [str(Path(sys.executable).parent / argv[0]), *argv[1:2]] if argv[0] == "flwr" else \
        [str(Path(sys.executable).parent / argv[0])]
    check_listed_in_help(argv, program)
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for flag, known in (("--run-config", set(app_config)), ("--node-config", NODE_CONFIG_KEYS)):
        value = option_value(argv, flag)
        unknown = [key for key in config_keys(value or "") if key not in known]
        assert not unknown, f"{flag} keys not in the app's config: {', '.join(unknown)}"


def check_python(argv: list[str]) -> None:
    target = argv[1:]
    if target[:1] in (["main_sft.py"], ["main_dpo.py"]):
        code, output = run_python([*target, "--dry_run"])
        assert code is None and "every flag is valid" in output, f"exit {code}: {output[-2000:]}"
        return
    module = target[:2] if target[:1] == ["-m"] else target[:1]
    check_listed_in_help(target[len(module):], [sys.executable, *module])
    if module == ["-m", "pytest"]:
        paths = [arg for arg in target[2:] if arg.startswith("tests")]
        assert all(list(ROOT.glob(path)) for path in paths), f"no test file matches {paths}"


def check(command: str) -> None:
    """Check one pasted command (possibly `a && b`, possibly ending in `&`) without doing its work."""
    for part in command.rstrip("& ").split("&&"):
        argv = shlex.split(part, comments=True)
        env = {}
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        program = argv[0] if argv else ""
        if program in ("python", ".venv/bin/python"):
            check_python(argv)
        elif program in FLOWER_PROGRAMS:
            check_flower(argv)
        elif argv[:2] == ["bash", "setup.sh"]:
            assert len(argv) == 2 and run(["bash", "-n", "setup.sh"]).returncode == 0
        elif argv[:2] == ["bash", "run_all.sh"]:
            result = run([*argv, "--dry-run"], env)
            assert result.returncode == 0, result.stderr[-2000:]
        else:
            raise AssertionError(f"no rule to check `{part.strip()}`: mark only commands this test knows "
                                 f"(tests/test_docs_commands.py)")


COMMANDS = runnable_commands()


def test_the_readme_marks_its_commands_runnable():
    readme = [c for c in COMMANDS if c.page == "README.md"]
    assert any(c.text.startswith("bash setup.sh && .venv/bin/python -m pytest") for c in readme)
    assert len(readme) >= 8, [str(c) for c in readme]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_runnable_command(command):
    check(command.text)


@pytest.mark.parametrize("command, why", [
    (".venv/bin/python main_sft.py --num_round 5", "abbreviated flag"),
    ("python main_dpo.py --fed_alg fedavgg", "unknown method"),
    ("bash run_all.sh --smok", "misspelt flag"),
    ("python -m evaluation.exact_match --checkpont out/checkpoint-5", "misspelt flag of a --help check"),
    ("python -m pytest -x --runslo", "misspelt pytest option"),
    ("python -m pytest tests/test_no_such_file.py", "no such test file"),
    ("flwr run . sim --stream --run-config 'fed-algo=\"fedavg\"'", "unknown run-config key"),
    ("flower-supernode --superlink x:9093 --node-config 'partition=0'", "unknown node-config key"),
    ("flower-superlink --simulaton", "misspelt Flower flag"),
    ("cat >> ~/.flwr/config.toml", "a program the test cannot check"),
    ("bash setup.sh --fast", "setup.sh takes no flags"),
])
def test_a_wrong_command_fails(command, why):
    with pytest.raises(AssertionError):
        check(command)


def test_blocks_and_tables_are_extracted():
    page = ["```bash runnable", "# a comment", "python main_sft.py \\", "  --fed_alg fedavg", "", "```",
            "```bash", "python not_runnable.py", "```",
            "| task | command | page |", "|---|---|---|", "| train | `python main_dpo.py` | x |"]
    found = fenced_commands("p", page) + table_commands("p", page)
    assert [(c.line, c.text) for c in found] == [(3, "python main_sft.py --fed_alg fedavg"),
                                                (12, "python main_dpo.py")]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_docs_page_is_in_the_index_and_every_link_resolves():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "README.md" and f"({p.name})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            linked = (page.parent / target) if target else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken


def test_the_readme_is_short():
    """Issue #29's target: under 120 lines, no paragraph of prose over 5 lines."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 120
    paragraph, in_fence, longest = 0, False, 0
    for line in lines:
        in_fence ^= line.lstrip().startswith("```")
        prose = line.strip() and not in_fence and not line.startswith(("|", "#", "```"))
        paragraph = 0 if not prose else 1 if line.startswith(("- ", "* ")) else paragraph + 1
        longest = max(longest, paragraph)
    assert longest <= 5
