"""Read a tracepoint's ``format`` file: its event id, its fields, and the reason names of its print format.

The reason names (``HLT``, ``npf``, ``KVM_EXIT_MMIO``) are read at run time from the ``__print_symbolic(...)``
tables of the tracepoint's ``print fmt``, never copied into the code: the kernel adds reasons between releases.
``kvm:kvm_exit`` holds two tables chosen by a condition on its ``isa`` field (``REC->isa == 1``: VMX, else
SVM); the condition is read, not the tables' positions. Tables of tracepoints with no ``isa`` condition are
keyed ``None``.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field

from .counter import TracepointSpec

TRACING_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# KVM_ISA_VMX / KVM_ISA_SVM (arch/x86/kvm/trace.h): the else branch of "isa == 1" is the other one.
ISA_VALUES = (1, 2)


class FormatError(OSError):
    """A format file is missing, unreadable or not what the parser understands; ``str()`` says which and why."""


@dataclass(frozen=True)
class FieldFormat:
    """One ``field:`` line: where the value sits in the record."""

    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class TracepointFormat:
    """What a tracepoint's ``format`` file says: ``tables`` maps an isa value (None: no isa condition) to the
    reason names by code (codes as the field holds them: ``-1`` of a u32 field is 0xffffffff); ``value_masks``
    holds, per table, the mask its print format applies to the field before looking the name up (kvm_exit's
    VMX table: 0xffff, the high bits being flags), None when it applies none."""

    name: str
    event_id: int
    fields: dict[str, FieldFormat]
    tables: dict[int | None, dict[int, str]] = field(default_factory=dict)
    value_masks: dict[int | None, int | None] = field(default_factory=dict)

    def spec(self, reason_field: str) -> TracepointSpec:
        """Where a mechanism finds the reason (and the isa, if the record has one) in this tracepoint's record."""
        reason = self.fields.get(reason_field)
        if reason is None:
            raise FormatError(f"tracepoint {self.name} has no field {reason_field!r} "
                              f"(fields: {', '.join(sorted(self.fields))})")
        isa = self.fields.get("isa")
        return TracepointSpec(self.name, self.event_id, reason_field, reason.offset, reason.size,
                              isa.offset if isa is not None else None, isa.size if isa is not None else 4)


def find_tracing_root() -> str | None:
    """tracefs where it is mounted (``/sys/kernel/tracing``, else debugfs's ``tracing``): the first one that
    holds ``events/``; None when neither does."""
    for root in TRACING_ROOTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def format_path(tracepoint: str, root: str | None = None) -> str:
    """The ``format`` file of ``tracepoint`` ("kvm/kvm_exit") under ``root`` (or the tracing root found)."""
    base = root if root is not None else find_tracing_root()
    if base is None:
        raise FormatError(f"no tracefs: neither of {', '.join(TRACING_ROOTS)} holds events/ "
                          "(mount tracefs on /sys/kernel/tracing, or debugfs on /sys/kernel/debug)")
    return os.path.join(base, "events", tracepoint, "format")


def read_format(tracepoint: str, root: str | None = None) -> TracepointFormat:
    """Read and parse ``tracepoint``'s format file ("kvm/kvm_exit"); :class:`FormatError` naming the path."""
    path = format_path(tracepoint, root)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError as err:
        raise FormatError(err.errno, f"cannot read {path}: {err.strerror or err}") from err
    try:
        return parse_format(text, tracepoint.rsplit("/", 1)[-1])
    except FormatError as err:
        raise FormatError(f"{path}: {err}") from err


_FIELD = re.compile(r"^\s*field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
                    r"\s*signed:(?P<signed>[01]);", re.M)
_ENTRY = re.compile(r'\{\s*(?P<code>[^,{}"]+?)\s*,\s*(?P<name>(?:"(?:[^"\\]|\\.)*"\s*)+)\}')
_ISA_COND = re.compile(r"REC->isa\s*(?P<op>==|!=)\s*(?P<value>\d+)\b")


def parse_format(text: str, name: str) -> TracepointFormat:
    """Parse a format file's ``text`` (pure); :class:`FormatError` saying what is missing or malformed."""
    id_match = re.search(r"^ID:\s*(\d+)\s*$", text, re.M)
    if id_match is None:
        raise FormatError(f"format of {name} has no ID: line (truncated or not a format file)")
    fields: dict[str, FieldFormat] = {}
    for match in _FIELD.finditer(text):
        words = re.sub(r"\[.*\]", "", match.group("decl")).split()
        if not words:
            raise FormatError(f"format of {name}: field line without a name: {match.group(0).strip()!r}")
        fields[words[-1]] = FieldFormat(int(match.group("offset")), int(match.group("size")),
                                        match.group("signed") == "1")
    if not fields:
        raise FormatError(f"format of {name} has no field: lines (truncated or not a format file)")
    fmt_match = re.search(r"^print fmt:(.*)$", text, re.M | re.S)
    if fmt_match is None:
        raise FormatError(f"format of {name} has no 'print fmt:' line (truncated)")
    tables, masks = _parse_tables(fmt_match.group(1), name, fields)
    return TracepointFormat(name, int(id_match.group(1)), fields, tables, masks)


