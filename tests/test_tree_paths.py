"""tree_paths: the one walker of nested param dicts (has / get / set / replace / drop / flatten)."""
import pytest

from vllama_jax import tree_paths


def test_reads_and_misses():
    tree = {"a": {"b": {"c": 1}}, "x": 2}
    assert tree_paths.has(tree, ("a", "b", "c")) and tree_paths.get(tree, ("a", "b")) == {"c": 1}
    assert tree_paths.missing_at(tree, ("a", "q", "c")) == 1
    assert tree_paths.missing_at(tree, ("x", "y")) == 1     # a leaf has no children
    assert not tree_paths.has(tree, ("x", "y"))
    with pytest.raises(KeyError, match="a/q"):
        tree_paths.get(tree, ("a", "q", "c"))
    assert tree_paths.flatten(tree) == {("a", "b", "c"): 1, ("x",): 2}
    assert tree_paths.flatten({"e": {}, "f": 3}) == {("f",): 3}


def test_writes_copy_only_along_the_path():
    tree = {"a": {"b": {"c": 1}, "s": {"t": 0}}, "x": 2}
    new = tree_paths.replaced(tree, ("a", "b", "c"), 5)
    assert new["a"]["b"]["c"] == 5 and tree["a"]["b"]["c"] == 1
    assert new["a"]["s"] is tree["a"]["s"]                   # siblings shared, not copied
    assert tree_paths.replaced({}, ("p", "q"), 1) == {"p": {"q": 1}}
    dropped = tree_paths.without(tree, [("a", "b"), ("zz", "y"), ("x", "y")])
    assert dropped == {"a": {"s": {"t": 0}}, "x": 2} and "b" in tree["a"]
    t = {}
    tree_paths.set_in(t, ("a", "b"), 1)
    tree_paths.set_in(t, ("a", "c"), 2)
    assert t == {"a": {"b": 1, "c": 2}}
