"""The house keeps its shape: data flows one way between the folders, no module imports another's private
names, and importing the package pulls in no heavy library (read from the source, nothing is run)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mlxgemma"

# What each layer may import (besides itself, errors, files and the standard library): media/ is inputs only;
# models/ knows the families (and which processor each takes); decode/ drives models with media;
# checkpoints/ builds models from files; embedding/ turns inputs into vectors with them; the server and the
# entry modules sit on top.
ALLOWED = {
    "media": {"media"},
    "models": {"models", "media"},
    "decode": {"decode", "models", "media"},
    "checkpoints": {"checkpoints", "models", "media"},
    "embedding": {"embedding", "models", "media"},
    "server": {"server", "decode", "embedding", "models", "media", "checkpoints", "cli"},
}


def _imports():
    """(module, layer, imported module, names) for every relative import in the package."""
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        package = parts[:-1] if parts[-1] != "__init__" else parts
        layer = parts[1] if len(parts) > 2 else "root"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = ".".join(base + ([node.module] if node.module else []))
                yield ".".join(parts), layer, target, [a.name for a in node.names]


def _layer(target: str, names) -> set:
    parts = target.split(".")
    if len(parts) > 1:
        return {parts[1]}
    return {n for n in names}  # `from .. import x` / `from . import x`: the names are the modules


def test_layers_import_only_downwards():
    wrong = []
    for module, layer, target, names in _imports():
        if layer not in ALLOWED:
            continue
        for used in _layer(target, names):
            if used not in ALLOWED[layer] | {"errors", "files"} and (ROOT / used).is_dir() | (ROOT / f"{used}.py").exists():
                wrong.append(f"{module} imports {target} ({', '.join(names)})")
    assert not wrong, "\n".join(wrong)


def test_no_private_names_across_modules():
    private = [f"{module} imports {target}.{n}" for module, _, target, names in _imports()
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_import_is_light():
    code = "import sys, mlxgemma; print(' '.join(m for m in ('torch', 'transformers', 'mlx_lm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
