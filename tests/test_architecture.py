"""The structure holds, checked on the source (every module found by walking the tree, none listed):
- no module reaches another object's privates (a small allow-list names the foreign ones we must touch);
- every use of fastrtc's, aiortc's and gradio's internals is in agent/transports/fastrtc_compat.py, so an
  upgrade of one of them is one file to check;
- no test module imports another (shared helpers live in conftest.py and tests/*_helpers.py);
- no class or function outgrows what a reader holds at once.
Each check shows it can fail on a snippet that breaks its rule."""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agent"
COMPAT = AGENT / "transports" / "fastrtc_compat.py"

# private names of other packages that we must touch, each for a stated reason
FOREIGN_PRIVATES = {
    "_model_8k": "silero-vad's 8 kHz network, called with explicit state (calls/vad.TorchScriptSilero)",
    "_replace": "namedtuple's public API (urllib's SplitResult)",
    "_exit": "os._exit, documented: a forked espeak-ng worker ends without its parent's clean-up (train/tts)",
    "_SubParsersAction": "argparse's type of add_subparsers(), in annotations (train)",
    "_lm_kwargs": "moshi's loaders: the released checkpoints' LM settings (models)",
    "_mimi_config": "moshi's loaders: the released Mimi's settings (models)",
    "_encode_to_unquantized_latent": "Mimi's latent before its RVQ, to fit the tiny model's codebooks (models)",
    "_next_unused_check": "moshi's EuclideanCodebook dead-code countdown, carried by a resumed run (train/codec)",
    "_name_or_path": "transformers' config field naming where a checkpoint was read from (train/tts)",
    "_source": "aiortc's MediaRelay proxy's source track, read instead of it (fastrtc_compat)",
    "_RTCRtpReceiver__decoder_queue": "aiortc's receiver's decoder queue, decoded on the loop instead (fastrtc_compat)",
    "_RTCRtpReceiver__decoder_thread": "whether aiortc's receiver started its decoder thread yet (fastrtc_compat)",
    "_queue": "aiortc's remote track's frame queue, filled by fastrtc_compat.InlineDecoding",
    "_collect": "EspeakBackend's audio sink, fed by its own module's espeak-ng C callback (train/tts)",
}
# the packages whose internals only the compatibility module may use; their public API is what the
# top-level package exports, plus these documented subpackages
THIRD_PARTY = ("fastrtc", "aiortc", "aioice", "gradio")
PUBLIC_SUBMODULES = {"gradio.themes"}
# fastrtc's and aiortc's internal attributes and marks, by name
INTERNAL_ATTRIBUTES = {
    "pcs": "WebRTCConnectionMixin's peer connections by webrtc id",
    "handlers": "WebRTCConnectionMixin's stream handlers by webrtc id",
    "handle_offer": "WebRTCConnectionMixin's offer handling, wrapped to watch dropped connections",
    "start_up_task": "fastrtc's WebSocket start-up task, read by its clean-up",
}
INTERNAL_STRINGS = ("__webrtc_value__", "start_up_task")


def agent_modules() -> list[Path]:
    return sorted(p for p in AGENT.rglob("*.py") if "__pycache__" not in p.parts)


