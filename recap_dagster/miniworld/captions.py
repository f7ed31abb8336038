"""The miniworld's language: alt text, human SHORT/LONG captions, terse pretraining captions,
evaluation prompts, and a parser that reads colours, shapes, counts and cells back out.

Every generator takes a ``random.Random`` so that the corpus is reproducible from a seed.
The wordings are deliberately varied (templates, synonyms, optional adjectives) but they
stay inside a grammar that :func:`parse_caption` understands, so captioner outputs that
imitate them can be graded against the scene's ground truth with :func:`grade_caption`.

Grammar the parser relies on (and that every generator here respects):

- an object mention is ``[count] [adjective...] colour shape[s]``, colour and shape adjacent;
- a position is a group of position words (``top``/``upper``, ``bottom``/``lower``,
  ``left``, ``right``, ``middle``/``center``/``centre``) with fillers such as ``the``,
  ``corner``, ``side``; it belongs to the mention of its clause;
- clauses are separated by punctuation and by ``and``/``while``/``with``/``plus``/``but``;
  a clause that has positions but no mention continues the previous mention ("two red
  circles in the top left and the center").
- background descriptions never use colour names or position words.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from recap_dagster.miniworld.scenes import (
    COLOURS,
    GRID,
    SHAPES,
    Requirement,
    Scene,
)

Kind = tuple[str, str]
Cell = tuple[int, int]

# --------------------------------------------------------------------------------------
# Vocabulary shared by the generators and the parser
# --------------------------------------------------------------------------------------

PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
_SHAPE_FORMS: dict[str, tuple[str, bool]] = {
    **{s: (s, False) for s in SHAPES},
    **{p: (s, True) for s, p in PLURALS.items()},
}

# Count words the parser accepts directly before a mention (after skipping adjectives).
_COUNT_WORDS: dict[str, int | None] = {
    "a": 1, "an": 1, "one": 1, "single": 1, "lone": 1, "another": 1, "1": 1,
    "two": 2, "both": 2, "2": 2,
    "three": 3, "3": 3,
    "four": 4, "4": 4,
    "some": None, "several": None, "multiple": None, "many": None,
}  # fmt: skip
# "a pair of red circles": the word before "of".
_OF_COUNTS: dict[str, int] = {"pair": 2, "couple": 2, "trio": 3}
ADJECTIVES: tuple[str, ...] = ("small", "little", "bright", "solid", "flat", "plain", "simple")
_SKIPPABLE = set(ADJECTIVES) | {"tiny", "big", "large", "filled", "vivid", "just", "only"}

_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "right": 2}
_MID_WORDS = {"middle", "center", "centre", "central"}
_POSITION_WORDS = set(_ROW_WORDS) | set(_COL_WORDS) | _MID_WORDS
# Words allowed inside a position group without ending it ("the top left corner").
_POSITION_FILLERS = {"the", "corner", "side", "edge", "part", "very", "hand", "of"}
_CLAUSE_WORDS = {"and", "while", "whereas", "with", "plus", "but"}
_TOKEN_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_CLAUSE_PUNCT = set(",.;:()!?")

# Position phrases a person might write for each cell (all parseable).
POSITION_PHRASES: dict[Cell, tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the top left corner", "in the upper left", "at the top left",
             "in the top-left corner"),
    (0, 1): ("at the top", "in the top middle", "at the top center", "along the top",
             "in the upper middle"),
    (0, 2): ("in the top right", "in the top right corner", "in the upper right",
             "at the top right", "in the top-right corner"),
    (1, 0): ("on the left", "on the left side", "at the left", "in the middle left",
             "at the left edge"),
    (1, 1): ("in the center", "in the middle", "at the center", "in the very center",
             "in the centre"),
    (1, 2): ("on the right", "on the right side", "at the right", "in the middle right",
             "at the right edge"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "in the lower left",
             "at the bottom left", "in the bottom-left corner"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center", "along the bottom",
             "in the lower middle"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "in the lower right",
             "at the bottom right", "in the bottom-right corner"),
}  # fmt: skip
# Bare cell names for lists in parentheses: "(top left and center)".
BARE_CELLS: dict[Cell, tuple[str, ...]] = {
    (0, 0): ("top left", "upper left"),
    (0, 1): ("top", "top middle"),
    (0, 2): ("top right", "upper right"),
    (1, 0): ("left", "middle left"),
    (1, 1): ("center", "middle"),
    (1, 2): ("right", "middle right"),
    (2, 0): ("bottom left", "lower left"),
    (2, 1): ("bottom", "bottom middle"),
    (2, 2): ("bottom right", "lower right"),
}
# The neutral, GenEval-like wording used for evaluation prompts.
CANONICAL_POSITIONS: dict[Cell, str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}  # fmt: skip

assert GRID == 3, "the position vocabulary assumes a 3x3 grid"

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_BG_NOUNS = ("background", "backdrop", "canvas", "surface")

# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str], rng: random.Random) -> str:
    """'a', 'a and b', 'a, b and c' / 'a, b, and c'."""
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    comma = "," if rng.random() < 0.3 else ""
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _weighted(rng: random.Random, options: list[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _noun_phrase(
    colour: str,
    shape: str,
    count: int,
    rng: random.Random,
    *,
    adjective_p: float = 0.1,
    digits_p: float = 0.0,
) -> str:
    """'a red circle', 'a single small orange square', 'a pair of blue triangles'."""
    adjective = rng.choice(ADJECTIVES) + " " if rng.random() < adjective_p else ""
    head = f"{adjective}{colour} {_noun(shape, count)}"
    if count > 1 and rng.random() < digits_p:
        return f"{count} {head}"
    if count == 1:
        quantifier = _weighted(
            rng, [("ART", 0.6), ("one", 0.15), ("a single", 0.15), ("a lone", 0.1)]
        )
        if quantifier == "ART":
            quantifier = _article(head)
    elif count == 2:
        quantifier = _weighted(rng, [("two", 0.6), ("a pair of", 0.2), ("a couple of", 0.2)])
    elif count == 3:
        quantifier = _weighted(rng, [("three", 0.75), ("a trio of", 0.25)])
    else:
        quantifier = _NUMBER_WORDS.get(count, str(count))
    return f"{quantifier} {head}"


def _groups(scene: Scene) -> list[tuple[Kind, list[Cell]]]:
    """Objects grouped by kind, each with its cells in reading order."""
    cells: dict[Kind, list[Cell]] = {}
    for obj in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        cells.setdefault(obj.kind, []).append((obj.row, obj.col))
    return list(cells.items())


def _background_words(background: tuple[int, int, int], rng: random.Random) -> str:
    """A description of the light background that never uses a colour name."""
    r, g, b = background
    spread = max(background) - min(background)
    if spread <= 6:
        options = ["light grey", "pale grey", "off-white", "plain light", "soft grey", "light"]
    elif r == max(background):
        options = ["warm light grey", "cream", "warm off-white", "beige", "warm pale"]
    elif b == max(background):
        options = ["cool light grey", "cool pale grey", "cool off-white", "cold pale"]
    else:
        options = ["pale sage", "light sage", "soft pale", "pale grey"]
    return rng.choice(options)


def _background_phrase(scene: Scene, rng: random.Random) -> str:
    """'a light grey background', 'a cream backdrop'."""
    words = _background_words(scene.background, rng)
    return f"{_article(words)} {words} {rng.choice(_BG_NOUNS)}"


# CLIP's pre-tokenizer splits letters, single digits and punctuation runs; on miniworld text
# (ASCII) this regex gives the same pieces, and every miniworld word is one BPE token.
_PRETOKEN_RE = re.compile(r"[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+")
LONG_CAPTION_BUDGET = 64  # pre-tokens; leaves room under 77 for start/end and rare splits


def count_pretokens(text: str) -> int:
    """Number of CLIP pre-tokens in ``text`` (a lower bound on its BPE token count)."""
    return len(_PRETOKEN_RE.findall(text))


# --------------------------------------------------------------------------------------
# Alt text
# --------------------------------------------------------------------------------------

_GENERIC_ALT = (
    "stock photo", "abstract geometric background", "shapes clipart", "vector illustration",
    "geometric pattern", "colorful shapes", "kids shapes worksheet", "minimalist poster",
    "free clipart download", "wallpaper hd", "icon set", "logo design template", "image",
    "untitled", "thumbnail", "product photo", "click to enlarge", "geometry for kids",
    "flat design elements", "royalty free image", "background texture", "modern art print",
    "learning shapes", "cute clip art", "graphic design", "abstract art", "simple shapes",
    "bauhaus print", "educational flashcard", "sticker pack", "Stock Illustration",
    "geometric shapes set", "banner", "placeholder", "pattern", "home decor wall art",
    "preschool shapes", "shape sorting game", "abstract composition", "photo",
)  # fmt: skip
_TRUE_ALT_FORMS = (
    "{c} {s} icon", "{c} {s}", "{C} {S}", "{c} {s} png", "{c} {s} clipart", "flat {c} {s} vector",
    "{c} {s} shape", "{c}_{s}_0{d}.jpg", "{c} {s} on white background", "simple {c} {s}",
    "{c} {s} sticker", "{c}-{s}-icon", "{C} {S} Stock Illustration", "a {c} {s}",
    "{c} {s} isolated", "{C} {S} Vector", "{c} {s} logo", "{c} {s} emoji", "{c} {s} button",
    "{c} {s} symbol", "{c} {s} sign",
)  # fmt: skip


def _file_name(rng: random.Random) -> str:
    """A camera or upload file name, the commonest useless alt text."""
    stem = rng.choice(
        [
            f"IMG_{rng.randint(1000, 9999)}",
            f"DSC{rng.randint(0, 99999):05d}",
            f"dsc{rng.randint(0, 99999):05d}",
            f"image{rng.randint(0, 999):03d}",
            f"photo_{rng.randint(1, 9999)}",
            f"Untitled-{rng.randint(1, 9)}",
            f"pic{rng.randint(0, 99):02d}",
            f"screenshot_{rng.randint(2015, 2024)}_{rng.randint(1, 12):02d}",
            f"upload_{rng.randint(100000, 999999)}",
        ]
    )
    return stem + rng.choice([".jpg", ".jpg", ".png", ".jpeg", ".JPG", ""])


def _alt_for_kind(colour: str, shape: str, rng: random.Random) -> str:
    form = rng.choice(_TRUE_ALT_FORMS)
    return form.format(c=colour, s=shape, C=colour.title(), S=shape.title(), d=rng.randint(1, 9))


def alt_text(scene: Scene, rng: random.Random) -> str:
    """Web-like alt text: terse, partial, often irrelevant, sometimes wrong; never positions.

    Mix: ~50% irrelevant (file names, SEO phrases), ~35% names a true object (rarely with
    its count or a second object), ~15% names an object with a wrong colour or shape.
    """
    roll = rng.random()
    if roll < 0.50:
        text = _file_name(rng) if rng.random() < 0.45 else rng.choice(_GENERIC_ALT)
        if rng.random() < 0.1:
            text = f"{text} - {rng.choice(_GENERIC_ALT)}"
    elif roll < 0.85:
        groups = _groups(scene)
        (colour, shape), cells = rng.choice(groups)
        other = [g for g in groups if g[0] != (colour, shape)]
        style = rng.random()
        if style < 0.1 and len(cells) > 1:
            text = f"{_NUMBER_WORDS[len(cells)]} {colour} {PLURALS[shape]}"
        elif style < 0.18 and other:
            (colour2, shape2), _ = rng.choice(other)
            text = f"{colour} {shape} and {colour2} {shape2}"
        elif style < 0.25:
            text = f"{_alt_for_kind(colour, shape, rng)} - {rng.choice(_GENERIC_ALT)}"
        else:
            text = _alt_for_kind(colour, shape, rng)
    else:
        kinds = scene.kinds()
        colour, shape = rng.choice(sorted(kinds))
        # A wrong attribute: the uploader misnamed the colour (commoner) or the shape.
        while (colour, shape) in kinds:
            if rng.random() < 0.6:
                colour = rng.choice(list(COLOURS))
            else:
                shape = rng.choice(SHAPES)
        text = _alt_for_kind(colour, shape, rng)
    if rng.random() < 0.05:
        text = text.upper()
    return text


# --------------------------------------------------------------------------------------
# Human captions
# --------------------------------------------------------------------------------------

_SHORT_TEMPLATES = (
    ("{L}.", 3.0), ("{L} on {B}.", 2.0), ("A picture of {L}.", 1.0), ("An image with {L}.", 1.0),
    ("There {be} {L}.", 1.0), ("{L} against {B}.", 1.0), ("Just {L}.", 0.5),
    ("Simple shapes: {L}.", 0.5), ("{L}, nothing else.", 0.5), ("I see {L}.", 0.5),
    ("A drawing of {L}.", 0.7), ("Shows {L}.", 0.3), ("{L} on a plain background.", 0.7),
    ("A photo of {L}.", 0.5), ("{L} drawn on {B}.", 0.5),
)  # fmt: skip


def short_caption(scene: Scene, rng: random.Random) -> str:
    """A SHORT human caption: one short sentence naming every kind with its count."""
    groups = _groups(scene)
    rng.shuffle(groups)
    phrases = [
        _noun_phrase(colour, shape, len(cells), rng, digits_p=0.05)
        for (colour, shape), cells in groups
    ]
    # Positions are rare in short captions: only for a lone object, 10% of the time.
    if len(groups) == 1 and len(groups[0][1]) == 1 and rng.random() < 0.1:
        phrases[0] += " " + rng.choice(POSITION_PHRASES[groups[0][1][0]])
    if len(phrases) == 2 and rng.random() < 0.3:
        listed = f"{phrases[0]} {rng.choice(['next to', 'beside', 'plus', 'with'])} {phrases[1]}"
    else:
        listed = _join(phrases, rng)
    template = _weighted(rng, list(_SHORT_TEMPLATES))
    be = "are" if len(groups[0][1]) > 1 else "is"
    text = template.format(L=listed, B=_background_phrase(scene, rng), be=be)
    return _cap(text)


def _positions_list(cells: list[Cell], rng: random.Random) -> str:
    return _join([rng.choice(POSITION_PHRASES[c]) for c in cells], rng)


def _group_np(kind: Kind, cells: list[Cell], rng: random.Random) -> str:
    """A noun phrase with positions: 'two blue squares at the bottom and on the right'."""
    colour, shape = kind
    np_ = _noun_phrase(colour, shape, len(cells), rng)
    if len(cells) == 1:
        return f"{np_} {rng.choice(POSITION_PHRASES[cells[0]])}"
    style = rng.random()
    if style < 0.5:
        return f"{np_} {_positions_list(cells, rng)}"
    if style < 0.75:
        ones = [f"one {rng.choice(POSITION_PHRASES[c])}" for c in cells]
        return f"{np_}, {_join(ones, rng)}"
    return f"{np_} ({_join([rng.choice(BARE_CELLS[c]) for c in cells], rng)})"


def _group_clause(kind: Kind, cells: list[Cell], rng: random.Random) -> str:
    """A clause: 'a red circle sits in the top left', 'at the bottom there is a blue square'."""
    colour, shape = kind
    np_ = _noun_phrase(colour, shape, len(cells), rng)
    if len(cells) == 1:
        position = rng.choice(POSITION_PHRASES[cells[0]])
        if rng.random() < 0.35:
            verb = rng.choice(["there is", "sits", "is", "you can see", "we see"])
            return f"{position} {verb} {np_}"
        verb = rng.choice(["sits", "is", "appears", "is placed", "is drawn", "can be seen"])
        return f"{np_} {verb} {position}"
    verb = rng.choice(["are", "sit", "appear", "are placed", "are drawn", "can be seen"])
    return f"{np_} {verb} {_positions_list(cells, rng)}"


def _long_candidate(scene: Scene, rng: random.Random) -> str:
    groups = _groups(scene)
    order = rng.random()
    if order < 0.3:
        rng.shuffle(groups)
    elif order < 0.45:
        groups.sort(key=lambda g: -len(g[1]))
    background = _background_phrase(scene, rng)
    bg_words = _background_words(scene.background, rng)
    be = "are" if len(groups[0][1]) > 1 else "is"
    template = rng.randrange(9)
    if template == 0:
        nps = [_group_np(k, c, rng) for k, c in groups]
        return _cap(f"there {be} {_join(nps, rng)}, on {background}.")
    if template == 1:
        nps = [_group_np(k, c, rng) for k, c in groups]
        lead = rng.choice(["an image of", "a picture showing", "a simple drawing of"])
        tail = rng.choice(["all on", "drawn on", "set against", "on"])
        return _cap(f"{lead} {_join(nps, rng)}, {tail} {background}.")
    if template == 2:
        clauses = [_group_clause(k, c, rng) for k, c in groups]
        return _cap(f"on {background}, {_join(clauses, rng)}.")
    if template == 3 and len(groups) > 1:
        first = _group_clause(*groups[0], rng)
        rest = [_group_clause(k, c, rng) for k, c in groups[1:]]
        return _cap(f"{first}.") + " " + _cap(f"{_join(rest, rng)}, all on {background}.")
    if template == 4:
        nps = [_group_np(k, c, rng) for k, c in groups]
        return _cap(f"{_join(nps, rng)} on {background}.")
    if template == 5:
        nps = [_group_np(k, c, rng) for k, c in groups]
        noun = rng.choice(_BG_NOUNS)
        return _cap(f"the {bg_words} {noun} holds {_join(nps, rng)}.")
    if template == 6:
        clauses = [_group_clause(k, c, rng) for k, c in groups]
        noun = rng.choice(_BG_NOUNS)
        return _cap(f"{_join(clauses, rng)}; the {noun} is {bg_words}.")
    if template == 7 and len(groups) > 1:
        clauses = [_group_clause(k, c, rng) for k, c in groups]
        return _cap(f"{', '.join(clauses[:-1])}, while {clauses[-1]}, on {background}.")
    nps = [_group_np(k, c, rng) for k, c in groups]
    n = len(scene.objects)
    count = "one shape" if n == 1 else f"{_NUMBER_WORDS[n]} shapes"
    return _cap(f"{count} on {background}: {'; '.join(nps)}.")


def long_caption(scene: Scene, rng: random.Random) -> str:
    """A LONG human caption: 1-2 sentences naming every object's colour, shape, count and
    position, plus the background; at most 77 CLIP tokens for every miniworld scene."""
    for _ in range(20):
        text = _long_candidate(scene, rng)
        if count_pretokens(text) <= LONG_CAPTION_BUDGET:
            return text
    # Unreachable for scenes of <= 4 objects; a compact canonical fallback just in case.
    nps = [
        f"{_noun_phrase(c, s, len(cells), rng, adjective_p=0)} "
        + _join([CANONICAL_POSITIONS[cell] for cell in cells], rng)
        for (c, s), cells in _groups(scene)
    ]
    return _cap(", ".join(nps) + ".")


def terse_caption(scene: Scene, rng: random.Random) -> str:
    """The base captioner's web-pretraining style (PaLI-like): kinds only, lower case,
    no counts, no positions: 'red circle and blue square'."""
    if rng.random() < 0.03:
        return rng.choice(["shapes", "geometric shapes"])
    kinds = [f"{c} {s}" for c, s in sorted(scene.kinds())]
    rng.shuffle(kinds)
    if len(kinds) > 2 and rng.random() < 0.3:
        return ", ".join(kinds)
    return _join(kinds, rng)


def prompt_text(
    requirements: tuple[Requirement, ...] | list[Requirement],
    category: str,
    rng: random.Random | None = None,
) -> str:
    """A neutral, GenEval-like evaluation prompt: 'a red circle and a blue square',
    'three green triangles', 'a red circle in the top left and a blue triangle at the bottom'.

    The wording is canonical for every category (``category`` and ``rng`` do not change it)
    so that both caption variants are measured on the same text.
    """
    del category, rng
    parts = []
    for req in requirements:
        head = f"{req.colour} {_noun(req.shape, req.count)}"
        quantity = (
            _article(head) if req.count == 1 else _NUMBER_WORDS.get(req.count, str(req.count))
        )
        part = f"{quantity} {head}"
        if req.cell is not None:
            part += " " + CANONICAL_POSITIONS[tuple(req.cell)]  # type: ignore[index]
        parts.append(part)
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------------------
# Parsing and grading
# --------------------------------------------------------------------------------------


@dataclass
class Mention:
    """One object mention: ``count`` objects of a kind (None: unstated), at ``cells``."""

    colour: str
    shape: str
    count: int | None
    cells: list[Cell] = field(default_factory=list)

    @property
    def kind(self) -> Kind:
        return (self.colour, self.shape)


@dataclass
class ParsedCaption:
    mentions: list[Mention] = field(default_factory=list)

    def kinds(self) -> dict[Kind, int | None]:
        """Stated count per kind (mentions of one kind add up; None if any is unstated)."""
        totals: dict[Kind, int | None] = {}
        for m in self.mentions:
            if m.kind in totals:
                previous = totals[m.kind]
                totals[m.kind] = None if previous is None or m.count is None else previous + m.count
            else:
                totals[m.kind] = m.count
        return totals

    def placements(self) -> Counter[tuple[str, str, int, int]]:
        """Stated (colour, shape, row, col) placements."""
        return Counter((m.colour, m.shape, r, c) for m in self.mentions for r, c in m.cells)


def _tokens(text: str) -> list[str]:
    # Hyphens, underscores and slashes join words in file names and "top-left".
    return _TOKEN_RE.findall(re.sub(r"[-_/]", " ", text.lower()))


def _clauses(tokens: list[str]) -> list[list[str]]:
    clauses: list[list[str]] = [[]]
    for token in tokens:
        if token in _CLAUSE_PUNCT or token in _CLAUSE_WORDS:
            if clauses[-1]:
                clauses.append([])
        else:
            clauses[-1].append(token)
    return [c for c in clauses if c]


def _count_before(tokens: list[str], index: int, plural: bool) -> int | None:
    j = index - 1
    while j >= 0 and tokens[j] in _SKIPPABLE:
        j -= 1
    if j >= 0:
        word = tokens[j]
        if word in _COUNT_WORDS:
            return _COUNT_WORDS[word]
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word == "of" and j >= 1 and tokens[j - 1] in _OF_COUNTS:
            return _OF_COUNTS[tokens[j - 1]]
    # "red circle icon": a bare singular is one object; a bare plural is an unstated count.
    return None if plural else 1


def _cell_of(words: list[str]) -> Cell | None:
    row = next((_ROW_WORDS[w] for w in words if w in _ROW_WORDS), None)
    col = next((_COL_WORDS[w] for w in words if w in _COL_WORDS), None)
    if row is None and col is None and not any(w in _MID_WORDS for w in words):
        return None
    return (1 if row is None else row, 1 if col is None else col)


def _clause_events(clause: list[str]) -> list[tuple[str, object]]:
    """('mention', Mention) and ('cell', Cell) events of one clause, in order."""
    events: list[tuple[str, object]] = []
    i = 0
    while i < len(clause):
        token = clause[i]
        if token in COLOURS and i + 1 < len(clause) and clause[i + 1] in _SHAPE_FORMS:
            shape, plural = _SHAPE_FORMS[clause[i + 1]]
            events.append(("mention", Mention(token, shape, _count_before(clause, i, plural))))
            i += 2
            continue
        if token in _POSITION_WORDS:
            group = []
            while i < len(clause) and (
                clause[i] in _POSITION_WORDS or clause[i] in _POSITION_FILLERS
            ):
                group.append(clause[i])
                i += 1
            cell = _cell_of(group)
            if cell is not None:
                events.append(("cell", cell))
            continue
        i += 1
    return events


def parse_caption(text: str) -> ParsedCaption:
    """Read object mentions (colour, shape, count) and their cells out of any miniworld
    wording: alt text, short/long/terse captions, evaluation prompts, captioner outputs."""
    parsed = ParsedCaption()
    pending: list[Cell] = []  # cells stated before any mention ("in the top left, ...")
    for clause in _clauses(_tokens(text)):
        events = _clause_events(clause)
        mentions = [m for kind, m in events if kind == "mention"]
        if not mentions:
            cells = [c for kind, c in events if kind == "cell"]
            if parsed.mentions:
                parsed.mentions[-1].cells.extend(cells)  # type: ignore[arg-type]
            else:
                pending.extend(cells)  # type: ignore[arg-type]
            continue
        current: Mention | None = None
        leading: list[Cell] = list(pending)
        pending = []
        for kind, value in events:
            if kind == "mention":
                current = value  # type: ignore[assignment]
                parsed.mentions.append(current)  # type: ignore[arg-type]
                if leading:
                    current.cells.extend(leading)  # type: ignore[union-attr]
                    leading = []
            elif current is None:
                leading.append(value)  # type: ignore[arg-type]
            else:
                current.cells.append(value)  # type: ignore[arg-type]
    return parsed


def grade_caption(text: str, scene: Scene) -> dict:
    """Score a caption against the scene it describes.

    - ``objects``: Jaccard of stated kinds vs true kinds (misses and hallucinations cost);
    - ``counts``: kinds stated with the right count, over the same union;
    - ``positions``: matched (kind, cell) placements over max(true, stated) placements;
    - ``counts_exact``: kinds and counts all right; ``exact``: positions right as well.
    """
    parsed = parse_caption(text)
    stated = parsed.kinds()
    truth = scene.kinds()
    union = set(stated) | set(truth)
    common = set(stated) & set(truth)
    right_counts = sum(1 for k in common if stated[k] == truth[k])
    true_places = Counter((o.colour, o.shape, o.row, o.col) for o in scene.objects)
    said_places = parsed.placements()
    matched = sum((true_places & said_places).values())
    denominator = max(sum(true_places.values()), sum(said_places.values()))
    counts_exact = bool(union) and right_counts == len(union)
    return {
        "objects": len(common) / len(union) if union else 1.0,
        "counts": right_counts / len(union) if union else 1.0,
        "positions": matched / denominator if denominator else 1.0,
        "hallucinated": len(set(stated) - set(truth)),
        "counts_exact": counts_exact,
        "exact": counts_exact and said_places == true_places,
    }


def vocabulary_texts() -> list[str]:
    """Every word and phrase the miniworld's language uses, for tokenizer training."""
    texts: list[str] = []
    texts += list(COLOURS) + list(SHAPES) + list(PLURALS.values())
    texts += [w for w in _COUNT_WORDS if not w.isdigit()] + list(_OF_COUNTS) + list(ADJECTIVES)
    texts += sorted(_POSITION_WORDS | _POSITION_FILLERS | _CLAUSE_WORDS | _SKIPPABLE)
    texts += [p for phrases in POSITION_PHRASES.values() for p in phrases]
    texts += [p for phrases in BARE_CELLS.values() for p in phrases]
    texts += list(_BG_NOUNS) + list(_GENERIC_ALT)
    texts += [t for t, _ in _SHORT_TEMPLATES]
    texts += ["a pair of", "a couple of", "a trio of", "a single", "a lone", "shapes", "shape"]
    texts += [f"{c} {s}" for c in COLOURS for s in SHAPES]
    texts += [f"{c} {p}" for c in COLOURS for p in PLURALS.values()]
    return texts
