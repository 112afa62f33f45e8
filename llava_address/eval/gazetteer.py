"""A city's gazetteer (an address dataset's names, with sub-street geometry in UTM), for finding the address
a model's free-text answer names.

Built from a dataset folder (`records.parquet` + `sub_streets.geojson` + `dataset_info.json`, see
`clip_stage.core.schema`) with `Gazetteer.from_dataset(dir)`. `Gazetteer.parse(text)` returns the street,
cross streets, sub-street and neighbourhood an answer names; `llava_address.eval.scoring` turns that into
metrics.

Matching, in order:
1. Normalisation (`normalise`): Unicode diacritics folded (ä -> a), lower case, punctuation dropped,
   abbreviations expanded (St -> street, Ave -> avenue, Rd, Blvd, N/S/E/W, ...), ordinals spelled
   (3rd -> third).
2. A street name becomes a key (`street_key`): (stem, kind). The kind is the generic part, from an English
   word or a Finnish/Swedish compound suffix mapped to one class: -katu/-gatan/street, -tie/-vägen/road,
   -kuja/-gränden/lane, -polku/-stigen/path, -ranta/-stranden/shore, -tori/-torget/square, ... Directional
   prefixes (Pohjois-/Norra/North) map to one word, a trailing genitive -n/-s is dropped and spelling is
   folded (x -> ks, w -> v, double letters), so "Mannerheimintie", "Mannerheimvägen" and "Mannerheim Road"
   share the key ("mannerheim", "road") or keys within fuzzy reach. Bilingual names that share no stem
   (Kamppi / Kampen, Aleksanterinkatu / Alexandersgatan is reachable, Kluuvi / Gloet is not) can be given
   in an alias file.
3. Every 1-4 word span of the answer is looked up exactly, then fuzzily with rapidfuzz (ratio on the stem,
   a penalty when the kinds differ) above a threshold; overlapping matches keep the best.
4. The sub-street is the one consistent with the mentioned streets: its street mentioned (first, ideally)
   and as many of its cross streets as possible.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from clip_stage.core.schema import Address, DatasetPaths, read_info, read_records, read_sub_streets, render_address

# --- normalisation -----------------------------------------------------------------------------------

ABBREVIATIONS: dict[str, str] = {
    "st": "street", "str": "street", "ave": "avenue", "av": "avenue", "rd": "road", "blvd": "boulevard",
    "bd": "boulevard", "dr": "drive", "ln": "lane", "pl": "place", "sq": "square", "hwy": "highway",
    "pkwy": "parkway", "ct": "court", "ter": "terrace", "cres": "crescent", "aly": "alley", "esp": "esplanade",
    "n": "north", "s": "south", "e": "east", "w": "west", "ne": "northeast", "nw": "northwest",
    "se": "southeast", "sw": "southwest", "mt": "mount", "ft": "fort",
}

_ORDINAL_WORDS = ["zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                  "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
                  "seventeenth", "eighteenth", "nineteenth"]
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}
_TENS_ORD = {2: "twentieth", 3: "thirtieth", 4: "fortieth", 5: "fiftieth", 6: "sixtieth", 7: "seventieth",
             8: "eightieth", 9: "ninetieth"}
_ORDINAL_RE = re.compile(r"^(\d{1,2})(st|nd|rd|th)$")


class AliasFileError(ValueError):
    """An alias file that is not a JSON object of known names (a user error: one line, exit 2)."""


def ordinal_word(n: int) -> str:
    """1 -> 'first' ... 99 -> 'ninety ninth' (larger numbers stay digits)."""
    if n < 20:
        return _ORDINAL_WORDS[n]
    tens, unit = divmod(n, 10)
    return _TENS_ORD[tens] if unit == 0 else f"{_TENS[tens]} {_ORDINAL_WORDS[unit]}"


def fold_diacritics(text: str) -> str:
    text = text.replace("ß", "ss").replace("æ", "ae").replace("ø", "o").replace("Æ", "AE").replace("Ø", "O")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def tokens(text: str) -> list[str]:
    """Normalised words of `text`: folded, lower case, no punctuation, abbreviations and ordinals expanded."""
    text = fold_diacritics(text).lower().replace("&", " and ")
    text = re.sub(r"(?<=\w)['’](?=\w)", "", text)  # "Craig's" -> "craigs"
    out: list[str] = []
    for w in re.findall(r"[a-z0-9]+", text):
        m = _ORDINAL_RE.match(w)
        if m and 0 < int(m.group(1)) < 100:
            out.extend(ordinal_word(int(m.group(1))).split())
        else:
            out.append(ABBREVIATIONS.get(w, w))
    return out


def normalise(text: str) -> str:
    return " ".join(tokens(text))


# --- street keys ---------------------------------------------------------------------------------------

# Generic street words (standalone words and compound suffixes) -> one kind per concept across
# English, Finnish and Swedish (both the Swedish indefinite and definite forms).
KINDS: dict[str, Sequence[str]] = {
    "street": ("street", "katu", "gatan", "gata"),
    "road": ("road", "tie", "vagen", "vag", "way"),
    "lane": ("lane", "alley", "kuja", "granden", "grand"),
    "path": ("path", "polku", "stigen", "stig", "raitti"),
    "shore": ("shore", "ranta", "stranden", "strand", "quay", "laituri", "kajen", "kaj"),
    "square": ("square", "place", "plaza", "tori", "torget", "torg", "aukio", "platsen", "plats"),
    "park": ("park", "puisto", "parken"),
    "parkway": ("parkway", "puistotie", "parkvagen"),
    "bridge": ("bridge", "silta", "bron"),
    "hill": ("hill", "rinne", "maki", "backen", "backe"),
    "arc": ("arc", "crescent", "kaari", "bagen"),
    "yard": ("yard", "court", "piha", "garden", "gard"),
    "route": ("route", "vayla", "leden", "highway"),
    "gate": ("gate", "portti", "porten"),
    "esplanade": ("esplanade", "esplanadi", "esplanaden"),
    "boulevard": ("boulevard", "bulevardi", "boulevarden", "bulevarden"),
    "avenue": ("avenue", "avenyn", "aveny"),
    "drive": ("drive",),
    "terrace": ("terrace",),
}
# Finnish answers inflect the generic part ("Aleksanterinkadulla" = on Aleksanterinkatu): the common
# case forms (genitive, adessive, allative, ablative, inessive, illative) are suffixes of the same kind.
FINNISH_CASE_FORMS: dict[str, Sequence[str]] = {
    "street": ("kadun", "kadulla", "kadulle", "kadulta"),
    "road": ("tien", "tiella", "tielle", "tielta"),
    "lane": ("kujan", "kujalla", "kujalle", "kujalta"),
    "path": ("polun", "polulla", "polulle", "polulta"),
    "shore": ("rannan", "rannalla", "rannalle", "rannalta", "rannassa"),
    "square": ("torin", "torilla", "torille", "torilta", "aukion", "aukiolla", "aukiolle"),
    "park": ("puiston", "puistossa", "puistoon", "puistosta"),
    "parkway": ("puistotien", "puistotiella", "puistotielle"),
    "bridge": ("sillan", "sillalla", "sillalle"),
    "hill": ("rinteen", "rinteella", "maen", "maella", "maelle"),
    "arc": ("kaaren", "kaarella", "kaarelle"),
    "esplanade": ("esplanadin", "esplanadilla", "esplanadille"),
    "boulevard": ("bulevardin", "bulevardilla", "bulevardille"),
}
GENERIC_WORDS: dict[str, str] = {w: kind for kind, words in KINDS.items() for w in words}
# Compound suffixes, longest first so "puistotie" wins over "tie". English words are not suffixes.
GENERIC_WORDS.update({w: kind for kind, words in FINNISH_CASE_FORMS.items() for w in words})
_SUFFIXES = sorted([(w, k) for k, ws in KINDS.items() for w in ws[1:]]
                   + [(w, k) for k, ws in FINNISH_CASE_FORMS.items() for w in ws], key=lambda p: -len(p[0]))
# Finnish place-name case endings ("Kluuvissa" = in Kluuvi, "Kampista" = from Kamppi), tried when a
# neighbourhood name does not match as written.
PLACE_CASE_ENDINGS = ("ssa", "sta", "lla", "lta", "lle", "een", "iin", "aan", "n")

DIRECTIONS: dict[str, str] = {
    "pohjois": "north", "etela": "south", "ita": "east", "lansi": "west",
    "norra": "north", "sodra": "south", "ostra": "east", "vastra": "west",
    "north": "north", "south": "south", "east": "east", "west": "west",
}
_MIN_STEM_FOR_SUFFIX = 3


def fold_spelling(stem: str) -> str:
    """Spelling variants between Finnish, Swedish and English renderings of one name."""
    s = stem.replace("ph", "f").replace("th", "t").replace("x", "ks").replace("q", "k").replace("w", "v")
    s = s.replace("z", "ts").replace("c", "k")
    return re.sub(r"(.)\1+", r"\1", s)


def _split_compound(word: str) -> tuple[str, str]:
    """'mannerheimintie' -> ('mannerheimin', 'road'); a word without a generic suffix -> (word, '')."""
    if word in GENERIC_WORDS:
        return "", GENERIC_WORDS[word]
    for suffix, kind in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= _MIN_STEM_FOR_SUFFIX:
            return word[: -len(suffix)], kind
    return word, ""


@dataclass(frozen=True)
class StreetKey:
    stem: str
    """folded name without its generic part, e.g. 'mannerheim'"""
    kind: str
    """generic class ('street', 'road', ...) or '' when the name has none"""


def _whole(words: Sequence[str]) -> str:
    return fold_spelling("".join(words))


def street_key(name_or_tokens: str | Sequence[str]) -> StreetKey:
    """The comparison key of a street name (or of a span of normalised words)."""
    words = tokens(name_or_tokens) if isinstance(name_or_tokens, str) else list(name_or_tokens)
    if not words:
        return StreetKey("", "")
    words = list(words)
    kind = ""
    last_stem, kind = _split_compound(words[-1])
    words = words[:-1] + ([last_stem] if last_stem else [])
    # Directional prefixes, standalone ("Norra", "North") or compounded ("Pohjoisesplanadi").
    if words:
        first = words[0]
        if first in DIRECTIONS:
            words[0] = DIRECTIONS[first]
        else:
            for prefix, direction in DIRECTIONS.items():
                if first.startswith(prefix) and len(first) - len(prefix) >= _MIN_STEM_FOR_SUFFIX:
                    words[0:1] = [direction, first[len(prefix):]]
                    break
    if not words:  # the whole name is generic: "Esplanadi" -> stem 'esplanade', no kind
        return StreetKey(kind, "")
    last = words[-1]
    if len(last) > 4 and last[-1] in "ns" and last not in DIRECTIONS.values():
        words[-1] = last[:-1]  # Finnish genitive -n (Mannerheimin), Swedish -s (Alexanders)
    return StreetKey(" ".join(fold_spelling(w) for w in words), kind)


# --- gazetteer -----------------------------------------------------------------------------------------

STOPWORDS = frozenset(
    "a an the on in at of and or to is was it its this that photo picture image taken located near between "
    "by from with for corner intersection where which street view looks like be i think answer address city "
    "neighbourhood neighborhood district area part section segment along close next yes no not".split()
)
# Span words that may still start a name ("the Esplanade" is matched from "esplanade").
_MAX_SPAN = 4


@dataclass(frozen=True)
class SubStreet:
    id: str
    street: str
    cross_streets: tuple[str, ...]
    neighbourhood: str
    city: str
    geometry_utm: object | None = None
    """shapely geometry in the dataset's UTM zone (metres), or None"""


