"""Runs grouped by identical checkpoints, reading as few checkpoint pairs as the verdicts known allow.

Stock's own runs can disagree on CUDA (Defuser's and llm-compressor's per-expert loops sum with
``index_add_``, which is not deterministic there), so a run compared with one stock run alone cannot
tell a run that differs from stock from a stock run that differs from the others. Identity is an
equivalence: a run identical to one member of a group is identical to all of them, and a run that
differs from one member differs from the group, so the comparisons a benchmark already made settle
many pairs without reading them again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping


def group_identical(names: Iterable[Hashable], known: Mapping[tuple, bool], compare: Callable[[Hashable, Hashable], bool],
                    may_compare: Callable[[], bool] = lambda: True) -> tuple[list[list], list]:
    """``names`` in groups of identical checkpoints, in order (the first name's group first), and the names
    left unsettled.

    ``known``: verdicts already reached, ``(a, b) -> identical`` (either order). They decide through identity
    being an equivalence: a name identical (by known verdicts, through any chain of them) to a member of a
    group joins it, and one identical to a run that differs from a member does not. Otherwise
    ``compare(first member, name)`` reads the pair, while ``may_compare()`` allows (a deadline): once it
    does not, a name no verdict places is left unsettled, and so is every later one that needs a read.
    """
    names = list(names)
    parent = {name: name for name in names}
    for a, b in known:
        parent.setdefault(a, a)
        parent.setdefault(b, b)

    def root(x: Hashable) -> Hashable:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    differ: list[tuple] = []
    for (a, b), same in known.items():
        if same:
            parent[root(a)] = root(b)
        else:
            differ.append((a, b))

    def verdict(group: list, name: Hashable) -> bool | None:
        mine, theirs = root(name), root(group[0])
        if mine == theirs:
            return True
        if any({root(a), root(b)} == {mine, theirs} for a, b in differ):
            return False
        return None

    groups: list[list] = []
    unsettled: list = []
    for name in names:
        placed, stuck = None, False
        for group in groups:
            same = verdict(group, name)
            if same is None:
                if unsettled or not may_compare():
                    stuck = True
                    continue
                same = bool(compare(group[0], name))
                if same:
                    parent[root(name)] = root(group[0])
                else:
                    differ.append((group[0], name))
            if same:
                placed = group
                break
        if placed is not None:
            placed.append(name)
        elif stuck:
            unsettled.append(name)
        else:
            groups.append([name])
    return groups, unsettled
