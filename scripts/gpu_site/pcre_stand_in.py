"""Stand-in for PyPcre (no wheel: it compiles against libpcre2): the stdlib ``re`` API GPTQModel uses.

scripts/gpu_site/build.sh copies it to ``pcre/__init__.py`` of the folder it builds.
"""
import enum
import re
from re import Match, Pattern, compile, escape, findall, finditer, fullmatch, match, search, split, sub, subn
from re import error as PcreError


class Flag(enum.IntFlag):
    CASELESS = re.IGNORECASE
    IGNORECASE = re.IGNORECASE
    MULTILINE = re.MULTILINE
    DOTALL = re.DOTALL
    VERBOSE = re.VERBOSE
    EXTENDED = re.VERBOSE
    UNICODE = re.UNICODE
