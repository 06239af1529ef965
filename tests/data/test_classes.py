import json

import numpy as np
import pytest

from napari_diffmix.classes import (
    BUILTIN_SCHEMES,
    CONSEP,
    DEMO,
    GLYSAC,
    ClassScheme,
    load_scheme,
    rank_by_scarcity,
)
from napari_diffmix.errors import SchemeError


def test_published_merges():
    raw = np.arange(0, 8)
    np.testing.assert_array_equal(CONSEP.merge_raw(raw), [0, 1, 2, 3, 3, 4, 4, 4])
    assert CONSEP.names == ("other", "inflammatory", "epithelial", "spindle")
    raw = np.arange(0, 11)
    np.testing.assert_array_equal(GLYSAC.merge_raw(raw), [0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1])
    assert GLYSAC.names == ("other", "lymphocyte", "epithelial")
    assert CONSEP.rare == GLYSAC.rare == DEMO.rare == (1,)
    assert CONSEP.major == (2, 3, 4)
    assert CONSEP.condition_channels == 6 and GLYSAC.condition_channels == 5
    assert CONSEP.merge_raw(np.array([[5.0, 4.0]])).dtype == np.uint8


def test_merge_is_not_idempotent_so_merge_exactly_once():
    # Merging merged CoNSeP labels again turns spindle (4) into epithelial: the public sampler's bug.
    once = CONSEP.merge_raw(np.array([5]))
    assert once.tolist() == [4]
    assert CONSEP.merge_raw(once).tolist() == [3]


def test_merge_raw_errors_name_the_source():
    with pytest.raises(SchemeError, match=r"a\.mat: raw class id\(s\) \[8, 12\] are not in scheme 'consep'"):
        CONSEP.merge_raw(np.array([1, 8, 12, 8]), source="a.mat")
    with pytest.raises(SchemeError, match=r"\[-1\]"):
        CONSEP.merge_raw(np.array([-1, 2]))
    with pytest.raises(SchemeError, match=r"b\.mat: type ids must be integers"):
        CONSEP.merge_raw(np.array([1.5]), source="b.mat")
    assert CONSEP.merge_raw(np.zeros(0, int)).size == 0


def test_check_classes():
    GLYSAC.check_classes(np.array([[0, 1], [2, 3]]))
    with pytest.raises(SchemeError, match=r"t\.npy: class id\(s\) \[-1, 4\] are outside 0..3"):
        GLYSAC.check_classes(np.array([4, -1, 2]), source="t.npy")


def test_names_colors_and_palette():
    assert CONSEP.class_name(0) == "background" and CONSEP.class_name(4) == "spindle"
    assert CONSEP.class_id("Spindle") == 4
    with pytest.raises(SchemeError, match="'stroma' is not in scheme"):
        CONSEP.class_id("stroma")
    for bad in (-1, 5):
        with pytest.raises(SchemeError, match="outside 0..4"):
            CONSEP.class_name(bad)
        with pytest.raises(SchemeError, match="outside 0..4"):
            CONSEP.color_rgb(bad)
    pal = CONSEP.palette()
    assert pal.shape == (5, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [0xE6, 0x9F, 0x00]
    assert len({tuple(r) for r in pal}) == 5


def test_schemes_are_hashable_and_comparable():
    assert hash(CONSEP) == hash(ClassScheme.from_dict(CONSEP.to_dict()))
    assert {CONSEP: "x"}[load_scheme("consep")] == "x"
    assert CONSEP != GLYSAC


def test_identity_merge_by_default():
    s = ClassScheme("mine", ("a", "b"), ("#112233", "#445566"))
    assert s.merge == {1: 1, 2: 2}
    assert s.colors == ("#112233", "#445566")
    assert ClassScheme("lower", ("a",), ("#abcdef",)).colors == ("#ABCDEF",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=()), "no classes"),
        (dict(names=("a", "a"), colors=("#111111", "#222222")), "repeats a class name"),
        (dict(names=("a", "b"), colors=("#111111",)), "2 classes but 1 colours"),
        (dict(names=("a",), colors=("red",)), "'#RRGGBB'"),
        (dict(names=("a", "b"), colors=("#111111", "#111111")), "distinct"),
        (dict(names=("a",), colors=("#000000",)), "not black"),
        (dict(names=("a",), colors=("#111111",), merge={0: 1}), "raw ids start at 1"),
        (dict(names=("a",), colors=("#111111",), merge={1: 2}), "outside 1..1"),
        (dict(names=("a", "b"), colors=("#111111", "#222222"), merge={1: 1}), r"class\(es\) \[2\]"),
        (dict(names=("a",), colors=("#111111",), rare=(3,)), "rare class 3"),
        (dict(names=tuple(f"c{i}" for i in range(255)), colors=()), "at most 254"),
    ],
)
def test_invalid_schemes(kwargs, message):
    args = dict(name="bad", names=("a",), colors=("#111111",))
    args.update(kwargs)
    with pytest.raises(SchemeError, match=message):
        ClassScheme(**args)


