"""Resident memory of a process and all its descendants, read from /proc."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces and parentheses.
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(pid: int) -> float:
    """VmRSS summed over the process and its descendants (shared pages count once per process)."""
    tree = _children()
    total = 0
    todo = [pid]
    seen: set[int] = set()
    while todo and len(seen) < 10_000:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss_kib(current)
        todo.extend(tree.get(current, []))
    return total / 1024
