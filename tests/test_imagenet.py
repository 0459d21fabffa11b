"""ImageNet-1k class data and the ``--class`` resolver."""

import re
from importlib import resources

import pytest

from adm_cli.errors import UsageError
from adm_cli.imagenet import class_names, class_synonyms, label_name, resolve_classes, wnid

DIGITS = [str(i) for i in range(10)]


def _lines():
    text = resources.files("adm_cli").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


# ----------------------------------------------------------------------------- the data file


def test_data_file_has_1000_sorted_unique_wnids():
    lines = _lines()
    assert len(lines) == 1000
    wnids = [line.split("\t")[0] for line in lines]
    assert all(line.count("\t") == 1 for line in lines)
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert all(line.split("\t")[1].strip() for line in lines)


@pytest.mark.parametrize(
    "i, wn, name",
    [
        (0, "n01440764", "tench"),
        (1, "n01443537", "goldfish"),
        (207, "n02099601", "golden retriever"),
        (281, "n02123045", "tabby"),
        (333, "n02342885", "hamster"),
        (999, "n15075141", "toilet tissue"),
    ],
)
def test_known_classes(i, wn, name):
    assert wnid(i) == wn
    assert class_names()[i] == name
    assert class_synonyms(i)[0] == name
    assert label_name(i) == name


def test_synonyms_and_names():
    assert class_synonyms(0) == ["tench", "Tinca tinca"]
    assert "tabby cat" in class_synonyms(281)
    names = class_names()
    assert len(names) == 1000 and all(names)
    names.append("x")  # a copy: the cached table is not touched
    assert len(class_names()) == 1000
    with pytest.raises(IndexError):
        wnid(1000)
    with pytest.raises(IndexError):
        class_synonyms(-1)


def test_label_name_other_models():
    assert label_name(3, num_classes=10) == "3"
    assert label_name(207, num_classes=1000) == "golden retriever"


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("spec", [None, "", "   "])
def test_empty_means_random(spec):
    assert resolve_classes(spec) is None


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("207", [207]),
        (" 207 ", [207]),
        ("0", [0]),
        ("999", [999]),
        ("golden retriever", [207]),
        ("Golden Retriever", [207]),
        ("GOLDEN  retriever", [207]),
        ("golden_retriever", [207]),
        ("hamster", [333]),
        ("goldfish", [1]),
        ("Carassius auratus", [1]),  # any synonym
        ("tabby", [281]),  # exact synonym beats the substring of "tabby cat"
        ("tabby cat", [281]),
        ("golden retr", [207]),  # unambiguous part of a name
        ("golden", [207]),
        ("shih tzu", [155]),  # hyphens and spaces are interchangeable
        ("tank suit", [639]),
        ("partridge", [86]),  # a display name beats another class's synonym
        ("207,hamster,1", [207, 333, 1]),
        ("207, hamster , goldfish", [207, 333, 1]),
        ("tench,tench", [0, 0]),
        ("207,", [207]),
    ],
)
def test_resolve(spec, expected):
    assert resolve_classes(spec) == expected


@pytest.mark.parametrize("spec, bad", [("1000", 1000), ("-1", -1), ("207,1000", 1000)])
def test_out_of_range(spec, bad):
    with pytest.raises(UsageError) as e:
        resolve_classes(spec)
    msg = str(e.value)
    assert msg == f"class index {bad} is out of range 0-999"
    assert "\n" not in msg


def test_unknown_name_suggests_closest():
    with pytest.raises(UsageError) as e:
        resolve_classes("golden retreiver")
    msg = str(e.value)
    assert msg.startswith("unknown class 'golden retreiver'; closest: golden retriever")
    assert "\n" not in msg


def test_unknown_name_without_close_matches():
    with pytest.raises(UsageError, match=r"unknown class 'zzqqxx'.*0-999"):
        resolve_classes("zzqqxx")


def test_ambiguous_lists_candidates():
    with pytest.raises(UsageError) as e:
        resolve_classes("retriever")
    msg = str(e.value)
    assert "ambiguous" in msg and "'retriever'" in msg
    for i, name in [(205, "flat-coated retriever"), (207, "golden retriever"), (208, "Labrador retriever")]:
        assert f"{i} {name}" in msg
    assert "\n" not in msg


def test_ambiguous_list_is_capped():
    with pytest.raises(UsageError) as e:
        resolve_classes("cat")
    msg = str(e.value)
    assert "ambiguous" in msg and "more" in msg
    assert msg.count(",") <= 7  # at most six candidates named


def test_duplicate_display_names_are_ambiguous():
    with pytest.raises(UsageError, match=r"134 crane.*517 crane"):
        resolve_classes("crane")


