"""Include/exclude rules over full module paths.

``+:regex`` includes, ``-:regex`` excludes, a bare ``regex`` includes. With no include rule
everything is included; an exclude rule always wins. Patterns use ``re.search``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import FilterRuleError


@dataclass(frozen=True)
class FilterRules:
    include: tuple[re.Pattern[str], ...] = field(default_factory=tuple)
    exclude: tuple[re.Pattern[str], ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, rules: str | Iterable[str] | FilterRules | None) -> FilterRules:
        """Compile ``rules``; raises FilterRuleError naming the offending rule."""
        if rules is None:
            return cls()
        if isinstance(rules, FilterRules):
            return rules
        if isinstance(rules, str):
            rules = [rules]
        include, exclude = [], []
        for rule in rules:
            if not isinstance(rule, str) or not rule:
                raise FilterRuleError(f"filter rule {rule!r} must be a non-empty string like '+:regex' or '-:regex'")
            target, pattern = include, rule
            if rule.startswith("+:"):
                pattern = rule[2:]
            elif rule.startswith("-:"):
                target, pattern = exclude, rule[2:]
            try:
                target.append(re.compile(pattern))
            except re.error as exc:
                raise FilterRuleError(f"filter rule {rule!r} is not a valid regular expression: {exc}") from exc
        return cls(tuple(include), tuple(exclude))

    def allows(self, path: str) -> bool:
        if any(p.search(path) for p in self.exclude):
            return False
        return not self.include or any(p.search(path) for p in self.include)
