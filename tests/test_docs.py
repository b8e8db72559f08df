"""The docs are a manual: no lab-notebook wording, and every relative link leads somewhere.

Fast and free of OneFlow: it reads README.md, docs/*.md and, for the notebook words, the tracked code.
"""

import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md")))

# Words that belong in commit messages, not in a user's manual. "issue" only where it names a ticket
# ("the title", "issue #12"), so that plain English ("a known issue with X") stays possible.
NOTEBOOK = {
    "session": r"\bsessions?\b",
    "workplace": r"\bworkplaces?\b",
    "ticket": r"\btickets?\b",
    "issue as a ticket": r"\b(?:the|this|that|our) issue\b(?! (?:is|was)\b)|\bissue'?s\b|\bissue ?#\d+|\bissues? \d+\b",
    "dated entry": r"\b(?:19|20)\d\d-[01]\d-[0-3]\d\b",
}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")


def rel(path):
    return os.path.relpath(path, REPO)


def prose(text):
    """The text without fenced blocks and inline code, with line numbers kept (blocks become blank lines)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE.sub("", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_the_docs_are_found():
    names = {rel(p) for p in DOCS}
    assert {"README.md", "docs/quality.md", "docs/speed.md", "docs/details.md"} <= names


@pytest.mark.parametrize("word", sorted(NOTEBOOK))
def test_no_lab_notebook_words(word):
    pattern = re.compile(NOTEBOOK[word], re.I)
    hits = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # Dates count in code too (a dated command is still a log entry); words only in prose.
        scanned = text if word == "dated entry" else prose(text)
        for number, line in enumerate(scanned.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{rel(path)}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)


# In code "session" is ONNX Runtime's, pytest's or a process's; a working session's is what is refused there.
CODE_NOTEBOOK = {**NOTEBOOK, "session": r"\bsessions? \d+\b|\b(?:this|last|next|previous) session\b"}
CODE_FILES = (".py", ".sh", ".txt", ".toml", ".cfg", ".yaml", ".yml")


def tracked_code():
    listed = subprocess.run(["git", "-C", REPO, "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed here ({listed.stderr.strip()}); the docs tests above still ran")
    names = [n for n in listed.stdout.splitlines() if n.endswith(CODE_FILES) or n.startswith(".ci/")]
    return [os.path.join(REPO, n) for n in names if n != "tests/test_docs.py" and os.path.isfile(os.path.join(REPO, n))]


def test_no_lab_notebook_words_in_code_either():
    hits = []
    for path in tracked_code():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                hits += [f"{rel(path)}:{number}: {w}" for w, p in CODE_NOTEBOOK.items() if re.search(p, line, re.I)]
    assert hits == [], "\n".join(hits)


def test_the_word_patterns_catch_what_they_are_for():
    examples = {
        "session": "as in session 3",
        "workplace": "a workplace",
        "ticket": "a ticket",
        "issue as a ticket": "The issue's title",
        "dated entry": "on 2000-01-31",
    }
    for word, text in examples.items():
        assert re.search(NOTEBOOK[word], text, re.I), word
    assert not re.search(NOTEBOOK["issue as a ticket"], "a known issue with OneFlow's converter", re.I)
    assert not re.search(NOTEBOOK["session"], "ort.InferenceSession and start_new_session", re.I)
    assert re.search(CODE_NOTEBOOK["session"], "# as in session 12", re.I)
    assert not re.search(CODE_NOTEBOOK["session"], "session = ort.InferenceSession(path)", re.I)


def links():
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = prose(f.read())
        for number, line in enumerate(text.splitlines(), 1):
            for target in LINK.findall(line):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                    yield path, number, target


def test_every_relative_link_leads_to_a_file():
    broken = []
    for path, number, target in links():
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(f"{rel(path)}:{number}: {target} (no such file)")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{rel(path)}:{number}: {target} (no heading #{anchor} in {rel(dest)})")
    assert broken == [], "\n".join(broken)