@dataclass(frozen=True)
class Mention:
    kind: str
    """'street' | 'neighbourhood' | 'city'"""
    name: str
    """canonical gazetteer name"""
    start: int
    end: int
    """word span [start, end) in the normalised answer"""
    score: float
    method: str
    """'exact' | 'fuzzy' | 'alias'"""


@dataclass
class ParsedAddress:
    street: str | None = None
    cross_streets: tuple[str, ...] = ()
    sub_street: str | None = None
    neighbourhood: str | None = None
    city: str | None = None
    mentioned_streets: tuple[str, ...] = ()
    mentions: list[Mention] = field(default_factory=list)
    method: str = "none"
    """'gazetteer' | 'embedding' | 'none'"""

    @property
    def empty(self) -> bool:
        return self.street is None and not self.mentioned_streets and self.neighbourhood is None


class Gazetteer:
    """Names and geometry of one city's address dataset, and the matcher for free-text answers."""

    def __init__(self, sub_streets: Iterable[SubStreet], aliases: dict[str, str] | None = None,
                 threshold: float = 85.0, kind_penalty: float = 10.0, missing_kind_penalty: float = 5.0):
        self.sub_streets: dict[str, SubStreet] = {}
        for s in sub_streets:
            self.sub_streets[s.id] = s
        if not self.sub_streets:
            raise ValueError("a gazetteer needs at least one sub-street")
        self.threshold = float(threshold)
        self.kind_penalty = float(kind_penalty)
        self.missing_kind_penalty = float(missing_kind_penalty)
        self.streets: list[str] = sorted({s.street for s in self.sub_streets.values()}
                                         | {c for s in self.sub_streets.values() for c in s.cross_streets})
        self.neighbourhoods: list[str] = sorted({s.neighbourhood for s in self.sub_streets.values() if s.neighbourhood})
        self.cities: list[str] = sorted({s.city for s in self.sub_streets.values() if s.city})
        self.by_street: dict[str, list[SubStreet]] = {}
        for s in self.sub_streets.values():
            self.by_street.setdefault(s.street, []).append(s)
        # Entries: (entity kind, canonical name, key); aliases add more keys for a canonical name.
        self._street_entries: list[tuple[str, StreetKey, str]] = [(n, street_key(n), "exact") for n in self.streets]
        self._place_entries: list[tuple[str, str, str, str]] = (
            [("neighbourhood", n, normalise(n), "exact") for n in self.neighbourhoods]
            + [("city", c, normalise(c), "exact") for c in self.cities])
        for alias, canonical in (aliases or {}).items():
            if canonical in self.streets:
                self._street_entries.append((canonical, street_key(alias), "alias"))
            elif canonical in self.neighbourhoods:
                self._place_entries.append(("neighbourhood", canonical, normalise(alias), "alias"))
            elif canonical in self.cities:
                self._place_entries.append(("city", canonical, normalise(alias), "alias"))
            else:
                raise AliasFileError(f"alias {alias!r} -> {canonical!r}: {canonical!r} is not a street, neighbourhood "
                                 f"or city of this gazetteer")
        self._street_exact: dict[StreetKey, list[tuple[str, str]]] = {}
        for name, key, how in self._street_entries:
            self._street_exact.setdefault(key, []).append((name, how))
        self._stems = [key.stem for _, key, _ in self._street_entries]
        # Whole folded names, for spans whose generic suffix is misspelt ("Aleksanterinktau").
        self._wholes = [_whole(tokens(n)) for n, _, _ in self._street_entries]
        self._place_norms = [norm for _, _, norm, _ in self._place_entries]
        self._geom_cache: dict[str, object] = {}

    # --- construction ---

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, aliases: dict[str, str] | str | Path | None = None,
                     **kwargs) -> "Gazetteer":
        """Reads records.parquet + sub_streets.geojson (+ dataset_info.json for the UTM zone)."""
        paths = DatasetPaths(dataset_dir)
        df = read_records(dataset_dir)
        features = read_sub_streets(dataset_dir) if paths.sub_streets.exists() else []
        epsg = None
        if paths.info.exists():
            epsg = read_info(dataset_dir).get("utm_epsg")
        to_utm = None
        if epsg is not None:
            from pyproj import Transformer
            from shapely.ops import transform

            tr = Transformer.from_crs(4326, int(epsg), always_xy=True)
            to_utm = lambda g: transform(tr.transform, g)  # noqa: E731
        subs: dict[str, SubStreet] = {}
        for f in features:
            geom = to_utm(f["geometry"]) if to_utm is not None and f.get("geometry") is not None else None
            subs[str(f["sub_street"])] = SubStreet(
                str(f["sub_street"]), str(f["street"]), tuple(str(c) for c in (f.get("cross_streets") or []) if c),
                str(f.get("neighbourhood") or ""), str(f.get("city") or ""), geom)
        for row in df.drop_duplicates("sub_street").itertuples(index=False):
            if str(row.sub_street) not in subs:
                cross = tuple(str(c) for c in (list(row.cross_streets) if row.cross_streets is not None else []) if c)
                subs[str(row.sub_street)] = SubStreet(str(row.sub_street), str(row.street), cross,
                                                      str(row.neighbourhood or ""), str(row.city or ""), None)
        if isinstance(aliases, (str, Path)):
            aliases = load_aliases(aliases)
        return cls(subs.values(), aliases=aliases, **kwargs)

    # --- geometry ---

    def street_geometry(self, street: str):
        """Union of a street's sub-street geometries (UTM), or None when it has none."""
        if street not in self._geom_cache:
            from shapely.ops import unary_union

            geoms = [s.geometry_utm for s in self.by_street.get(street, []) if s.geometry_utm is not None]
            self._geom_cache[street] = unary_union(geoms) if geoms else None
        return self._geom_cache[street]

    def geometry_of(self, parsed: ParsedAddress):
        """The predicted sub-street's geometry, else the predicted street's, else None."""
        if parsed.sub_street and self.sub_streets[parsed.sub_street].geometry_utm is not None:
            return self.sub_streets[parsed.sub_street].geometry_utm
        if parsed.street:
            return self.street_geometry(parsed.street)
        return None

    # --- matching ---

    def _score_street(self, span_key: StreetKey, key: StreetKey, stem_score: float) -> float:
        if span_key.kind and key.kind and span_key.kind != key.kind:
            return stem_score - self.kind_penalty
        if span_key.kind != key.kind:
            return stem_score - self.missing_kind_penalty
        return stem_score

    def _match_span_street(self, words: list[str]) -> tuple[str, float, str] | None:
        from rapidfuzz import fuzz, process

        key = street_key(words)
        if len(key.stem.replace(" ", "")) < 3:
            return None
        hits = self._street_exact.get(key)
        if hits:
            name, how = hits[0]
            return name, 100.0, "exact" if how == "exact" else "alias"
        best: tuple[str, float, str] | None = None
        # Short names only match exactly: 'anna' must not fuzzily become 'hanna'.
        if len(key.stem) < 5:
            return None
        cutoff = self.threshold - self.kind_penalty - 0.01
        for _, stem_score, idx in process.extract(key.stem, self._stems, scorer=fuzz.ratio, score_cutoff=max(cutoff, 0),
                                                  limit=10):
            name, entry_key, how = self._street_entries[idx]
            if len(entry_key.stem) < 5:
                continue
            s = self._score_street(key, entry_key, stem_score)
            if s >= self.threshold and (best is None or s > best[1]):
                best = (name, s, "fuzzy" if how == "exact" else "alias")
        if not key.kind:
            whole = _whole(words)
            if len(whole) >= 8:
                for _, s, idx in process.extract(whole, self._wholes, scorer=fuzz.ratio, score_cutoff=self.threshold,
                                                 limit=3):
                    name, _, how = self._street_entries[idx]
                    if best is None or s > best[1]:
                        best = (name, float(s), "fuzzy" if how == "exact" else "alias")
        return best

    def _match_span_place(self, words: list[str]) -> tuple[str, str, float, str] | None:
        from rapidfuzz import fuzz, process

        text = " ".join(words)
        if len(text) < 3:
            return None
        best = None
        forms = [(text, 0.0)] + [(text[:-len(e)], 1.0) for e in PLACE_CASE_ENDINGS
                                 if text.endswith(e) and len(text) - len(e) >= 4]
        for form, penalty in forms:
            for _, score, idx in process.extract(form, self._place_norms, scorer=fuzz.ratio,
                                                 score_cutoff=self.threshold + penalty, limit=5):
                kind, name, norm, how = self._place_entries[idx]
                if len(norm) < 5 and score < 100:
                    continue
                score = float(score) - penalty
                method = "alias" if how == "alias" else ("exact" if score >= 100 else "fuzzy")
                if best is None or score > best[2]:
                    best = (kind, name, score, method)
        return best

    def find_mentions(self, text: str) -> list[Mention]:
        """Street, neighbourhood and city names in `text`, in reading order, non-overlapping."""
        words = tokens(text)
        candidates: list[Mention] = []
        for i in range(len(words)):
            if words[i] in STOPWORDS and words[i] not in GENERIC_WORDS:
                continue
            for j in range(i + 1, min(i + _MAX_SPAN, len(words)) + 1):
                if words[j - 1] in STOPWORDS and words[j - 1] not in GENERIC_WORDS:
                    continue
                span = words[i:j]
                hit = self._match_span_street(span)
                if hit:
                    candidates.append(Mention("street", hit[0], i, j, hit[1], hit[2]))
                place = self._match_span_place(span)
                if place:
                    candidates.append(Mention(place[0], place[1], i, j, place[2], place[3]))
        # Best score first, then the longer span ("north esplanade" over "esplanade"), then reading order.
        candidates.sort(key=lambda m: (-m.score, -(m.end - m.start), m.start))
        taken = [False] * len(words)
        chosen: list[Mention] = []
        for m in candidates:
            if any(taken[m.start:m.end]):
                continue
            for k in range(m.start, m.end):
                taken[k] = True
            chosen.append(m)
        return sorted(chosen, key=lambda m: m.start)

    def resolve_sub_street(self, mentioned: Sequence[str], neighbourhood: str | None = None) -> SubStreet | None:
        """The sub-street the mentioned streets (in reading order) describe, or None if ambiguous.

        Its street must be mentioned; each of its cross streets mentioned counts, a first-mentioned street
        counts more, and the neighbourhood breaks ties. Equal best scores are ambiguous (None), except a
        street with a single sub-street, which is determined by its name alone.
        """
        if not mentioned:
            return None
        order = {name: i for i, name in reversed(list(enumerate(mentioned)))}
        scored: list[tuple[float, SubStreet]] = []
        for name in order:
            for s in self.by_street.get(name, []):
                cross_hits = sum(1 for c in s.cross_streets if c in order)
                score = 2.0 * cross_hits + (1.0 if order[name] == 0 else 0.0)
                score -= 0.5 * sum(1 for m in order if m != s.street and m not in s.cross_streets)
                if neighbourhood and s.neighbourhood == neighbourhood:
                    score += 0.75
                scored.append((score, s))
        if not scored:
            return None
        scored.sort(key=lambda p: -p[0])
        best_score, best = scored[0]
        if len(scored) > 1 and scored[1][0] == best_score:
            return None
        # A street with several sub-streets named without any cross street (or neighbourhood) is ambiguous.
        has_cross = any(c in order for c in best.cross_streets)
        nb_decides = neighbourhood is not None and best.neighbourhood == neighbourhood
        if len(self.by_street[best.street]) > 1 and not has_cross and not nb_decides:
            return None
        return best

    def parse(self, text: str) -> ParsedAddress:
        """Street, cross streets, sub-street, neighbourhood and city named in a free-text answer."""
        mentions = self.find_mentions(text)
        streets: list[str] = []
        for m in mentions:
            if m.kind == "street" and m.name not in streets:
                streets.append(m.name)
        nb = next((m.name for m in mentions if m.kind == "neighbourhood"), None)
        city = next((m.name for m in mentions if m.kind == "city"), None)
        sub = self.resolve_sub_street(streets, nb)
        if sub is not None:
            street = sub.street
        else:
            # The first mentioned street that is a main street of some sub-street, else the first one.
            street = next((s for s in streets if s in self.by_street), streets[0] if streets else None)
        cross = tuple(s for s in streets if s != street)
        parsed = ParsedAddress(street, cross, sub.id if sub else None, nb, city, tuple(streets), mentions,
                               "gazetteer" if mentions else "none")
        return parsed

    # --- embedding fallback ---

    def address_texts(self) -> tuple[list[str], list[str]]:
        """(sub-street ids, their 'full'-style address texts), the gallery for the embedding fallback."""
        ids = sorted(self.sub_streets)
        texts = [render_address(Address(s.street, s.id, s.cross_streets, s.neighbourhood, s.city), "full")
                 for s in (self.sub_streets[i] for i in ids)]
        return ids, texts


