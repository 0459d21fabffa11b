"""ImageNet-1k class names and the resolver behind ``adm sample --class``.

The 1000 ILSVRC2012 classes live in ``data/imagenet_classes.txt``, one line per class in the
standard index order (sorted WordNet ids): ``wnid<TAB>synonym, synonym, ...``. The first synonym
is the display name (``207`` -> ``golden retriever``).

:func:`resolve_classes` turns a ``--class`` value into class indices. A value is a comma list of
items; each item is an index (``207``) or a name, matched against every synonym regardless of
case, apostrophes, dots and hyphens: an exact display name wins, then an exact synonym, then whole
words of a synonym, then any substring; a tier with one class resolves, a tier with several is
ambiguous (``retriever``) unless exactly one display name has the item's own case (``Cardigan``,
the corgi; ``cardigan``, the sweater), an empty tier falls through to the next. Errors are
:class:`~adm_cli.errors.UsageError` with one line.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache
from importlib import resources

from .errors import UsageError

NUM_IMAGENET_CLASSES = 1000
_DATA_FILE = "imagenet_classes.txt"
_MAX_LISTED = 6  # candidates named in an "ambiguous" message
_MAX_CLOSEST = 5  # suggestions named in an "unknown class" message
_INT_RE = re.compile(r"[+-]?\d+")
_SHOWN_RE = re.compile(r"(.+?)\s*\((.+)\)")  # "name (synonym)", as _describe shows a class

__all__ = [
    "NUM_IMAGENET_CLASSES", "class_names", "class_synonyms", "label_name", "resolve_classes", "wnid",
]


@lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(wnid, synonyms)`` for every class, in index order, read once from the package data."""
    text = resources.files("adm_cli").joinpath("data", _DATA_FILE).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        wn, _, names = line.partition("\t")
        rows.append((wn.strip(), tuple(s.strip() for s in names.split(",") if s.strip())))
    if len(rows) != NUM_IMAGENET_CLASSES:  # a broken install, never a user error
        raise RuntimeError(f"{_DATA_FILE} has {len(rows)} classes, expected {NUM_IMAGENET_CLASSES}")
    return tuple(rows)


def _row(i: int) -> tuple[str, tuple[str, ...]]:
    i = int(i)
    if not 0 <= i < NUM_IMAGENET_CLASSES:
        raise IndexError(f"ImageNet class index {i} is out of range 0-{NUM_IMAGENET_CLASSES - 1}")
    return _table()[i]


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(syn[0] for _, syn in _table())


def class_names() -> list[str]:
    """The 1000 display names (first synonym of each class), index order."""
    return list(_names())


def class_synonyms(i: int) -> list[str]:
    """Every synonym of ImageNet class ``i`` (the display name first)."""
    return list(_row(i)[1])


def wnid(i: int) -> str:
    """The WordNet id of ImageNet class ``i`` (``207`` -> ``n02099601``)."""
    return _row(i)[0]


def label_name(i: int, num_classes: int = NUM_IMAGENET_CLASSES) -> str:
    """A printable label: the ImageNet display name for 1000-class models, else the index."""
    if num_classes == NUM_IMAGENET_CLASSES:
        return _row(i)[1][0]
    return str(int(i))


# --------------------------------------------------------------------------- resolution


_DROPPED = str.maketrans("", "", "'\u2019.")  # "jack-o'-lantern", "carpenter’s kit", "R.V."


def _norm(s: str) -> str:
    """Case-, apostrophe-, dot-, underscore-, hyphen- and spacing-insensitive form of a name."""
    return " ".join(s.casefold().translate(_DROPPED).replace("_", " ").replace("-", " ").split())


@lru_cache(maxsize=1)
def _imagenet_vocab() -> tuple[tuple[str, ...], ...]:
    return tuple(syn for _, syn in _table())


def _vocab(names: list[str] | None) -> tuple[tuple[str, ...], ...]:
    """Per class, the names an item may match."""
    if names is None:
        return _imagenet_vocab()
    return tuple((str(n),) for n in names)


@lru_cache(maxsize=4)
def _full_labels(vocab: tuple[tuple[str, ...], ...]) -> dict[str, int]:
    """Each class's synonyms joined as ImageNet lists them, normalised, when there are several."""
    return {_norm(", ".join(syn)): i for i, syn in enumerate(vocab) if len(syn) > 1}


def _describe(i: int, vocab: tuple[tuple[str, ...], ...], matched: str | None = None) -> str:
    shown = vocab[i][0] if vocab[i] else str(i)
    if matched is not None and _norm(matched) != _norm(shown):
        return f"{i} {shown} ({matched})"
    return f"{i} {shown}"


