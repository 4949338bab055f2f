"""The README and docs/ as a newcomer reads them: every command the README shows is run here (the cheap ones) or
is run by a named test (the expensive ones), the Python example trains, and every relative link resolves.

A command the README shows that is neither run here nor mapped below fails
:func:`test_every_readme_command_is_run_or_mapped`: add it to ``CHEAP`` (run here, seconds) or to ``MAPPED`` (the test
that runs it)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


# ---- what the README shows ---------------------------------------------------------------------------------------
def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of one language ("" for plain blocks)."""
    return [body for lng, body in FENCE.findall(text) if lng == lang]


def shell_commands(text: str) -> list[str]:
    """Every command line of the bash blocks: continuations joined, comments and blank lines dropped."""
    cmds = []
    for body in blocks(text, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment (always "  # ..." here)
            if line and not line.startswith("#"):
                cmds.append(re.sub(r"\s+", " ", line))
    return cmds


def inline_commands(text: str) -> list[str]:
    """`outlierfree ...` written inline in the prose and the command table (code blocks removed first)."""
    prose = FENCE.sub("", text)
    return [re.sub(r"\s+", " ", c) for c in re.findall(r"`(outlierfree [^`]+)`", prose)]


def shown_outputs(text: str) -> list[tuple[str, list[str]]]:
    """(command, the lines shown after it) of each `$ command` in a plain block."""
    out = []
    for body in blocks(text, ""):
        for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
            cmd, *shown = chunk.rstrip("\n").split("\n")
            out.append((cmd.strip(), shown))
    return out


def readme() -> str:
    return README.read_text()


# ---- how each command is covered -----------------------------------------------------------------------------------
# run here: seconds each, in process through the CLI's entry point
CHEAP = [r"outlierfree models", r"outlierfree demo( .*)?"]
# a command with a placeholder (MODEL, RUN_DIR) or none after the subcommand: its --help is run here
PLACEHOLDER = re.compile(r"outlierfree (\w+)( (MODEL|RUN_DIR)( --out DIR)?)?")
# too slow for this file: (pattern, [(file, text that file must hold: the test or line that runs it)], why)
MAPPED = [
    (r"bash setup\.sh && outlierfree reproduce --preset quick",
     [(".ci/run", "bash setup.sh"), ("tests/reproduce/test_reproduce.py", "def test_quick_preset_end_to_end("),
      ("tests/reproduce/test_release.py", "def test_main_job_opens_its_report_with_the_releases(")],
     "CI runs setup.sh; the tests run the quick preset (reduced steps) and its released-checkpoints section"),
    (r"python3 -m pytest", [(".ci/run", "python3 -m pytest")], "CI's own command"),
    (r"bash setup\.sh", [(".ci/run", "bash setup.sh")], "CI runs it on a clean clone"),
    (r'pip install -e "\.\[deploy\]"', [("setup.sh", 'pip_install -e ".[test,gguf,hub,deploy,openvino]"'), (".ci/run", "bash setup.sh")],
     "setup.sh installs the package with these extras (and more), and CI runs setup.sh"),
    (r"outlierfree doctor (path/to/model|\"\$\(python3 -c '[^']+'\)\") --out out/doctor",
     [("tests/quant/test_cli.py", "def test_doctor_measures_every_fix_and_says_what_to_do("),
      ("tests/analysis/test_pretrained.py", "def test_minilm_cli(")],
     "doctor end to end on a trained tiny BERT; MiniLM found by the same one-liner and loaded by analyze (doctor's "
     "first stage); the full doctor on MiniLM takes a minute"),
    (r"outlierfree export MODEL --symmetric-attention --runtime openvino --out DIR",
     [("tests/export/test_export.py", "def test_symmetric_attention("),
      ("tests/export/test_export.py", "def test_cli_export_and_quantize_backend(")],
     "the export with symmetric attention grids in both runtimes on BERT / OPT / ViT, and the export command end to "
     "end"),
    (r"outlierfree analyze runs/bert-clipped/model",
     [("tests/analysis/test_cli.py", "def test_analyze_two_models_side_by_side(")], "analyze on trained tiny BERTs"),
    (r"outlierfree quantize runs/bert-clipped/model --out runs/bert-clipped/quant",
     [("tests/quant/test_cli.py", "def test_quantize_writes_json_markdown_and_plot(")], "quantize on a trained tiny BERT"),
]


def coverage(cmd: str) -> str | None:
    """How a README command is covered: "cheap", "help", "mapped", or None (not covered)."""
    if any(re.fullmatch(p, cmd) for p in CHEAP):
        return "cheap"
    if PLACEHOLDER.fullmatch(cmd):
        return "help"
    if any(re.fullmatch(p, cmd) for p, _, _ in MAPPED):
        return "mapped"
    return None


def all_commands(shown: bool = True) -> list[str]:
    """The README's commands: its bash blocks, inline `outlierfree ...`, and (``shown``) its `$ command` examples."""
    text = readme()
    cmds = shell_commands(text) + inline_commands(text) + ([c for c, _ in shown_outputs(text)] if shown else [])
    return list(dict.fromkeys(cmds))  # each once


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    text = readme()
    assert shell_commands(text)[:2] == ["bash setup.sh && outlierfree reproduce --preset quick", "python3 -m pytest"]
    assert text.index("bash setup.sh && outlierfree reproduce") < 200  # the very first block
    assert len(text.splitlines()) <= 200


def test_every_readme_command_is_run_or_mapped():
    cmds = all_commands()
    assert len(cmds) >= 10, cmds  # the extraction itself works
    missing = [c for c in cmds if coverage(c) is None]
    assert not missing, f"README commands neither run by tests/test_readme.py nor mapped to a test: {missing}"


@pytest.mark.parametrize("pattern,holders,why", MAPPED, ids=[m[0][:40] for m in MAPPED])
def test_mapped_commands_are_run_where_the_map_says(pattern, holders, why):
    """The map cannot rot: the test (or CI line) named for an expensive command exists and is still there."""
    for rel, needle in holders:
        assert needle in (ROOT / rel).read_text(), f"{rel} no longer holds {needle!r} ({why})"


def test_every_mapped_pattern_is_in_the_readme():
    cmds = all_commands()
    stale = [p for p, _, _ in MAPPED if not any(re.fullmatch(p, c) for c in cmds)]
    assert not stale, f"MAPPED entries for commands the README no longer shows: {stale}"


# ---- the cheap ones, run --------------------------------------------------------------------------------------------
def cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI's entry point in process: (exit status, stdout, stderr)."""
    from outlierfree.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cheap_readme_commands_run(capsys):
    ran = 0
    for cmd in all_commands(shown=False):  # the `$ command` examples: test_shown_output_is_what_the_command_prints
        kind = coverage(cmd)
        if kind == "cheap":
            code, out, err = cli(capsys, shlex.split(cmd)[1:])
            assert code == 0 and out.strip(), (cmd, err)
        elif kind == "help":
            sub = PLACEHOLDER.fullmatch(cmd).group(1)
            code, out, err = cli(capsys, [sub, "--help"])
            assert code == 0 and f"outlierfree {sub}" in out, (cmd, err)
        else:
            continue
        ran += 1
    assert ran >= 10


def test_shown_output_is_what_the_command_prints(capsys):
    shown = shown_outputs(readme()) + [s for d in DOCS for s in shown_outputs(d.read_text())]
    assert shown
    for cmd, lines in shown:
        assert coverage(cmd) == "cheap", cmd
        code, out, err = cli(capsys, shlex.split(cmd)[1:])
        assert (out + err).strip().splitlines() == lines, cmd
        assert code == (2 if lines[0].startswith("error: ") else 0)


def test_the_python_example_trains(tmp_path):
    """The README's example, as a script, with 2 steps instead of 100 and its run directory in tmp_path. A config
    that switches attention off at initialisation (the project's own dead-at-init check) fails it."""
    (example,) = blocks(readme(), "python")
    script = example
    for old, new in (("steps=100", "steps=2"), ('out="runs/bert-clipped"', f'out="{tmp_path / "bert-clipped"}"')):
        assert script.count(old) == 1, f"the README example no longer says {old}"
        script = script.replace(old, new)
    guard = ("import warnings\nfrom outlierfree.models.build import DeadAttentionWarning\n"
             "warnings.simplefilter('error', DeadAttentionWarning)\n")
    r = subprocess.run([sys.executable, "-c", guard + script], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    promised = re.search(r"print\(.*\)\s+#\s*(.+)$", example, re.M).group(1).strip()  # the comment on the print
    assert r.stdout.strip().splitlines()[-1] == promised
    assert (tmp_path / "bert-clipped" / "DONE").is_file() and (tmp_path / "bert-clipped" / "model").is_dir()


# ---- links and cited files ------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", md.read_text()), re.M)}


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(md):
    text = FENCE.sub("", md.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):  # http(s):, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        assert target.exists(), f"{md.name}: link {link!r} points to a missing file"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{md.name}: link {link!r}: no heading with that anchor"


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_cited_repository_files_exist_and_nothing_is_left_to_fill_in(md):
    text = md.read_text()
    for path in re.findall(r"`((?:src|docs|tests|benchmarks|\.ci)/[^`\s*<>]+)`", text):
        if path.startswith("benchmarks/results/"):  # what a benchmark writes when run: not in the repository
            continue
        assert (ROOT / path.split("::")[0]).exists(), f"{md.name} cites {path}, which does not exist"
    assert not re.search(r"\b(TODO|TBD|FIXME|XXX)\b", text), f"{md.name} has a placeholder left in it"