def _mask_strings(text: str) -> str:
    """``text`` with the inside of every string literal replaced by spaces, so that the ``?:(),{}`` in reason
    names do not disturb the structure scan; same length, so positions carry over."""
    out = list(text)
    inside, escaped = False, False
    for pos, char in enumerate(text):
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
                continue
            out[pos] = " "
        elif char == '"':
            inside = True
    if inside:
        raise FormatError("unterminated string literal")
    return "".join(out)


def _closing(masked: str, open_pos: int) -> int:
    """Position of the parenthesis closing the one at ``open_pos``."""
    depth = 0
    for pos in range(open_pos, len(masked)):
        if masked[pos] in "({":
            depth += 1
        elif masked[pos] in ")}":
            depth -= 1
            if depth == 0:
                return pos
    raise FormatError("unbalanced parentheses (truncated)")


def _condition_before(masked: str, pos: int) -> tuple[str, bool] | None:
    """The ternary condition choosing the expression starting at ``pos``: (condition text, True when the
    expression is the then-branch); None when the expression is not a ternary branch."""
    back = pos - 1
    while back >= 0 and masked[back].isspace():
        back -= 1
    if back < 0 or masked[back] not in "?:":
        return None
    then_branch = masked[back] == "?"
    question = back
    if not then_branch:  # find the "?" this ":" belongs to, skipping nested ternaries and brackets
        depth, pending = 0, 0
        question = -1
        for scan in range(back - 1, -1, -1):
            char = masked[scan]
            if char in ")}":
                depth += 1
            elif char in "({":
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and char == ":":
                pending += 1
            elif depth == 0 and char == "?":
                if pending == 0:
                    question = scan
                    break
                pending -= 1
        if question < 0:
            raise FormatError(f"':' without its '?' before position {pos}")
    depth, start = 0, 0
    for scan in range(question - 1, -1, -1):  # the condition runs back to the enclosing , ( ? or :
        char = masked[scan]
        if char in ")}":
            depth += 1
        elif char in "({":
            if depth == 0:
                start = scan + 1
                break
            depth -= 1
        elif depth == 0 and char in ",?:":
            start = scan + 1
            break
    return masked[start:question], then_branch


def _isa_key(condition: tuple[str, bool] | None) -> int | None:
    """The isa value a table applies to, from the condition that chooses it (None: not an isa condition)."""
    if condition is None:
        return None
    match = _ISA_COND.search(condition[0])
    if match is None:
        return None
    value, then_branch = int(match.group("value")), condition[1]
    if (match.group("op") == "==") == then_branch:
        return value
    others = [isa for isa in ISA_VALUES if isa != value]
    if len(others) != 1:
        raise FormatError(f"isa condition {condition[0].strip()!r}: cannot tell which isa its other branch is")
    return others[0]


def _parse_tables(fmt: str, name: str, fields: dict[str, FieldFormat]
                  ) -> tuple[dict[int | None, dict[int, str]], dict[int | None, int | None]]:
    try:
        masked = _mask_strings(fmt)
    except FormatError as err:
        raise FormatError(f"print fmt of {name}: {err}") from None
    tables: dict[int | None, dict[int, str]] = {}
    masks: dict[int | None, int | None] = {}
    for match in re.finditer(r"__print_symbolic\s*\(", masked):
        open_pos = match.end() - 1
        try:
            close = _closing(masked, open_pos)
            key = _isa_key(_condition_before(masked, match.start()))
        except FormatError as err:
            raise FormatError(f"print fmt of {name}: {err}") from None
        body, masked_body = fmt[open_pos + 1:close], masked[open_pos + 1:close]
        comma = masked_body.find(",")
        value_expr = masked_body[:comma] if comma >= 0 else masked_body
        field_match = re.search(r"REC->(\w+)", value_expr)
        if field_match is None or field_match.group(1) not in fields:
            raise FormatError(f"print fmt of {name}: __print_symbolic of {value_expr.strip()!r}, not of a field")
        width_mask = (1 << (8 * fields[field_match.group(1)].size)) - 1
        mask_match = re.search(r"&\s*(0x[0-9a-fA-F]+|\d+)\b", value_expr)
        if key in tables:
            raise FormatError(f"print fmt of {name}: two reason tables for isa {key}")
        masks[key] = int(mask_match.group(1), 0) if mask_match else None
        table: dict[int, str] = {}
        for entry in _ENTRY.finditer(body):
            code = _eval_code(entry.group("code"), name) & width_mask
            literals = re.findall(r'"(?:[^"\\]|\\.)*"', entry.group("name"))
            table[code] = "".join(ast.literal_eval(lit) for lit in literals)  # "KVM_EXIT_" "IO": one name
        if not table:
            raise FormatError(f"print fmt of {name}: a __print_symbolic table with no {{ code, \"name\" }} entry")
        tables[key] = table
    return tables, masks


def _eval_code(expr: str, name: str) -> int:
    """A table code: an integer expression of literals (``0x040 + 14``, ``-1``, ``1 << 3``)."""
    text = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", expr.strip())  # 1UL -> 1
    try:
        return _literal_int(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError) as err:
        raise FormatError(f"print fmt of {name}: reason code {expr.strip()!r} is not an integer: {err}") from None


_BINARY = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.BitOr: int.__or__, ast.LShift: int.__lshift__}


def _literal_int(node: ast.expr) -> int:
    """The value of an expression of integer literals, +, -, | and <<; ValueError on anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal_int(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_literal_int(node.left), _literal_int(node.right))
    raise ValueError("not a literal integer expression")
