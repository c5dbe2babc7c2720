"""Reading recipe and training-config YAML strictly: one-line errors, bounded cost.

PyYAML's SafeLoader accepts a repeated key (the last one silently wins) and expands aliases
without limit when the data is walked: a 363-byte "billion laughs" file becomes 10^9 strings in
validation or in an error message. This loader refuses both: duplicate keys are errors naming
the line, and a document whose aliases would expand past MAX_NODES is refused from its node graph
(a linear walk with memoized sizes, before any Python object is built).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

# A recipe or config has tens of keys; this leaves room for long lists and stops bombs early.
MAX_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[object, Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor reports it below
                    continue
                if first is not key_node:
                    raise ConstructorError(
                        None, None,
                        f"duplicate key {str(key)[:60]!r} (first on line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)



def expanded_size(root: Node | None, limit: int = MAX_NODES) -> int:
    """Nodes the document would have with every alias expanded; stops counting past `limit`.

    Aliases make the node graph a DAG (or a cycle); sizes are memoized per node, so the walk is
    linear in the file, not in the expansion."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.YAMLError("an alias refers to its own anchor (a recursive structure)")
        active.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(root) if root is not None else 0


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_yaml(path: str | Path, error: type[Exception], what: str) -> object:
    """A YAML file's data; an unreadable or non-UTF-8 file, bad YAML, a duplicate key or an alias
    bomb becomes one `error` naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: line {_line_of(data, err.start)}: {what} is not UTF-8 text "
                    f"(byte 0x{data[err.start]:02x} at offset {err.start})") from None
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if expanded_size(root) > MAX_NODES:
            raise error(f"{path}: {what} expands to more than {MAX_NODES} YAML nodes through its aliases "
                        f"(an alias bomb?)")
        return loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{path}: {where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply") from None
    finally:
        loader.dispose()
