"""Every command README.md and docs/ show still runs as written: each `python SCRIPT.py --key`
names a knob that script takes, each script answers --help, and every relative link leads to a
file (and a heading there)."""

import re
import subprocess
import sys

import pytest

import benchmark
import recommend
import train
import tune
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SCRIPTS = ("train.py", "tune.py", "recommend.py", "benchmark.py")


def options(parser):
    return {flag[2:] for action in parser._actions for flag in action.option_strings if flag.startswith("--")}


def accepted(script):
    """The --keys a script takes: train.py's knobs, tune.py's own and train.py's, or the argparse
    options of recommend.py and benchmark.py (whose --variant passes train.py's knobs on)."""
    knobs = set(train.DEFAULTS) | {"help"}
    return {"train.py": knobs, "tune.py": knobs | set(tune.TUNE_KEYS),
            "recommend.py": options(recommend.command_line()),
            "benchmark.py": options(benchmark.command_line()) | {"variant"} | knobs}[script]


def documented_commands():
    """(page, script, the command's text) of every `python SCRIPT.py ...` in the pages: inline
    code and code blocks, a command running to the end of its code span or line."""
    found = []
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        for span in spans:
            for line in span.splitlines():
                for match in re.finditer(r"python (\w+\.py)([^#|;]*)", line):
                    if match.group(1) in SCRIPTS:
                        found.append((page.relative_to(ROOT), match.group(1), match.group(0)))
    return found


def test_the_pages_show_commands_of_every_script():
    shown = {script for _, script, _ in documented_commands()}
    assert shown == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_documented_option_is_one_the_script_takes(script):
    known = accepted(script)
    unknown = [(str(page), command) for page, name, command in documented_commands() if name == script
               for key in re.findall(r"(?:^|\s)--([A-Za-z_][\w-]*)", command) if key not in known]
    assert not unknown, unknown


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "usage" in done.stdout.lower() and not done.stderr.strip()


def slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_to_a_file_and_its_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve()
            if not linked.exists():
                broken.append((str(page.relative_to(ROOT)), target))
            elif anchor and linked.suffix == ".md" and anchor not in {
                    slug(h) for h in re.findall(r"(?m)^#+ (.*)$", linked.read_text())}:
                broken.append((str(page.relative_to(ROOT)), target))
    assert not broken, broken


def test_the_pages_answer_first_within_their_size():
    assert len((ROOT / "README.md").read_text()) <= 8000
    for page in (ROOT / "docs").glob("*.md"):
        assert len(page.read_text()) <= 20000, page.name
