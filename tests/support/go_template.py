"""A small renderer for the subset of Go's text/template that convert/modelfile.py emits (Ollama's TEMPLATE).

Semantics follow https://pkg.go.dev/text/template: `{{-`/`-}}` trim all adjacent white space; `$x := v` declares
in the enclosing control structure, `$x = v` assigns the nearest declaration; `range` sets dot to each element;
`if` / `else if` / `else`; `and` returns its first false argument (or the last), `eq`/`ne` compare; truth is
Go's (false, 0, "", nil and empty collections are false). Anything else is a SyntaxError, so a template that
grows beyond the subset fails the test instead of rendering wrongly.
"""

from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|:=|=|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|\w+)')


def parse(template: str) -> list:
    """The template as nested nodes: ("text", s), ("action", words), ("if", [(cond, body)], else), ("range", ...)."""
    items: list[tuple[str, Any]] = []
    pos = 0
    for m in ACTION.finditer(template):
        items.append(("text", template[pos : m.start()]))
        items.append(("action", (m.group(2).strip(), bool(m.group(1)), bool(m.group(3)))))
        pos = m.end()
    items.append(("text", template[pos:]))
    for i, (kind, value) in enumerate(items):  # trimming applies to the neighbouring text
        if kind == "action":
            _, left, right = value
            if left and items[i - 1][0] == "text":
                items[i - 1] = ("text", items[i - 1][1].rstrip(" \t\r\n"))
            if right and items[i + 1][0] == "text":
                items[i + 1] = ("text", items[i + 1][1].lstrip(" \t\r\n"))
    nodes, rest = _block([(k, v if k == "text" else v[0]) for k, v in items], 0, top=True)
    return nodes


def _block(items: list, i: int, top: bool = False) -> tuple[list, int]:
    """Nodes up to the {{end}}/{{else}} that closes this block (returned as the index of that item)."""
    nodes: list = []
    while i < len(items):
        kind, value = items[i]
        if kind == "text":
            if value:
                nodes.append(("text", value))
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            if top:
                raise SyntaxError(f"unexpected {{{{{value}}}}}")
            return nodes, i
        if word == "if":
            branches, otherwise = [], []
            cond = value[2:].strip()
            while True:
                body, i = _block(items, i + 1)
                branches.append((_expr(cond), body))
                closing = items[i][1]
                if closing == "end":
                    break
                if closing.startswith("else if "):
                    cond = closing[len("else if ") :]
                    continue
                if closing == "else":
                    otherwise, i = _block(items, i + 1)
                    if items[i][1] != "end":
                        raise SyntaxError("{{else}} must be followed by {{end}}")
                    break
                raise SyntaxError(f"unsupported {{{{{closing}}}}}")
            nodes.append(("if", branches, otherwise))
            i += 1
        elif word == "range":
            body, i = _block(items, i + 1)
            if items[i][1] != "end":
                raise SyntaxError("{{range}} with {{else}} is not in the subset")
            nodes.append(("range", _expr(value[len("range") :]), body))
            i += 1
        else:
            m = re.fullmatch(r"(\$\w+)\s*(:=|=)\s*(.+)", value, re.S)
            nodes.append(("set", m.group(1), m.group(2), _expr(m.group(3))) if m else ("print", _expr(value)))
            i += 1
    if not top:
        raise SyntaxError("missing {{end}}")
    return nodes, i


def _expr(text: str):
    """A command: an operand, or a function name followed by operands; parentheses nest commands."""
    tokens = TOKEN.findall(text)
    if "".join(tokens) != re.sub(r"\s+", "", text) or not tokens:
        raise SyntaxError(f"unsupported expression {text!r}")
    expr, pos = _command(tokens, 0)
    if pos != len(tokens):
        raise SyntaxError(f"unsupported expression {text!r}")
    return expr


def _command(tokens: list[str], pos: int) -> tuple[Any, int]:
    args = []
    while pos < len(tokens) and tokens[pos] != ")":
        tok = tokens[pos]
        if tok == "(":
            sub, pos = _command(tokens, pos + 1)
            if pos >= len(tokens) or tokens[pos] != ")":
                raise SyntaxError("unbalanced parentheses")
            args.append(sub)
            pos += 1
        elif tok in (":=", "="):
            raise SyntaxError("assignment inside an expression")
        else:
            args.append(("operand", tok))
            pos += 1
    if not args:
        raise SyntaxError("empty command")
    if args[0][0] == "operand" and re.fullmatch(r"[a-z]\w*", args[0][1]):
        return ("call", args[0][1], args[1:]), pos
    if len(args) != 1:
        raise SyntaxError("only functions take arguments")
    return args[0], pos


FUNCTIONS = {"eq", "ne", "and", "or", "not"}


def truth(value: Any) -> bool:
    return not (value is None or value is False or value == 0 or (hasattr(value, "__len__") and len(value) == 0))


class Scope:
    def __init__(self, data: dict):
        self.frames: list[dict[str, Any]] = [{"$": data}]

    def lookup(self, name: str) -> dict[str, Any]:
        for frame in reversed(self.frames):
            if name in frame:
                return frame
        raise NameError(f"undefined variable {name}")


def _eval(expr, dot: Any, scope: Scope) -> Any:
    if expr[0] == "call":
        name, args = expr[1], expr[2]
        if name not in FUNCTIONS:
            raise SyntaxError(f"function {name} is not in the subset")
        if name == "and":  # Go 1.18+: stops at the first false argument
            value = None
            for a in args:
                value = _eval(a, dot, scope)
                if not truth(value):
                    return value
            return value
        if name == "or":
            value = None
            for a in args:
                value = _eval(a, dot, scope)
                if truth(value):
                    return value
            return value
        values = [_eval(a, dot, scope) for a in args]
        if name == "not":
            return not truth(values[0])
        if len(values) != 2:
            raise SyntaxError(f"{name} takes two arguments here")
        return values[0] == values[1] if name == "eq" else values[0] != values[1]
    tok = expr[1]
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if tok == ".":
        return dot
    if tok.startswith("."):
        base, path = dot, tok[1:].split(".")
    elif tok.startswith("$"):
        head, *path = tok.split(".")
        base = scope.lookup(head)[head]
    else:
        raise SyntaxError(f"unsupported operand {tok}")
    for field in path:
        base = base[field]
    return base


def _run(nodes: list, dot: Any, scope: Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "set":
            _, name, op, expr = node
            value = _eval(expr, dot, scope)
            (scope.frames[-1] if op == ":=" else scope.lookup(name))[name] = value
        elif kind == "if":
            for cond, body in node[1]:
                if truth(_eval(cond, dot, scope)):
                    chosen = body
                    break
            else:
                chosen = node[2]
            scope.frames.append({})
            _run(chosen, dot, scope, out)
            scope.frames.pop()
        elif kind == "range":
            for item in _eval(node[1], dot, scope) or []:
                scope.frames.append({})
                _run(node[2], item, scope, out)
                scope.frames.pop()


def render(template: str, data: dict) -> str:
    out: list[str] = []
    scope = Scope(data)
    _run(parse(template), data, scope, out)
    return "".join(out)
