"""The server never holds one client's unmasked vector: checked on the source, then on a live round."""

from __future__ import annotations

import ast
import gc
import inspect
from pathlib import Path

import numpy as np

from shared.secagg import server as server_module
from shared.secagg.encoding import FixedPoint
from shared.secagg.inprocess import make_clients, run_round
from shared.secagg.messages import RoundParams
from shared.secagg.server import SecAggServer
from shared.secagg.settings import SecAggSettings

SOURCE = ast.parse(inspect.getsource(server_module))
SERVER_CLASS = next(n for n in SOURCE.body if isinstance(n, ast.ClassDef) and n.name == "SecAggServer")
METHODS = {n.name: n for n in SERVER_CLASS.body if isinstance(n, ast.FunctionDef)}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def test_only_add_masked_input_takes_a_vector() -> None:
    takes_array = [
        name
        for name, fn in METHODS.items()
        for arg in fn.args.args + fn.args.kwonlyargs
        if arg.annotation is not None and "ndarray" in ast.unparse(arg.annotation)
    ]
    assert takes_array == ["add_masked_input"]


def test_a_masked_input_is_only_inspected_or_added_into_the_running_sum() -> None:
    fn = METHODS["add_masked_input"]
    parents = _parents(fn)
    uses = [n for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id == "masked"]
    assert uses, "add_masked_input must use its argument"
    for use in uses:
        parent = parents[use]
        if isinstance(parent, ast.Attribute):
            assert parent.attr in {"dtype", "ndim", "size", "shape"}, ast.unparse(parent)
        elif isinstance(parent, ast.Call) and ast.unparse(parent.func) in {"isinstance", "getattr", "type"}:
            pass
        elif isinstance(parent, ast.Call) and ast.unparse(parent.func) == "np.add":
            assert ast.unparse(parent) == "np.add(self._masked_sum, masked, out=self._masked_sum)"
        else:
            raise AssertionError(f"masked input used as {ast.unparse(parent)!r}")


def test_the_running_sum_is_the_only_vector_attribute() -> None:
    assigned = {
        t.attr
        for fn in METHODS.values()
        for node in ast.walk(fn)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"
    }
    # Every attribute the server keeps. Only _masked_sum may hold a vector; adding an attribute means
    # re-checking that it never holds (a function of) one client's input, then updating this list.
    assert assigned == {
        "params", "_roster", "_graph", "_stage", "_active", "_abort_reason", "_adverts", "_ciphertexts",
        "_masked_with", "_weights", "_survivors", "_declined", "_dim", "_masked_sum", "_result",
        "_advert_digest", "_quorum", "_signatures",  # bytes, an int, survivor -> signature bytes
    }  # fmt: skip
    writes = [
        ast.unparse(node)
        for fn in METHODS.values()
        for node in ast.walk(fn)
        if isinstance(node, ast.Assign)
        and any(ast.unparse(t) == "self._masked_sum" for t in node.targets)
        or isinstance(node, ast.AnnAssign)
        and ast.unparse(node.target) == "self._masked_sum"
    ]
    assert sorted(writes) == sorted(
        [
            "self._masked_sum: np.ndarray | None = None",  # __init__
            "self._masked_sum = None",  # abort: nothing is revealed
            "self._masked_sum = np.zeros(masked.size, dtype=np.uint32)",
            "self._masked_sum = None",  # after the result is decoded
        ]
    )


def test_unmasking_only_subtracts_mask_streams_and_decodes_once() -> None:
    fn = METHODS["receive_unmask_shares"]
    applies = [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == "masks.apply"]
    assert len(applies) == 2
    assert all(a.startswith("masks.apply(total, ") for a in applies)
    assert "masks.self_mask(" in applies[0] or "masks.self_mask(" in applies[1]
    decodes = [
        n for n in ast.walk(SERVER_CLASS) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("decode_sum")
    ]
    assert len(decodes) == 1 and ast.unparse(decodes[0]) == "fp.decode_sum(total, count=len(alive))"


def _reachable_arrays(root: object) -> list[np.ndarray]:
    """Every numpy array reachable from ``root`` through instances, dicts, lists, tuples and sets."""
    seen: set[int] = set()
    found: list[np.ndarray] = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
            continue  # functions lead to their globals, i.e. to every loaded module: not the server's state
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.append(obj)
            continue
        try:
            is_container = (
                isinstance(obj, (dict, list, tuple, set, frozenset))
                or hasattr(obj, "__dict__")
                or hasattr(obj, "__slots__")
            )
        except Exception:  # some third-party proxies raise on attribute probes; they hold no server state
            continue
        if is_container:
            stack.extend(r for r in gc.get_referents(obj) if not isinstance(r, type))
    return found


def test_a_live_round_never_leaves_an_unmasked_input_on_the_server(tmp_path: Path) -> None:
    ids = [11, 22, 33, 44, 55]
    clients, roster = make_clients(tmp_path, ids)
    params = RoundParams.for_round(SecAggSettings(clip_norm=1.0), run_id="s", server_round=1, node_ids=ids)
    server = SecAggServer(params, roster=roster)
    rng = np.random.default_rng(0)
    updates = {n: (rng.normal(size=512) / 40).astype(np.float32) for n in ids}
    fp = FixedPoint.for_sum(clip_norm=1.0, max_weight=1.0, max_clients=params.max_clients)
    snapshots: list[tuple[str, list[np.ndarray]]] = []  # (after which call, copies of the vectors held)

    for name in (
        "receive_adverts",
        "receive_encrypted_shares",
        "add_masked_input",
        "consistency_requests",
        "receive_signatures",
        "unmask_requests",
    ):
        original = getattr(server, name)

        def checked(*args: object, _original=original, _name=name) -> object:
            out = _original(*args)
            big = [a for a in _reachable_arrays(server) if a.size >= 512]
            running_sum = server._masked_sum
            assert [id(a) for a in big] == ([id(running_sum)] if running_sum is not None else []), _name
            snapshots.append((_name, [a.copy() for a in big]))
            return out

        setattr(server, name, checked)

    run_round(server, clients, updates.__getitem__, drop={"masked-input": {33}})
    assert [name for name, _ in snapshots].count("add_masked_input") == 4
    for name, held in snapshots:
        for a in held:  # a masked sum: it decodes to nothing like any single update
            decoded = fp.decode_sum(a, count=1)
            assert all(np.max(np.abs(decoded - updates[n])) > 1.0 for n in ids), name
    big = [a for a in _reachable_arrays(server) if a.size >= 512]
    assert len(big) == 1 and big[0] is server.result().total  # after unmasking: only the total
    r = server.result()
    assert len(r.survivors) == 4
    assert np.max(np.abs(r.total - sum(updates[n].astype(np.float64) for n in r.survivors))) <= 4 * r.resolution