def _ambiguous(item: str, hits: dict[int, str], vocab) -> UsageError:
    idx = sorted(hits)
    listed = ", ".join(_describe(i, vocab, hits[i]) for i in idx[:_MAX_LISTED])
    more = f" and {len(idx) - _MAX_LISTED} more" if len(idx) > _MAX_LISTED else ""
    # "crane" (the bird, the machine) has no fuller name: only an index tells them apart
    same = len({_norm(vocab[i][0]) for i in idx}) == 1 and all(len(vocab[i]) == 1 for i in idx)
    return UsageError(f"class '{item}' is ambiguous: {listed}{more}; "
                      + ("give the index" if same else "give a fuller name or an index"))


def _unknown(item: str, vocab, num_classes: int) -> UsageError:
    by_norm: dict[str, tuple[int, str]] = {}
    for i, syns in enumerate(vocab):
        for s in syns:
            by_norm.setdefault(_norm(s), (i, s))
    close = difflib.get_close_matches(_norm(item), list(by_norm), n=_MAX_CLOSEST, cutoff=0.6)
    if close:
        hint = "closest: " + ", ".join(f"{by_norm[c][1]} ({by_norm[c][0]})" for c in close)
    else:
        hint = f"give a class name or an index 0-{num_classes - 1}"
    return UsageError(f"unknown class '{item}'; {hint}")


def _match_name(item: str, vocab, num_classes: int) -> int:
    q = _norm(item)
    word = re.compile(r"(?<!\w)" + re.escape(q) + r"(?!\w)")
    tests = {
        "display": lambda n: n == q,  # 1. exact display name
        "synonym": lambda n: n == q,  # 2. exact synonym
        "word": lambda n: word.search(n) is not None,  # 3. whole words of a synonym
        "substring": lambda n: q in n,  # 4. any part of a synonym
    }
    for tier, test in tests.items():
        hits: dict[int, str] = {}
        for i, syns in enumerate(vocab):
            cands = syns[:1] if tier == "display" else syns
            for s in cands:
                if test(_norm(s)):
                    hits.setdefault(i, s)
                    break
        if len(hits) == 1:
            return next(iter(hits))
        if tier == "display" and len(cased := [i for i in hits if vocab[i][0] == item]) == 1:
            return cased[0]  # names that differ only in case: "Cardigan" (the corgi), "cardigan"
        if hits:
            raise _ambiguous(item, hits, vocab)
    raise _unknown(item, vocab, num_classes)


def resolve_classes(
    spec: str | None, num_classes: int = NUM_IMAGENET_CLASSES, names: list[str] | None = None
) -> list[int] | None:
    """Parse a ``--class`` value into class indices, or ``None`` for "pick at random".

    ``spec`` is a comma list of indices and/or names (``"207,hamster,1"``); synonyms are matched
    one at a time, except that a whole ImageNet label pasted as it is listed ("skunk, polecat,
    wood pussy") is its one class. With ``names`` (one per class), names are
    matched against those; otherwise a 1000-class model uses the ImageNet synonyms and any other
    model accepts indices only. Raises :class:`UsageError` for a bad value.
    """
    if spec is None or not str(spec).strip():
        return None
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a model with {num_classes} classes")
    use_names = names is not None or num_classes == NUM_IMAGENET_CLASSES
    vocab = _vocab(names) if use_names else ()

    out: list[int] = []
    items = [" ".join(raw.split()) for raw in str(spec).split(",")]
    full = _full_labels(vocab) if use_names else {}
    longest = max((len(syn) for syn in vocab), default=1)  # synonyms in the longest label
    j = 0
    while j < len(items):
        # A whole label pasted as is ("skunk, polecat, wood pussy") is that one class, even
        # where one of its synonyms alone is another class's name ("polecat").
        run = next((k for k in range(min(len(items), j + longest), j + 1, -1)
                    if _norm(", ".join(items[j:k])) in full), None)
        if run is not None:
            out.append(full[_norm(", ".join(items[j:run]))])
            j = run
            continue
        item = items[j]
        j += 1
        if not item:
            continue  # "207," or "207,,1": stray commas are harmless
        if _INT_RE.fullmatch(item):
            i = int(item)
            if not 0 <= i < num_classes:
                raise UsageError(f"class index {i} is out of range 0-{num_classes - 1}")
            out.append(i)
        elif use_names and (pair := _SHOWN_RE.fullmatch(item)):
            # "Tibetan terrier (chrysanthemum dog)": a class as the ambiguity message shows it
            i = _match_name(pair.group(1), vocab, num_classes)
            if _norm(pair.group(2)) not in {_norm(n) for n in vocab[i]}:
                raise UsageError(f"class '{item}': '{pair.group(2)}' is not a name of class {i} ({vocab[i][0]})")
            out.append(i)
        elif use_names:
            out.append(_match_name(item, vocab, num_classes))
        else:
            raise UsageError(
                f"class '{item}' is not an index; this model's {num_classes} classes have no names, "
                f"give an index 0-{num_classes - 1}"
            )
    if not out:  # " , ": not blank, so not "random" either; the user meant some class
        raise UsageError(f"--class {spec!r} names no class; give an index or a name (or leave it out for random)")
    return out
