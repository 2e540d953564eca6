"""Content rule that recognises machine-generated Python files: codec maps, Unicode tables, literal-number tables.

Such files teach a small model to emit `0x00e9: 0x00c7,  # LATIN SMALL ...` rows and make its samples look like
noise. The rule looks only at the text, never at a file name, so it holds for any Python version's stdlib:

- a *table row* is a source line whose tokens (Python's own `tokenize`) hold more than `CELLS_PER_NAME` times as
  many cells (numbers, short one-line string literals) as names (identifiers, keywords): `0x0080: 0x00c7,`,
  `'\\x00'`, `(0x41, 'Lu', 0),`, or `_TABLE = [0, 7919, ...]` with thousands of numbers after one name;
- a file is generated when table rows hold at least `GENERATED_SHARE` of its code characters (names, literals and
  operators; comments and whitespace do not count) and at least `MIN_TABLE_CHARS` characters: a short list of
  constants in an ordinary module is not a table.

Text that does not tokenize as Python is never called generated.
"""

from __future__ import annotations

import io
import re
import tokenize

GENERATED_SHARE = 0.5
MIN_TABLE_CHARS = 1000
CELLS_PER_NAME = 4
SHORT_STRING_CHARS = 64  # longer string literals are prose (docs, messages), not table cells
# Only text with this share of digits and quotes can be a literal table; the cheap test spares tokenizing the rest.
LITERAL_CHARS = re.compile(r"[0-9'\"]")
MIN_LITERAL_CHAR_SHARE = 0.04

_CODE_TOKENS = frozenset({tokenize.NAME, tokenize.NUMBER, tokenize.STRING, tokenize.OP})


def _is_cell(tok: tokenize.TokenInfo) -> bool:
    """A number, or a short one-line string literal: what table rows are made of."""
    if tok.type == tokenize.NUMBER:
        return True
    return tok.type == tokenize.STRING and "\n" not in tok.string and len(tok.string) <= SHORT_STRING_CHARS


def table_chars(text: str) -> tuple[int, int]:
    """(code characters on table rows, all code characters) of Python source; (0, 0) if it does not tokenize."""
    rows: dict[int, list[int]] = {}  # line -> [code chars, names, cells]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type not in _CODE_TOKENS:
                continue
            row = rows.setdefault(tok.start[0], [0, 0, 0])
            row[0] += len(tok.string)
            row[1] += tok.type == tokenize.NAME
            row[2] += _is_cell(tok)
    except (tokenize.TokenError, SyntaxError):
        return 0, 0
    total = sum(chars for chars, _, _ in rows.values())
    table = sum(chars for chars, names, cells in rows.values() if cells > CELLS_PER_NAME * names)
    return table, total


def is_generated(text: str) -> bool:
    """Whether Python source is mostly literal-table rows (see the module docstring for the rule)."""
    if not text or len(LITERAL_CHARS.findall(text)) < MIN_LITERAL_CHAR_SHARE * len(text):
        return False
    table, total = table_chars(text)
    return table >= MIN_TABLE_CHARS and table >= GENERATED_SHARE * total