def test_dict_round_trip_and_from_dict_forms():
    for s in BUILTIN_SCHEMES.values():
        assert ClassScheme.from_dict(s.to_dict()) == s
    s = ClassScheme.from_dict({"name": "x", "classes": ["tumour", {"name": "immune", "color": "#123456"}], "rare": "immune"})
    assert s.names == ("tumour", "immune") and s.rare == (2,) and s.colors[1] == "#123456"
    assert s.colors[0].startswith("#")
    assert ClassScheme.from_dict({"classes": ["a", "b"], "rare": ["1"]}).rare == (1,)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "must be a mapping"),
        ({"classes": []}, "non-empty list"),
        ({"classes": [{"color": "#111111"}]}, "class entry 1 needs a 'name'"),
        ({"classes": ["a"], "merge": ["x"]}, "'merge' must map raw ids"),
        ({"classes": ["a"], "rare": "b"}, "rare class 'b' is not one of"),
        ({"classes": ["a"], "merge": {"1": 3}}, "outside 1..1"),
    ],
)
def test_from_dict_errors(data, message):
    with pytest.raises(SchemeError, match=message):
        ClassScheme.from_dict(data, source="s.json")


def test_load_scheme_sources(tmp_path):
    assert load_scheme("CoNSeP") is CONSEP
    assert load_scheme(GLYSAC) is GLYSAC
    assert load_scheme({"classes": ["a"]}).names == ("a",)
    p = tmp_path / "s.json"
    CONSEP.save(p)
    assert load_scheme(p) == CONSEP
    assert json.loads(p.read_text())["merge"]["5"] == 4
    y = tmp_path / "s.yaml"
    y.write_text("name: lab\nclasses:\n  - name: a\n  - name: b\nmerge: {1: 1, 7: 2}\nrare: [b]\n")
    s = load_scheme(y)
    assert s.name == "lab" and s.merge == {1: 1, 7: 2} and s.rare == (2,)
    with pytest.raises(SchemeError, match="neither a built-in"):
        load_scheme(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SchemeError, match=r"bad\.json:1:2: cannot parse"):
        load_scheme(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("classes: 3\n")
    with pytest.raises(SchemeError, match=r"wrong\.yaml: 'classes' must be"):
        load_scheme(wrong)


def test_rank_by_scarcity():
    assert rank_by_scarcity(np.array([0, 50, 3, 3, 9])) == (2, 3, 4, 1)
    assert rank_by_scarcity({1: 4, 2: 1}, classes=(1, 2, 3)) == (3, 2, 1)


def test_six_class_scheme_and_schemes_named_by_folders(tmp_path):
    # (the test's name keeps dataset names out of tmp_path)
    from napari_diffmix.classes import LIZARD, scheme_named_by_path

    assert load_scheme("lizard") is LIZARD and load_scheme("Lizard") is LIZARD
    assert LIZARD.names == ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
    assert LIZARD.rare == (1, 5) and LIZARD.condition_channels == 8
    assert LIZARD.merge_raw(np.arange(7)).tolist() == [0, 1, 2, 3, 4, 5, 6]  # Lizard/CoNIC ids are the classes
    labels = tmp_path / "Lizard_Labels" / "Labels"
    labels.mkdir(parents=True)
    (labels / "consep_1.mat").write_bytes(b"")
    assert scheme_named_by_path(labels / "consep_1.mat") is LIZARD  # a Lizard tile named after its source set
    (tmp_path / "data" / "GLySAC" / "Test").mkdir(parents=True)
    assert scheme_named_by_path(tmp_path / "data" / "GLySAC" / "Test").name == "glysac"
    (tmp_path / "CoNSeP" / "Test").mkdir(parents=True)
    assert scheme_named_by_path(tmp_path / "CoNSeP" / "Test").name == "consep"
    assert scheme_named_by_path(tmp_path / "data") is None
