"""Run a markdown tutorial as written, in the current directory.

Reads the page top to bottom and, in order:

- a fenced block right after ``<!-- file: PATH -->`` is written to PATH (what the reader types
  into their editor);
- a ```` ```bash ```` block is run with ``bash -euo pipefail`` (what the reader types into their shell);
- ``<!-- expect: TEXT -->`` after a bash block: its output (stdout and stderr) must contain TEXT;
  ``<!-- expect-not: TEXT -->``: must not.

Any other block (``text``, ``python`` without a file marker, ...) is only read. Used by
``run_tutorial.sh``; ``parse`` is also used by the tests that keep the page and the package in step.

    python run_tutorial.py TUTORIAL.md
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
FILE = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->\s*$")
EXPECT = re.compile(r"^<!--\s*(expect|expect-not):\s*(.*?)\s*-->\s*$")


@dataclass
class Step:
    kind: str  # "file" | "bash"
    text: str
    line: int
    path: str | None = None  # for "file"
    expect: list[str] = field(default_factory=list)
    expect_not: list[str] = field(default_factory=list)


def parse(markdown: str) -> list[Step]:
    """The page's steps, in order."""
    steps: list[Step] = []
    lines = markdown.splitlines(keepends=True)
    i, pending_file = 0, None
    last_bash: Step | None = None
    while i < len(lines):
        line = lines[i].rstrip("\n")
        marker = FILE.match(line)
        if marker:
            pending_file = marker.group(1)
            i += 1
            continue
        expect = EXPECT.match(line)
        if expect:
            if last_bash is None:
                raise ValueError(f"line {i + 1}: an expect comment must follow a bash block")
            (last_bash.expect if expect.group(1) == "expect" else last_bash.expect_not).append(expect.group(2))
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            ticks, lang = fence.group(1), fence.group(2)
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and lines[i].rstrip("\n") != ticks:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"line {start + 1}: unclosed code block")
            i += 1
            text = "".join(body)
            if pending_file is not None:
                steps.append(Step("file", text, start + 1, path=pending_file))
                last_bash = None
            elif lang == "bash":
                last_bash = Step("bash", text, start + 1)
                steps.append(last_bash)
            else:
                last_bash = None
            pending_file = None
            continue
        if line.strip() and not line.startswith("<!--"):  # prose ends what a marker or a block began
            last_bash, pending_file = None, None
        i += 1
    return steps


def run(page: Path) -> None:
    steps = parse(page.read_text())
    for step in steps:
        if step.kind == "file":
            path = Path(step.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step.text)
            print(f"--- {page.name}:{step.line}: wrote {path}", flush=True)
            continue
        print(f"--- {page.name}:{step.line}:\n{step.text.rstrip()}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", step.text], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        print(done.stdout.rstrip(), flush=True)
        print(f"--- ({time.perf_counter() - started:.1f} s, exit {done.returncode})", flush=True)
        if done.returncode != 0:
            sys.exit(f"{page}:{step.line}: the commands failed (exit {done.returncode})")
        for text in step.expect:
            if text not in done.stdout:
                sys.exit(f"{page}:{step.line}: the output does not contain {text!r}")
        for text in step.expect_not:
            if text in done.stdout:
                sys.exit(f"{page}:{step.line}: the output contains {text!r}, which it should not")
    print(f"{page}: {sum(s.kind == 'bash' for s in steps)} command blocks and "
          f"{sum(s.kind == 'file' for s in steps)} files, all as written", flush=True)


if __name__ == "__main__":
    run(Path(sys.argv[1]).resolve())