class EmbeddingMatcher:
    """Nearest sub-street address in a text-embedding space (e.g. AddressCLIP's text tower).

    `embed(texts) -> np.ndarray` of shape (len(texts), dim); rows are L2-normalised here. Used for answers
    the gazetteer cannot parse; a match below `min_similarity` is no match.
    """

    def __init__(self, gazetteer: Gazetteer, embed: Callable[[list[str]], np.ndarray], min_similarity: float = 0.5):
        self.gazetteer = gazetteer
        self.embed = embed
        self.min_similarity = float(min_similarity)
        self.ids, texts = gazetteer.address_texts()
        self.gallery = self._normed(embed(texts))
        if self.gallery.shape[0] != len(self.ids):
            raise ValueError(f"embed returned {self.gallery.shape[0]} rows for {len(self.ids)} texts")

    @staticmethod
    def _normed(x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"embed must return a 2-D array, got shape {x.shape}")
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def nearest(self, text: str) -> tuple[SubStreet, float] | None:
        if not text.strip():
            return None
        q = self._normed(self.embed([text]))[0]
        sims = self.gallery @ q
        i = int(np.argmax(sims))
        if sims[i] < self.min_similarity:
            return None
        return self.gazetteer.sub_streets[self.ids[i]], float(sims[i])

    def parse(self, text: str) -> ParsedAddress:
        hit = self.nearest(text)
        if hit is None:
            return ParsedAddress()
        s, _ = hit
        return ParsedAddress(s.street, s.cross_streets, s.id, s.neighbourhood or None, s.city or None,
                             (s.street, *s.cross_streets), [], "embedding")


def load_aliases(path: str | Path) -> dict[str, str]:
    """An alias file: JSON object {"alias name": "canonical gazetteer name"} (e.g. Swedish -> Finnish)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"alias file {path} not found") from None
    except json.JSONDecodeError as e:
        raise AliasFileError(f"alias file {path}: malformed JSON ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise AliasFileError(f"alias file {path}: expected a JSON object of alias -> canonical name strings")
    return obj
