"""Rewrite each decorated top-level function or method of a module, `@d1 @d2 def f(...)`, into `def f(...)` followed by
`f = d1(d2(f))`. Python runs the two the same way (a decorator is a call applied once the def has run), but mutmut 3
mutates only undecorated functions, and generate.py's `generate` (`@torch.no_grad()`) or `on_device`
(`@contextlib.contextmanager`) are where the glue code is. bench/mutants.sh applies this to its throwaway clone,
never to the checkout:

    python bench/undecorate.py generate.py        # in place; prints what it rewrote
"""
import ast
import sys


def undecorate(source: str) -> tuple[str, list[str]]:
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    done = []
    defs = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    nodes = tree.body + [n for c in defs for n in c.body]  # functions, and methods (one class level deep)
    nodes = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.decorator_list]
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):  # bottom up: line numbers above stay valid
        decorators = [ast.get_source_segment(source, d) for d in node.decorator_list]
        wrapped = node.name
        for d in reversed(decorators):
            wrapped = f"{d}({wrapped})"
        first = node.decorator_list[0].lineno - 1  # the line of the first '@' (0-based)
        indent = " " * node.col_offset  # a method's assignment runs in its class body
        lines.insert(node.end_lineno, f"\n{indent}{node.name} = {wrapped}\n")
        del lines[first:node.lineno - 1]  # node.lineno is the `def` line
        done.append(f"{node.name} = {wrapped}")
    return "".join(lines), done[::-1]


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        new, done = undecorate(f.read())
    compile(new, path, "exec")
    with open(path, "w") as f:
        f.write(new)
    print("\n".join(done) or "nothing decorated")
