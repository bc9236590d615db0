"""The package's import graph keeps the house's layering (docs/architecture.md): no import cycle, and no module
imports one of a higher layer. Lower layers know nothing of the ones above them:

    0  version, config, models        leaves: no tquant imports that climb
    1  formats                        how quantized numbers are stored
    2  kernels                        Triton kernels and their torch references
    3  modules, kv (but kv.hook)      nn.Modules and caches that hold packed tensors and call kernels
    4  calib                          calibration-time transforms
    5  methods                        one file per algorithm: they produce quantized weights
    6  driver, kv.hook                the block-by-block driver; the generate() hook (it builds a method's cache)
    7  api, serialization, decode,    the public face; interop: export to / import from other libraries' formats;
       interop, streaming             streaming: quantize_to_disk, block by block from and to safetensors shards
    8  tools                          eval, analyze, compare, tune, speed, chat
    9  cli, tquant/__init__
"""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tquant")
LAYERS = [("tquant.version", 0), ("tquant.config", 0), ("tquant.models", 0), ("tquant.formats", 1),
          ("tquant.kernels", 2), ("tquant.kv.hook", 6), ("tquant.modules", 3), ("tquant.kv", 3), ("tquant.calib", 4),
          ("tquant.methods", 5), ("tquant.driver", 6), ("tquant.api", 7), ("tquant.serialization", 7),
          ("tquant.interop", 7), ("tquant.streaming", 7), ("tquant.decode", 7), ("tquant.tools", 8), ("tquant.cli", 9),
          ("tquant", 9)]


def layer(module: str) -> int:
    """The layer of a module: its longest listed prefix's."""
    for prefix, level in sorted(LAYERS, key=lambda p: -len(p[0])):
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS (and docs/architecture.md)")


def modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "tquant" + path[len(ROOT):-3].replace(os.sep, ".")
                found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: str, known: dict) -> set[str]:
    """The tquant modules `name` imports (a package's __init__ counts as the package), lazily or not."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) ==
                   "TYPE_CHECKING" for n in ast.walk(block)}  # annotations only: no import at run time
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in known and m != name}


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph().items() for b in targets
                    if layer(b) > layer(a) and not a.startswith(b + "."))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph().items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_top_level_keeps_only_the_public_face():
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert len(top) <= 12, top
