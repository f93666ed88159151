"""The layers have one direction, and the device path loads nothing above it.

Every module of the tree is parsed with :mod:`ast` and each of its imports (at the top, inside a
function, inside ``try``/``if``) is mapped to a layer:

    base       edgefl, edgefl.kernels, edgefl._kernels, edgefl.durable
    wire       edgefl.wire                  (what device and server both speak)
    trust      edgefl.trust                 (signatures, sealing, keys: both sides too)
    transport  edgefl.transport
    device     edgefl.device                (the device runtime)
    server     edgefl_server                (imports base, wire, trust, transport; not the device)
    tools      edgefl.cli, edgefl.simulation, benchmarks (import everything)

A module may import its own layer and those :data:`ALLOWED` lists for it, nothing else. An import
inside a function is allowed only with a comment, on its line or the line above, saying it is
deferred (for start-up time, or so that a missing optional package gets a clear message): an
import is never placed in a function to hide a circle.

The checker is tested on small synthetic sources first, so a broken checker cannot pass the tree.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Which layers each layer may import (besides itself).
ALLOWED = {
    "base": set(),
    "wire": {"base"},
    "trust": {"base", "wire"},
    "transport": {"base", "wire", "trust"},
    "device": {"base", "wire", "trust", "transport"},
    "server": {"base", "wire", "trust", "transport"},
    "tools": {"base", "wire", "trust", "transport", "device", "server"},
}

#: Module-name prefixes and their layer; the longest matching prefix wins.
LAYER_OF_PREFIX = {
    "edgefl": "base",
    "edgefl.kernels": "base",
    "edgefl._kernels": "base",
    "edgefl.durable": "base",
    "edgefl.wire": "wire",
    "edgefl.trust": "trust",
    "edgefl.transport": "transport",
    "edgefl.device": "device",
    "edgefl_server": "server",
    "edgefl.cli": "tools",
    "edgefl.__main__": "tools",
    "edgefl.simulation": "tools",
    "benchmarks": "tools",
}

#: The word the comment of an import inside a function must contain.
DEFERRED_WORD = "deferred"


def layer_of(module: str) -> str | None:
    """The layer of an edgefl module name, or None for a third-party / standard module."""
    best = None
    for prefix, layer in LAYER_OF_PREFIX.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    """The import name of a source file of the tree (server/ is installed as edgefl_server)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "server":
        parts[0] = "edgefl_server"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    in_function: bool


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import statement of ``source`` with its absolute target and whether it sits
    inside a function (also nested in classes, ``try``, ``if``)."""
    tree = ast.parse(source)
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> list[str]:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # `from edgefl import kernels` imports the submodule edgefl.kernels.
        return [f"{base}.{alias.name}" if base else alias.name for alias in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend(Import(target, child.lineno, in_function) for target in resolve(child))
            visit(child, inner)

    visit(tree, False)
    return found


def problems_of(source: str, module: str, is_package: bool = False) -> list[str]:
    """What is wrong with the imports of one module: upward imports and unexplained imports
    inside functions."""
    layer = layer_of(module)
    lines = source.splitlines()
    out = []
    for imp in imports_of(source, module, is_package):
        target = layer_of(imp.target)
        if layer is not None and target is not None and target != layer \
                and target not in ALLOWED[layer]:
            out.append(f"{module}:{imp.line}: {layer} layer imports {imp.target} ({target} layer)")
        if imp.in_function:
            here = lines[imp.line - 1]
            above = lines[imp.line - 2] if imp.line >= 2 else ""
            comments = [text.split("#", 1)[1] for text in (here, above) if "#" in text]
            if not any(DEFERRED_WORD in c.lower() for c in comments):
                out.append(f"{module}:{imp.line}: import of {imp.target} inside a function "
                           f"without a comment saying it is {DEFERRED_WORD} (and why)")
    return out


def tree_modules() -> list[Path]:
    paths = []
    for top in ("edgefl", "server", "benchmarks"):
        paths += [p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(paths)


# -- the checker on synthetic sources ------------------------------------------------------------

def test_an_upward_import_at_the_top_is_found():
    problems = problems_of("from edgefl_server.store import ServerStore\n", "edgefl.device.client")
    assert problems == ["edgefl.device.client:1: device layer imports "
                        "edgefl_server.store.ServerStore (server layer)"]


def test_an_upward_import_inside_a_function_is_found_even_when_explained():
    source = textwrap.dedent("""
        def run():
            # deferred for start-up time
            from edgefl.cli.options import env_option
    """)
    problems = problems_of(source, "edgefl_server.aggregator")
    assert len(problems) == 1 and "server layer imports edgefl.cli.options.env_option" in problems[0]


def test_the_server_may_not_import_the_device_runtime():
    for source in ("import edgefl.device.trainer\n", "from edgefl.device import trainer\n",
                   "from edgefl import device\n"):
        assert problems_of(source, "edgefl_server.rounds"), source


def test_a_relative_upward_import_is_found():
    problems = problems_of("from ..cli import main\n", "edgefl.wire.protocol")
    assert problems and "wire layer imports edgefl.cli.main" in problems[0]
    package = problems_of("from ..device import client\n", "edgefl.transport", is_package=True)
    assert package and "imports edgefl.device.client" in package[0]


def test_an_import_in_a_function_needs_a_comment_saying_it_is_deferred():
    bare = "def f():\n    import numpy\n"
    assert problems_of(bare, "edgefl.device.trainer") == [
        "edgefl.device.trainer:2: import of numpy inside a function without a comment saying "
        "it is deferred (and why)"]
    other_comment = "def f():\n    import numpy  # needed here\n"
    assert problems_of(other_comment, "edgefl.device.trainer")
    in_method = "class A:\n    def f(self):\n        try:\n            import numpy\n        except ImportError:\n            pass\n"
    assert problems_of(in_method, "edgefl.device.trainer")


def test_explained_deferred_imports_and_downward_imports_pass():
    source = textwrap.dedent("""
        import numpy as np
        from edgefl import kernels
        from edgefl.wire.model import Model
        from edgefl.transport.mqtt import MqttConnection

        def plot():
            # deferred for start-up time: matplotlib takes 300 ms to import
            import matplotlib

        def other():
            import sqlite3  # deferred for start-up time
    """)
    assert problems_of(source, "edgefl.device.client") == []
    assert problems_of("from edgefl_server.store import ServerStore\nimport edgefl.device\n",
                       "edgefl.cli.server") == []


def test_every_module_of_the_tree_has_a_layer():
    assert layer_of("edgefl.wire.update") == "wire"
    assert layer_of("edgefl.cli.client") == "tools"
    assert layer_of("edgefl_server.strategies.fedavg") == "server"
    assert layer_of("numpy") is None and layer_of("edgeflx") is None
    # A new sub-package of edgefl needs a layer: edgefl.<name> must be in the map itself.
    unmapped = sorted(name for name in map(module_name, tree_modules())
                      if name.startswith("edgefl.")
                      and ".".join(name.split(".")[:2]) not in LAYER_OF_PREFIX)
    assert unmapped == [], "give these modules a layer in LAYER_OF_PREFIX"


# -- the tree ------------------------------------------------------------------------------------

def test_the_tree_has_the_modules_it_is_checked_on():
    names = set(map(module_name, tree_modules()))
    assert {"edgefl.device.client", "edgefl.wire.update", "edgefl_server.aggregator",
            "edgefl.cli.main", "edgefl.simulation.federation", "benchmarks.bench_server"} <= names
    assert len(names) > 60


def test_no_module_imports_upward_or_hides_an_import_in_a_function():
    problems = []
    for path in tree_modules():
        problems += problems_of(path.read_text(), module_name(path), path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


# -- what the device path loads ------------------------------------------------------------------

#: Packages a device never loads: the server, the tools, and the server's dependencies.
DEVICE_BANNED = ("edgefl_server", "edgefl.simulation", "edgefl.cli.server", "edgefl.cli.simulate",
                 "edgefl.cli.bench", "onnx", "scipy", "sklearn", "sqlite3", "_sqlite3",
                 "matplotlib", "dp_accounting")


def loaded_modules(code: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def banned_in(modules: list[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == b or m.startswith(b + ".") for b in DEVICE_BANNED))


def test_the_edgefl_client_command_loads_nothing_of_the_server_or_the_tools(tmp_path):
    """What `edgefl client` imports, up to parsing its options and building the EdgeClient."""
    code = textwrap.dedent("""
        import edgefl.__main__, edgefl.cli.main as main
        from edgefl.cli.client import run_client
        args = main.build_parser().parse_args(["client", "--broker", "mqtt://127.0.0.1:1",
            "--fleet", "f", "--client-id", "c", "--state-dir", "s", "--data", "d.npz"])
        import edgefl
        for name in edgefl.__all__:
            getattr(edgefl, name)
    """)
    modules = loaded_modules(code)
    assert "edgefl.device.client" in modules and "onnxruntime" in modules
    assert banned_in(modules) == []


def test_the_check_of_the_device_path_finds_a_banned_module():
    modules = loaded_modules("import edgefl.device.client, edgefl_server.store")
    assert {"edgefl_server", "edgefl_server.store", "sqlite3"} <= set(banned_in(modules))


@pytest.mark.integration
def test_a_running_edgefl_client_process_loads_nothing_of_the_server(secure_broker, fleet,
                                                                      tmp_path):
    """A real `edgefl client` process that connected to a provisioned broker (TLS, its login,
    signatures and sealing loaded) and stopped on SIGTERM: what it loaded while running (imports
    deferred to run time included). No certificate or PEM machinery either: a device holds no
    private key."""
    import numpy as np

    np.savez(tmp_path / "d.npz", X=np.ones((3, 64)), y=np.zeros(3, np.int64))
    code = textwrap.dedent(f"""
        import sys, threading, signal, os
        from edgefl.cli import main
        from edgefl.device.client import EdgeClient
        # SIGTERM once the device is up: connected, its status published, its outbox checked
        connected, on_connected = threading.Event(), EdgeClient._on_connected
        def on_connected_then_say_so(self, *args):
            on_connected(self, *args)
            connected.set()
        EdgeClient._on_connected = on_connected_then_say_so
        threading.Thread(target=lambda: (connected.wait(60), os.kill(os.getpid(), signal.SIGTERM)),
                         daemon=True).start()
        rc = main.main(["client", "--bundle", {str(fleet.bundle("dev-1"))!r},
                        "--broker", {secure_broker.url!r},
                        "--state-dir", {str(tmp_path / "state")!r}, "--data", {str(tmp_path / "d.npz")!r}])
        assert rc == 0, rc
    """)
    modules = loaded_modules(code)
    assert "edgefl.transport.mqtt" in modules and "paho.mqtt.client" in modules
    assert "edgefl.trust.sealing" in modules
    assert banned_in(modules) == []
    assert [m for m in modules if m.startswith(("cryptography.x509",
                                                "cryptography.hazmat.primitives.serialization"))] == []