# ----------------------------------------------------------------------------- other models


def test_small_model_with_names():
    assert resolve_classes("3", 10, DIGITS) == [3]
    assert resolve_classes("3,7,0", num_classes=10, names=DIGITS) == [3, 7, 0]
    assert resolve_classes(None, 10, DIGITS) is None
    with pytest.raises(UsageError, match=r"^class index 10 is out of range 0-9$"):
        resolve_classes("10", 10, DIGITS)
    with pytest.raises(UsageError, match=r"unknown class 'hamster'"):
        resolve_classes("hamster", 10, DIGITS)


def test_small_model_named_classes():
    names = ["cat", "dog", "hot dog"]
    assert resolve_classes("CAT,hot dog,1", 3, names) == [0, 2, 1]
    with pytest.raises(UsageError, match=r"ambiguous: 1 dog, 2 hot dog") as e:
        resolve_classes("do", 3, names)
    assert "\n" not in str(e.value)


def test_small_model_without_names_takes_indices_only():
    assert resolve_classes("9", 10) == [9]
    with pytest.raises(UsageError) as e:
        resolve_classes("golden retriever", 10)
    msg = str(e.value)
    assert "not an index" in msg and "0-9" in msg
    with pytest.raises(UsageError, match=r"out of range 0-9"):
        resolve_classes("207", 10)


def test_names_must_match_num_classes():
    with pytest.raises(ValueError):
        resolve_classes("1", 10, ["a", "b"])


@pytest.mark.parametrize("label,index", [
    ("projectile, missile", 744), ("skunk, polecat, wood pussy", 361),
    ("ruffed grouse, partridge, Bonasa umbellus", 82), ("chime, bell, gong", 494),
    ("bathtub, bathing tub, bath, tub", 435), ("harmonica, mouth organ, harp, mouth harp", 593),
])
def test_a_whole_pasted_label_is_its_one_class(label, index):
    """One of these synonyms alone is another class's name (polecat, missile, bell, tub, harp):
    split at every comma, the label used to mix that class into the run."""
    assert resolve_classes(label) == [index]
    assert resolve_classes(f"207, {label.upper()}, 1") == [207, index, 1]
    alone = label.split(", ")[1:]  # the synonyms still work one at a time, as before
    assert all(len(resolve_classes(s)) == 1 for s in alone if s.lower() not in ("bath", "partridge"))


def test_every_full_imagenet_label_resolves_to_its_class():
    labels = [", ".join(class_synonyms(i)) for i in range(1000)]
    shared = {"crane", "maillot"}  # one-name labels that are another class's display name too
    for label in shared:
        with pytest.raises(UsageError, match="ambiguous"):
            resolve_classes(label)
    assert all(resolve_classes(label) == [i] for i, label in enumerate(labels) if label not in shared)


@pytest.mark.parametrize("item,index", [
    ("Cardigan", 264), ("cardigan", 474),  # the corgi and the sweater differ only in case
    ("jack o lantern", 607), ("jack-o-lantern", 607), ("JACK-O'-LANTERN", 607),
    ("carpenters kit", 477), ("carpenter\u2019s kit", 477), ("RV", 757), ("st. bernard", 247),
])
def test_case_apostrophes_and_dots(item, index):
    assert resolve_classes(item) == [index]


def test_case_decides_only_between_names_that_differ_in_case_alone():
    with pytest.raises(UsageError, match="264 Cardigan, 474 cardigan"):
        resolve_classes("CARDIGAN")
    with pytest.raises(UsageError, match="ambiguous"):  # "Crane" has no exact-case class
        resolve_classes("Crane")


def test_ambiguous_names_with_no_fuller_form_ask_for_the_index():
    with pytest.raises(UsageError, match="134 crane, 517 crane; give the index$"):
        resolve_classes("crane")
    with pytest.raises(UsageError, match="give a fuller name or an index$"):  # 639 is also "tank suit"
        resolve_classes("maillot")


@pytest.mark.parametrize("item", ["dog", "shark", "retriever", "terrier"])
def test_each_class_an_ambiguity_message_lists_can_be_pasted_back(item):
    with pytest.raises(UsageError) as caught:
        resolve_classes(item)
    listed = str(caught.value).split("ambiguous: ", 1)[1].split("; give", 1)[0].split(" and ")[0]
    shown = re.findall(r"(\d+) ([^,]+?)(?=, \d+ |$)", listed)
    assert len(shown) >= 2, listed
    for index, text in shown:
        assert resolve_classes(text) == [int(index)], text
    with pytest.raises(UsageError, match="'golden retriever' is not a name of class 200"):
        resolve_classes("Tibetan terrier (golden retriever)")
