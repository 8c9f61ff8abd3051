"""One-off refactoring aid (issue 12): move imports of the package's own modules from function bodies
to module top. Prints what it could not move (a name clash) and leaves those in place."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowvram_ft"


def is_package_import(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "lowvram_ft"
    return isinstance(node, ast.Import) and all(a.name.split(".")[0] == "lowvram_ft" for a in node.names)


def top_level_names(tree) -> dict[str, ast.AST]:
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names[(a.asname or a.name).split(".")[0]] = node
    return names


def key(node) -> tuple:
    return (node.level, node.module) if isinstance(node, ast.ImportFrom) else (0, None)


def hoist(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.split("\n")
    top_ids = {id(n) for n in tree.body}
    bound = top_level_names(tree)
    wanted: dict[tuple, dict[str, str | None]] = {}  # (level, module) -> {name: asname}
    plain: dict[str, str | None] = {}
    remove: list[tuple[int, int]] = []
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_ids or not is_package_import(node):
            continue
        clash = False
        for a in node.names:
            local = (a.asname or a.name).split(".")[0]
            existing = bound.get(local)
            if existing is not None and not (isinstance(existing, type(node)) and key(existing) == key(node)):
                problems.append(f"{path.name}:{node.lineno}: {local} clashes with a module-level name")
                clash = True
        if clash:
            continue
        for a in node.names:
            if isinstance(node, ast.ImportFrom):
                wanted.setdefault(key(node), {})[a.name] = a.asname
            else:
                plain[a.name] = a.asname
            bound[(a.asname or a.name).split(".")[0]] = node
        remove.append((node.lineno, node.end_lineno))
    if not remove:
        return problems
    # merge into existing top-level statements of the same module, else add after the last top import
    existing = {key(n): n for n in tree.body if isinstance(n, ast.ImportFrom) and is_package_import(n)}
    edits = []  # (start, end, new lines)
    for k, names in wanted.items():
        node = existing.get(k)
        if node is not None:
            merged = {a.name: a.asname for a in node.names}
            merged.update(names)
            edits.append((node.lineno, node.end_lineno, render(k, merged)))
    new_statements = [line for k, names in sorted(wanted.items(), key=lambda kv: (-kv[0][0], kv[0][1] or ""))
                      if k not in existing for line in render(k, names)]
    new_statements += [f"import {n}" + (f" as {a}" if a else "") for n, a in plain.items()]
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    after = max(n.end_lineno for n in imports) if imports else 0
    for start, end in sorted(remove + [(s, e) for s, e, _ in edits], reverse=True):
        replacement = next((new for s, e, new in edits if (s, e) == (start, end)), None)
        body = lines[start - 1:end]
        if replacement is None:
            # drop the statement; also a blank line right after it when a blank or a def precedes it
            del lines[start - 1:end]
            if start - 1 < len(lines) and not lines[start - 1].strip() and (
                    not lines[start - 2].strip() or lines[start - 2].rstrip().endswith(('"""', ":"))):
                del lines[start - 1]
            if start <= after:
                after -= len(body)
        else:
            lines[start - 1:end] = replacement
            if start <= after:
                after += len(replacement) - len(body)
    if new_statements:
        lines[after:after] = new_statements
    path.write_text("\n".join(lines), encoding="utf-8")
    return problems


def render(k: tuple, names: dict[str, str | None]) -> list[str]:
    level, module = k
    head = f"from {'.' * level}{module or ''} import "
    items = [n + (f" as {a}" if a else "") for n, a in sorted(names.items(), key=lambda kv: (kv[0].lower(), kv[0]))]
    one = head + ", ".join(items)
    if len(one) <= 118:
        return [one]
    out, line = [], head + "("
    for item in items:
        if len(line) + len(item) + 2 > 116:
            out.append(line.rstrip())
            line = " " * len(head + "(")
        line += item + ", "
    out.append(line.rstrip(", ") + ")")
    return out


if __name__ == "__main__":
    files = [Path(p) for p in sys.argv[1:]] or sorted(PACKAGE.rglob("*.py"))
    for f in files:
        for problem in hoist(f):
            print(problem)
