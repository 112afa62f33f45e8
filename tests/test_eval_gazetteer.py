"""The gazetteer: multilingual street-name matching, sub-street resolution, aliases, UTM geometry."""

import json

import numpy as np
import pytest

from llava_address.eval.gazetteer import (EmbeddingMatcher, Gazetteer, SubStreet, load_aliases, normalise,
                                     street_key)


def _helsinki(**kwargs) -> Gazetteer:
    subs = [
        SubStreet("Mannerheimintie/0", "Mannerheimintie", ("Aleksanterinkatu", "Pohjoisesplanadi"), "Kluuvi", "Helsinki"),
        SubStreet("Mannerheimintie/1", "Mannerheimintie", ("Pohjoisesplanadi", "Bulevardi"), "Kamppi", "Helsinki"),
        SubStreet("Aleksanterinkatu/0", "Aleksanterinkatu", ("Mikonkatu", "Mannerheimintie"), "Kluuvi", "Helsinki"),
        SubStreet("Aleksanterintie/0", "Aleksanterintie", ("Mikonkatu",), "Kallio", "Helsinki"),
        SubStreet("Pohjoisesplanadi/0", "Pohjoisesplanadi", ("Mannerheimintie", "Mikonkatu"), "Kluuvi", "Helsinki"),
        SubStreet("Bulevardi/0", "Bulevardi", ("Mannerheimintie",), "Kamppi", "Helsinki"),
        SubStreet("Forbes Avenue/0", "Forbes Avenue", ("Fifth Avenue", "Craig Street"), "Oakland", "Pittsburgh"),
    ]
    return Gazetteer(subs, **kwargs)


def test_normalise_folds_case_diacritics_punctuation_abbreviations_and_ordinals():
    assert normalise("Mannerheimvägen, Töölö!") == "mannerheimvagen toolo"
    assert normalise("N. Craig St. & 5th Ave") == "north craig street and fifth avenue"
    assert normalise("21st St") == "twenty first street"


@pytest.mark.parametrize("a, b", [
    ("Mannerheimvägen", "Mannerheim Road"),
    ("Pohjoisesplanadi", "Norra Esplanaden"),
    ("Pohjoisesplanadi", "North Esplanade"),
    ("Bulevardi", "Boulevarden"),
    ("Fifth Avenue", "5th Ave."),
    ("Forbes Avenue", "FORBES AVE"),
])
def test_street_keys_of_equivalent_names_are_equal(a, b):
    assert street_key(a) == street_key(b)


@pytest.mark.parametrize("answer, street", [
    ("This photo was taken on Mannerheimintie.", "Mannerheimintie"),
    ("Mannerheimvägen, Helsinki", "Mannerheimintie"),          # Swedish name, suffix equivalence + fuzzy stem
    ("somewhere on Mannerheim Road", "Mannerheimintie"),      # English rendering
    ("Alexandersgatan", "Aleksanterinkatu"),                  # x/ks spelling, genitive -s/-n, gatan/katu
    ("Aleksanterintie", "Aleksanterintie"),                   # the kind tells apart two streets with one stem
    ("Aleksanterinkatu", "Aleksanterinkatu"),
    ("Norra Esplanaden", "Pohjoisesplanadi"),
    ("forbes ave. near craig st", "Forbes Avenue"),
    ("Aleksanterinktau", "Aleksanterinkatu"),                 # a typo within the fuzzy threshold
])
def test_parse_finds_the_street(answer, street):
    assert _helsinki().parse(answer).street == street


def test_finnish_case_forms_of_streets_and_places():
    g = _helsinki()
    p = g.parse("Kuva on otettu Aleksanterinkadulla Kluuvissa.")  # "on Aleksanterinkatu, in Kluuvi"
    assert (p.street, p.sub_street, p.neighbourhood) == ("Aleksanterinkatu", "Aleksanterinkatu/0", "Kluuvi")
    p = g.parse("Mannerheimintiellä Kampissa, Bulevardin kulmassa")  # consonant gradation: Kamppi -> Kampissa
    assert (p.street, p.cross_streets, p.sub_street, p.neighbourhood) == (
        "Mannerheimintie", ("Bulevardi",), "Mannerheimintie/1", "Kamppi")
    assert g.parse("Pohjoisesplanadilla").street == "Pohjoisesplanadi"