def private_reaches(source: str) -> list[tuple[int, str]]:
    """`x._name` where x is not self/cls and `_name` is not a member of the enclosing class (a class
    may touch its own kind's privates; nothing else may), and `from m import _name`."""

    def members(cls: ast.ClassDef) -> set[str]:
        names = set()
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in ("self", "cls")):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        return names

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__") and name not in FOREIGN_PRIVATES

    found = []

    def visit(node, own: set[str]) -> None:
        if isinstance(node, ast.ClassDef):
            own = members(node)
        if (isinstance(node, ast.Attribute) and private(node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in own):
            found.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.ImportFrom) and any(private(a.name) for a in node.names):
            found.append((node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, own)

    visit(ast.parse(source), set())
    return found


@cache
def submodules(package: str) -> frozenset[str]:
    """The installed package's submodule names, read from its folder (the package is not imported)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    folder = Path(spec.submodule_search_locations[0])
    return frozenset(p.stem for p in folder.iterdir()
                     if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").is_file()))


def internal_module(dotted: str) -> bool:
    """A non-public submodule of one of THIRD_PARTY: `fastrtc.utils`, `aiortc.rtcdtlstransport`."""
    top, _, rest = dotted.partition(".")
    return top in THIRD_PARTY and bool(rest) and not any(
        dotted == public or dotted.startswith(public + ".") for public in PUBLIC_SUBMODULES)


def submodule_named(dotted: str) -> bool:
    """`gradio.networking` named as `from gradio import networking` or `gr.networking`: an internal submodule."""
    package, _, name = dotted.rpartition(".")
    return package in THIRD_PARTY and name in submodules(package) and internal_module(dotted)


def internal_attribute(node: ast.Attribute, packages: dict[str, str]) -> bool:
    base = node.value
    if node.attr in INTERNAL_ATTRIBUTES:
        return not (node.attr == "handlers" and "log" in ast.unparse(base))  # logging's handlers are public
    if node.attr == "transport" and isinstance(base, ast.Attribute) and base.attr == "transport":
        return True
    return isinstance(base, ast.Name) and base.id in packages and submodule_named(f"{packages[base.id]}.{node.attr}")


def third_party_internals(source: str) -> list[tuple[int, str]]:
    """Imports of THIRD_PARTY's non-public submodules (`from fastrtc.utils import ...`, `from gradio import
    networking`, `gr.routes`), INTERNAL_ATTRIBUTES, INTERNAL_STRINGS and aiortc's
    receiver -> DTLS -> ICE transport chain (`.transport.transport`)."""
    tree = ast.parse(source)
    packages = {}  # local name -> the THIRD_PARTY package it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if internal_module(alias.name):
                    found.append((node.lineno, ast.unparse(node)))
                elif alias.name in THIRD_PARTY:
                    packages[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            named = [f"{node.module}.{a.name}" for a in node.names]
            if internal_module(node.module) or any(submodule_named(name) for name in named):
                found.append((node.lineno, ast.unparse(node)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and internal_attribute(node, packages):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
                s in node.value for s in INTERNAL_STRINGS):
            found.append((node.lineno, repr(node.value)[:60]))
    return sorted(set(found))


def by_module(check) -> dict[str, list[tuple[int, str]]]:
    found = {p.relative_to(ROOT).as_posix(): check(p.read_text(encoding="utf-8")) for p in agent_modules()}
    return {name: hits for name, hits in found.items() if hits}


def test_architecture_objects_keep_their_privates():
    assert len(agent_modules()) > 50  # the walk found the tree
    reaches = by_module(private_reaches)
    reaches.pop(COMPAT.relative_to(ROOT).as_posix(), None)  # the one module that may reach into fastrtc
    assert not reaches, reaches
    # the check can fail
    assert private_reaches("def f(seat):\n    return seat._inputs\n") == [(2, "seat._inputs")]
    assert private_reaches("class A:\n    def f(self):\n        return self._engine._lock\n") == \
        [(3, "self._engine._lock")]
    assert private_reaches("from agent.engine import _pending\n") == [(1, "from agent.engine import _pending")]
    assert private_reaches("class A:\n    def f(self, other):\n        return other._x + self._x\n") == []


def test_architecture_third_party_internals_only_in_the_compat_module():
    hits = by_module(third_party_internals)
    compat = COMPAT.relative_to(ROOT).as_posix()
    assert COMPAT.is_file(), f"{compat} is missing: it holds every use of fastrtc's, aiortc's and gradio's internals"
    assert compat in hits, "the compatibility module uses no internals: is the check still looking?"
    hits.pop(compat)
    assert not hits, hits
    # the check can fail, and passes the public API
    bad = ("import gradio as gr\nfrom gradio import networking\nfrom fastrtc.utils import current_context\n"
           "import aiortc.rtcdtlstransport\nx = conn.pcs.get(i)\ny = pc.receiver.transport.transport.state\n"
           "z = ['__webrtc_value__']\nr = gr.routes\n")
    assert [line for line, _ in third_party_internals(bad)] == [2, 3, 4, 5, 6, 7, 8]
    good = ("import gradio as gr\nfrom fastrtc import Stream, WebRTC\nfrom aiortc import RTCPeerConnection\n"
            "t = gr.themes.Soft()\nb = gr.Blocks()\nh = logging.getLogger().handlers\n")
    assert third_party_internals(good) == []


def test_architecture_no_test_module_imports_another():
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    imports = {}
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for module in modules:
                if module.split(".")[0] in names:
                    imports.setdefault(path.name, []).append(module)
    assert not imports, f"move shared helpers to tests/conftest.py or a tests/*_helpers.py module: {imports}"
    assert "test_architecture" in names and (tests / "conftest.py").is_file()  # the check can see modules


MAX_CLASS_LINES, MAX_FUNCTION_LINES, MAX_FRAME_ENGINE_LINES = 250, 80, 200


def oversized(source: str) -> list[tuple[str, int]]:
    """Classes over MAX_CLASS_LINES and functions over MAX_FUNCTION_LINES (argument parsers, named
    build_parser or *_parser, are exempt), with their lengths in lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parser = node.name == "build_parser" or node.name.endswith("_parser")
            limit = None if parser else MAX_FUNCTION_LINES
        else:
            continue
        if limit is not None and lines > limit:
            found.append((node.name, lines))
    return found


def test_architecture_no_class_or_function_outgrows_a_reader():
    paths = [*agent_modules(), ROOT / "app.py", *sorted((ROOT / "tests").glob("*.py"))]
    sizes = {p.relative_to(ROOT).as_posix(): found for p in paths
             if (found := oversized(p.read_text(encoding="utf-8")))}
    engines = [(p.relative_to(ROOT).as_posix(), n.end_lineno - n.lineno + 1) for p in agent_modules()
               for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(n, ast.ClassDef) and n.name == "FrameEngine"]
    assert engines, "FrameEngine not found"
    assert all(lines <= MAX_FRAME_ENGINE_LINES for _, lines in engines), engines
    assert not sizes, sizes
    # the check can fail
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert oversized(long_function) == [("f", MAX_FUNCTION_LINES + 1)]
    assert oversized(long_function.replace("def f", "def build_parser")) == []
    assert oversized("class A:\n" + "    x = 1\n" * MAX_CLASS_LINES) == [("A", MAX_CLASS_LINES + 1)]
