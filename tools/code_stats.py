"""Function-level imports and the largest functions of a package (what the architecture issue reports).

    python tools/code_stats.py [ROOT]     # ROOT: default src/ctharden

Prints the number of ``import`` statements inside a ``def`` (and how many import ctharden itself)
and the six largest functions in lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(root: Path) -> None:
    sizes: list[tuple[int, str]] = []
    imports = own = 0
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            sizes.append(((node.end_lineno or node.lineno) - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    imports += 1
                    module = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                    own += bool(module and module.startswith("ctharden"))
    print(f"function-level imports: {imports} (ctharden: {own})")
    for lines, name in sorted(sizes, reverse=True)[:6]:
        print(f"{lines:5d}  {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/ctharden"))
