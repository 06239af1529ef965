"""Class schemes: which nucleus classes exist, their colours, and how raw ids merge.

A :class:`ClassScheme` is the single owner of class facts. Datasets store *raw* type ids
(CoNSeP has 7, GLySAC 10); the scheme's ``merge`` table maps each raw id to a merged class
1..C exactly once, when a tile is read. Everything downstream (label maps, models, exports)
speaks merged classes only.

Which classes are rare is data (``rare``, ranked rarest first), never inferred from a name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import SchemeError

# Okabe & Ito's colour-blind safe palette (minus black, which is the background).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
BACKGROUND_COLOR = "#000000"


@dataclass(frozen=True)
class ClassScheme:
    """Named nucleus classes 1..C with colours, a raw-id merge table and the rare classes.

    ``names[k - 1]`` and ``colors[k - 1]`` describe class ``k``. ``merge`` maps raw dataset
    ids to classes; raw id 0 is always background. ``rare`` lists class ids rarest first.
    """

    name: str
    names: tuple[str, ...]
    colors: tuple[str, ...]
    # A dict cannot be hashed; equal schemes still hash equal without it.
    merge: Mapping[int, int] = field(default_factory=dict, hash=False)
    rare: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "colors", tuple(c.upper() for c in self.colors))
        object.__setattr__(self, "rare", tuple(int(r) for r in self.rare))
        merge = {int(k): int(v) for k, v in (self.merge or {}).items()}
        if not merge:
            merge = {k: k for k in range(1, len(self.names) + 1)}
        object.__setattr__(self, "merge", merge)
        self._validate()

    def _validate(self) -> None:
        c = len(self.names)
        if c == 0:
            raise SchemeError(f"class scheme {self.name!r} has no classes")
        if c > 254:
            raise SchemeError(f"class scheme {self.name!r} has {c} classes; at most 254 fit in a uint8 type_map")
        if len(set(self.names)) != c:
            raise SchemeError(f"class scheme {self.name!r} repeats a class name: {list(self.names)}")
        if len(self.colors) != c:
            raise SchemeError(
                f"class scheme {self.name!r} has {c} classes but {len(self.colors)} colours; give one colour per class"
            )
        for col in self.colors:
            if not (len(col) == 7 and col[0] == "#" and all(ch in "0123456789ABCDEF" for ch in col[1:])):
                raise SchemeError(f"class scheme {self.name!r}: colour {col!r} is not of the form '#RRGGBB'")
        if len(set(self.colors)) != c or BACKGROUND_COLOR in self.colors:
            raise SchemeError(f"class scheme {self.name!r}: colours must be distinct and not black (background)")
        for raw, cls in self.merge.items():
            if raw <= 0:
                raise SchemeError(f"class scheme {self.name!r}: raw id {raw} in the merge table; raw ids start at 1 (0 is background)")
            if not 1 <= cls <= c:
                raise SchemeError(
                    f"class scheme {self.name!r}: raw id {raw} merges into class {cls}, outside 1..{c}"
                )
        missing = set(range(1, c + 1)) - set(self.merge.values())
        if missing:
            raise SchemeError(f"class scheme {self.name!r}: no raw id merges into class(es) {sorted(missing)}")
        for r in self.rare:
            if not 1 <= r <= c:
                raise SchemeError(f"class scheme {self.name!r}: rare class {r} is outside 1..{c}")

    # -- facts -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of nucleus classes C (background excluded)."""
        return len(self.names)

    @property
    def condition_channels(self) -> int:
        """Channels of the model condition: background + C one-hot + 1 instance edge."""
        return self.num_classes + 2

    @property
    def class_ids(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_classes + 1))

    def _check_id(self, k: int) -> None:
        if not 0 <= k <= self.num_classes:
            raise SchemeError(f"class id {k} is outside 0..{self.num_classes} of scheme {self.name!r}")

    def class_name(self, k: int) -> str:
        self._check_id(k)
        return "background" if k == 0 else self.names[k - 1]

    def class_id(self, name: str) -> int:
        """Class id for a name (case-insensitive)."""
        lowered = [n.lower() for n in self.names]
        try:
            return lowered.index(name.lower()) + 1
        except ValueError:
            raise SchemeError(f"class {name!r} is not in scheme {self.name!r}; classes are {list(self.names)}") from None

    def color_rgb(self, k: int) -> tuple[int, int, int]:
        """Colour of class ``k`` (0 = background, black) as 0..255 RGB."""
        self._check_id(k)
        col = BACKGROUND_COLOR if k == 0 else self.colors[k - 1]
        return tuple(int(col[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]

    def palette(self) -> np.ndarray:
        """(C + 1, 3) uint8 lookup table, row k = colour of class k, row 0 black."""
        return np.array([self.color_rgb(k) for k in range(self.num_classes + 1)], dtype=np.uint8)

    @property
    def major(self) -> tuple[int, ...]:
        """Classes that are not rare: the ones balancing replaces."""
        return tuple(k for k in self.class_ids if k not in self.rare)

    # -- merging -----------------------------------------------------------------------------
    def merge_lut(self) -> np.ndarray:
        """Lookup table raw id -> class, with -1 for raw ids the scheme does not know."""
        size = max(self.merge) + 1
        lut = np.full(size, -1, dtype=np.int16)
        lut[0] = 0
        for raw, cls in self.merge.items():
            lut[raw] = cls
        return lut

    def merge_raw(self, raw: np.ndarray, *, source: str | os.PathLike | None = None) -> np.ndarray:
        """Map raw type ids to classes (uint8). Unknown ids raise :class:`SchemeError`.

        Call this exactly once per tile, on raw dataset labels: merging merged labels again
        is the bug the public DiffMix sampler has (spindle turned epithelial).
        """
        raw = np.asarray(raw)
        if raw.size and (not np.issubdtype(raw.dtype, np.integer) and not np.all(np.mod(raw, 1) == 0)):
            raise SchemeError(_where(source) + f"type ids must be integers, got dtype {raw.dtype}")
        raw = raw.astype(np.int64, copy=False)
        lut = self.merge_lut()
        bad = (raw < 0) | (raw >= lut.size)
        if raw.size and not bad.any():
            out = lut[raw]
            bad = out < 0
        if bad.any():
            unknown = sorted(set(np.unique(raw[bad]).tolist()))
            raise SchemeError(
                _where(source)
                + f"raw class id(s) {unknown[:10]} are not in scheme {self.name!r} "
                f"(known raw ids: {sorted(self.merge)}); pick the matching --scheme or give a scheme file"
            )
        return lut[raw].astype(np.uint8)

    def check_classes(self, type_ids: np.ndarray, *, source: str | os.PathLike | None = None) -> None:
        """Raise :class:`SchemeError` unless every id is background or a class of this scheme."""
        ids = np.unique(np.asarray(type_ids))
        bad = ids[(ids < 0) | (ids > self.num_classes)]
        if bad.size:
            raise SchemeError(
                _where(source)
                + f"class id(s) {bad[:10].tolist()} are outside 0..{self.num_classes} of scheme {self.name!r}"
            )

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": [{"name": n, "color": c} for n, c in zip(self.names, self.colors)],
            "merge": {str(k): v for k, v in sorted(self.merge.items())},
            "rare": list(self.rare),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "ClassScheme":
        where = _where(source)
        if not isinstance(data, Mapping):
            raise SchemeError(where + "a class scheme must be a mapping with 'name' and 'classes'")
        _refuse_unknown_keys(data, SCHEME_KEYS, where, "a class scheme")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes:
            raise SchemeError(where + "'classes' must be a non-empty list of {name, color} entries")
        names, colors = [], []
        for i, entry in enumerate(classes, start=1):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise SchemeError(where + f"class entry {i} needs a 'name'")
            _refuse_unknown_keys(entry, CLASS_KEYS, where, f"class entry {i}")
            names.append(str(entry["name"]))
            colors.append(str(entry.get("color", OKABE_ITO[(i - 1) % len(OKABE_ITO)])))
        merge_in = data.get("merge") or {}
        try:
            merge = {int(k): int(v) for k, v in merge_in.items()}
        except (AttributeError, TypeError, ValueError):
            raise SchemeError(where + "'merge' must map raw ids to class ids, e.g. {3: 3, 4: 3}") from None
        rare = data.get("rare", ())
        if isinstance(rare, (str, int)):
            rare = [rare]
        rare_ids = []
        for r in rare:
            if isinstance(r, str) and not r.isdigit():
                lowered = [n.lower() for n in names]
                if r.lower() not in lowered:
                    raise SchemeError(where + f"rare class {r!r} is not one of {names}")
                rare_ids.append(lowered.index(r.lower()) + 1)
            else:
                rare_ids.append(int(r))
        try:
            return cls(str(data.get("name", "custom")), tuple(names), tuple(colors), merge, tuple(rare_ids))
        except SchemeError as exc:
            raise SchemeError(where + str(exc)) from None

    def save(self, path: str | os.PathLike) -> None:
        from .atomic import write_json

        write_json(path, self.to_dict())


def _where(source: str | os.PathLike | None) -> str:
    return f"{os.fspath(source)}: " if source is not None else ""


# The keys a scheme (and each class entry) may hold: a misspelt one ("rar", "colour") would
# otherwise be ignored and its default used without a word.
SCHEME_KEYS = ("name", "classes", "merge", "rare")
CLASS_KEYS = ("name", "color")


def _refuse_unknown_keys(data: Mapping[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    import difflib

    unknown = [str(k) for k in data if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise SchemeError(where + f"unknown key(s) {', '.join(map(repr, unknown))} in {what}{guess}; known keys: {', '.join(known)}")


def _parse_error(path: Path, exc: Exception) -> str:
    """One line naming the file, line and column of a JSON/YAML syntax error (PyYAML prints
    several lines of context)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError; its marks count from 0
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        return f"{path}:{mark.line + 1}:{mark.column + 1}: cannot parse class scheme file: YAML syntax error: {problem}"
    if isinstance(exc, json.JSONDecodeError):
        return f"{path}:{exc.lineno}:{exc.colno}: cannot parse class scheme file: JSON syntax error: {exc.msg}"
    return f"{path}: cannot parse class scheme file: {' '.join(str(exc).split())}"


# Facts from the DiffMix paper and the CoNSeP / GLySAC releases (see DESIGN.md §3).
CONSEP = ClassScheme(
    name="consep",
    names=("other", "inflammatory", "epithelial", "spindle"),
    colors=(OKABE_ITO[0], OKABE_ITO[1], OKABE_ITO[2], OKABE_ITO[5]),
    # raw: 1 other, 2 inflammatory, 3 healthy epi, 4 malignant epi, 5 fibroblast, 6 muscle, 7 endothelial
    merge={1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4},
    rare=(1,),
)

GLYSAC = ClassScheme(
    name="glysac",
    names=("other", "lymphocyte", "epithelial"),
    colors=(OKABE_ITO[0], OKABE_ITO[1], OKABE_ITO[2]),
    merge={1: 1, 2: 1, 9: 1, 10: 1, 4: 2, 5: 2, 6: 2, 7: 2, 3: 3, 8: 3},
    rare=(1,),
)

# The bundled demo tile (skimage's IHC image): classes assigned from tissue context, see
# napari_diffmix.demo_data for the rules.
DEMO = ClassScheme(
    name="demo",
    names=("other", "epithelial", "stromal"),
    colors=(OKABE_ITO[0], OKABE_ITO[2], OKABE_ITO[6]),
    rare=(1,),
)

# Lizard (Graham et al. 2021) and the CoNIC challenge patches cut from it share these six classes,
# raw ids 1..6 in this order (Lizard's ``class`` key, CoNIC's class channel); no merging.
LIZARD = ClassScheme(
    name="lizard",
    names=("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective"),
    colors=(OKABE_ITO[0], OKABE_ITO[2], OKABE_ITO[1], OKABE_ITO[6], OKABE_ITO[3], OKABE_ITO[5]),
    rare=(1, 5),
)

BUILTIN_SCHEMES: dict[str, ClassScheme] = {s.name: s for s in (CONSEP, GLYSAC, DEMO, LIZARD)}

# Words in a folder name that name a built-in scheme (CoNIC patches use Lizard's classes).
_PATH_WORDS = (("lizard", LIZARD), ("conic", LIZARD), ("glysac", GLYSAC), ("consep", CONSEP))


def scheme_named_by_path(path: str | os.PathLike) -> ClassScheme | None:
    """The built-in scheme that a folder on ``path`` names (``.../CoNSeP/Test``, ``Lizard_Labels``), else None.

    Dataset releases keep their name in their folders; the napari reader and ``diffmix evaluate``
    use this when no scheme is given. The folder nearest the data decides (``lizard/CoNSeP/...``
    is CoNSeP); a file's own name is not looked at, since Lizard names its tiles after their
    source sets (``consep_1.mat``, ``glas_3.mat``).
    """
    p = Path(path).resolve()
    folders = p.parts if p.is_dir() else p.parent.parts
    for part in reversed(folders):
        for word, scheme in _PATH_WORDS:
            if word in part.lower():
                return scheme
    return None


def load_scheme(spec: "str | os.PathLike | ClassScheme | Mapping[str, Any]") -> ClassScheme:
    """A scheme from a built-in name (``consep``, ``glysac``, ``demo``, ``lizard``), a JSON/YAML file or a dict."""
    if isinstance(spec, ClassScheme):
        return spec
    if isinstance(spec, Mapping):
        return ClassScheme.from_dict(spec)
    key = os.fspath(spec)
    if key.lower() in BUILTIN_SCHEMES:
        return BUILTIN_SCHEMES[key.lower()]
    path = Path(key)
    if not path.is_file():
        raise SchemeError(
            f"class scheme {key!r} is neither a built-in ({', '.join(BUILTIN_SCHEMES)}) nor an existing JSON/YAML file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError: report, never a deep traceback
        raise SchemeError(_parse_error(path, exc)) from None
    return ClassScheme.from_dict(data, source=str(path))


def rank_by_scarcity(counts: Mapping[int, int] | np.ndarray, classes: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Class ids sorted rarest first by nuclei count (ties by class id).

    ``counts`` is either a mapping class -> count or an array indexed by class id.
    """
    if not isinstance(counts, Mapping):
        arr = np.asarray(counts)
        counts = {k: int(arr[k]) for k in range(1, arr.size)}
    ids = classes if classes is not None else tuple(sorted(counts))
    return tuple(sorted(ids, key=lambda k: (counts.get(k, 0), k)))
