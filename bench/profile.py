"""Summaries of a2ad's profiles: the hottest functions by own time and by time
spent inside them (py-spy's raw collapsed stacks, or a cProfile file).

    python -m bench.profile FILE [FILE ...] [--top N]
"""

from __future__ import annotations

import argparse
import pstats
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """`func (path/to/a2ad/store.py:123)` → `a2ad/store.py:func`."""
    found = _FRAME.match(frame.strip())
    if found is None:
        return frame.strip()
    path = found.group("file")
    for marker in ("/a2ad/", "/site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = marker.strip("/") + "/" + path.split(marker, 1)[1]
            break
    return f"{path}:{found.group('func')}"


def _thread_name(frame: str) -> str | None:
    """`thread (2628): MainThread` → `MainThread` (py-spy --threads); else None."""
    if not frame.startswith("thread ("):
        return None
    return frame.split(": ", 1)[1] if ": " in frame else frame


def py_spy(paths: list[Path], top: int) -> str:
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    own_by_thread: dict[str, Counter[str]] = {}
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            raw_frames = [f for f in stack.split(";") if f.strip()]
            thread = _thread_name(raw_frames[0]) if raw_frames else None
            if thread is not None:
                raw_frames = raw_frames[1:]
            thread = thread or "all threads"
            frames = [_short(f) for f in raw_frames] or ["(no Python frame)"]
            total += count
            threads[thread] += count
            own[frames[-1]] += count
            own_by_thread.setdefault(thread, Counter())[frames[-1]] += count
            for name in set(frames):
                inside[name] += count
    if not total:
        return "no samples"
    by_package: Counter[str] = Counter()
    for name, n in own.items():
        by_package[name.split("/", 1)[0].split(":", 1)[0] or "?"] += n
    out = [f"{total} samples (py-spy, busy threads only; time in C is its caller's)", ""]
    out += ["by thread:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    out += ["", "own time by package:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in by_package.most_common(8)]
    for thread, n_thread in threads.most_common():
        if n_thread < 0.05 * total:
            continue
        out += ["", f"own time (self), {thread}:"]
        counts = own_by_thread[thread].most_common(top if thread == "MainThread" else top // 2)
        out += [f"  {n / total:6.1%}  {name}" for name, n in counts]
    out += ["", "a2ad functions, time inside them (inclusive, all threads):"]
    mine = [
        (name, n)
        for name, n in inside.most_common()
        if name.startswith("a2ad/") and not name.startswith("a2ad/__main__.py")
    ]
    out += [f"  {n / total:6.1%}  {name}" for name, n in mine[:top]]
    return "\n".join(out)


def cprofile(paths: list[Path], top: int) -> str:
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "no profile written"
    stats = pstats.Stats(*existing)
    rows = []
    # pstats keeps (calls, primitive calls, own time, cumulative time, callers).
    for (file, line, func), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((own, cumulative, calls, _short(f"{func} ({file}:{line})")))
    total = sum(r[0] for r in rows) or 1.0
    out = ["own time (cProfile):"]
    for own, _, calls, name in sorted(rows, reverse=True)[:top]:
        out.append(f"  {own / total:6.1%}  {own:7.2f} s  {calls:>9}  {name}")
    out += ["", "a2ad functions, cumulative:"]
    mine = sorted((r for r in rows if r[3].startswith("a2ad/")), key=lambda r: -r[1])
    for _, cumulative, calls, name in mine[:top]:
        out.append(f"  {cumulative:7.2f} s  {calls:>9}  {name}")
    return "\n".join(out)


def summarize(paths: list[Path], top: int = 25) -> str:
    if any(p.suffix == ".prof" for p in paths):
        return cprofile(paths, top)
    return py_spy(paths, top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summarize(args.files, args.top))


if __name__ == "__main__":
    main()