def test_fuzzy_threshold_and_unrelated_text():
    strict = _helsinki(threshold=99)
    assert strict.parse("Aleksanterinktau").street is None
    assert strict.parse("Aleksanterinkatu").street == "Aleksanterinkatu"
    p = _helsinki().parse("I think this is a nice residential area with trees.")
    assert p.empty and p.street is None and p.method == "none"


def test_sub_street_needs_cross_streets_and_uses_them():
    g = _helsinki()
    assert g.parse("Mannerheimintie").sub_street is None  # two sub-streets: ambiguous
    p = g.parse("Mannerheimintie between Pohjoisesplanadi and Bulevardi, Kamppi")
    assert (p.street, p.sub_street, p.neighbourhood) == ("Mannerheimintie", "Mannerheimintie/1", "Kamppi")
    assert set(p.cross_streets) == {"Pohjoisesplanadi", "Bulevardi"}
    assert g.parse("Mannerheimvägen near Alexandersgatan").sub_street == "Mannerheimintie/0"
    # The neighbourhood alone can decide between a street's sub-streets.
    assert g.parse("Mannerheimintie in Kluuvi").sub_street == "Mannerheimintie/0"
    # A street with a single sub-street is determined by its name.
    assert g.parse("Bulevardi").sub_street == "Bulevardi/0"
    # The street named first is the main street when both readings exist.
    p = g.parse("Aleksanterinkatu near Mannerheimintie")
    assert (p.street, p.sub_street) == ("Aleksanterinkatu", "Aleksanterinkatu/0")


def test_aliases_add_names_and_are_checked(tmp_path):
    assert _helsinki().parse("Kampen").neighbourhood is None
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps({"Kampen": "Kamppi", "Gloet": "Kluuvi", "Centralgatan": "Bulevardi"}), encoding="utf-8")
    g = _helsinki(aliases=load_aliases(path))
    p = g.parse("Centralgatan, Kampen")
    assert (p.street, p.neighbourhood) == ("Bulevardi", "Kamppi")
    with pytest.raises(ValueError, match="not a street, neighbourhood or city"):
        _helsinki(aliases={"Nowhere": "Atlantis"})
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_aliases(path)


def test_from_dataset_reads_names_and_utm_geometry(toy_dataset):
    g = Gazetteer.from_dataset(toy_dataset)
    assert len(g.sub_streets) == 9
    assert {"Aleksanterinkatu", "Mikonkatu", "Annankatu"} <= set(g.streets)  # cross streets are names too
    assert g.neighbourhoods == ["Kamppi", "Kluuvi"] and g.cities == ["Helsinki"]
    geom = g.sub_streets["Esplanadi/1"].geometry_utm
    assert geom.length == pytest.approx(200.0, abs=1.0)  # metres: the toy sub-streets are 200 m long
    assert g.street_geometry("Esplanadi").length == pytest.approx(600.0, abs=2.0)


def _trigram_embed(texts):
    """A stand-in text encoder: hashed character trigrams of the normalised text."""
    out = np.zeros((len(texts), 512))
    for i, t in enumerate(texts):
        t = f"  {normalise(t)}  "
        for k in range(len(t) - 2):
            out[i, hash(t[k:k + 3]) % 512] += 1
    return out


def test_embedding_matcher_returns_the_nearest_address_or_nothing(toy_dataset):
    g = Gazetteer.from_dataset(toy_dataset)
    m = EmbeddingMatcher(g, _trigram_embed, min_similarity=0.5)
    p = m.parse("Bulevardi between Fredrikinkatu and Annankatu, Kamppi, Helsinki")
    assert (p.sub_street, p.street, p.method) == ("Bulevardi/2", "Bulevardi", "embedding")
    assert m.parse("zzzz qqqq").sub_street is None
    with pytest.raises(ValueError, match="rows"):
        EmbeddingMatcher(g, lambda texts: np.ones((1, 4)))
