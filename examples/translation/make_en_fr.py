"""Writes en-fr.train.jsonl and en-fr.eval.jsonl: a small English -> French translation task from a
seeded grammar (articles with gender and elision, adjectives after the noun and agreeing with it,
plural nouns and verbs), so that text-to-text fine-tuning and BLEU can be tried offline.

    python examples/translation/make_en_fr.py   # writes the two files beside this script
"""

import json
import random
from pathlib import Path

NOUNS = {  # english: (french, gender, plural english, plural french)
    "cat": ("chat", "m", "cats", "chats"), "dog": ("chien", "m", "dogs", "chiens"),
    "house": ("maison", "f", "houses", "maisons"), "car": ("voiture", "f", "cars", "voitures"),
    "bird": ("oiseau", "m", "birds", "oiseaux"), "girl": ("fille", "f", "girls", "filles"),
    "boy": ("garçon", "m", "boys", "garçons"), "tree": ("arbre", "m", "trees", "arbres"),
    "flower": ("fleur", "f", "flowers", "fleurs"), "book": ("livre", "m", "books", "livres"),
    "apple": ("pomme", "f", "apples", "pommes"), "city": ("ville", "f", "cities", "villes"),
}
ADJECTIVES = {  # english: (masculine, feminine) - all placed after the noun in French
    "red": ("rouge", "rouge"), "green": ("vert", "verte"), "black": ("noir", "noire"),
    "white": ("blanc", "blanche"), "blue": ("bleu", "bleue"), "small": ("petit", "petite"),
}
VERBS = {  # english singular, english plural: (french singular, french plural)
    ("sees", "see"): ("voit", "voient"), ("likes", "like"): ("aime", "aiment"),
    ("eats", "eat"): ("mange", "mangent"), ("finds", "find"): ("trouve", "trouvent"),
    ("follows", "follow"): ("suit", "suivent"),
}


def noun_phrase(rng: random.Random) -> tuple[str, str, bool]:
    noun = rng.choice(sorted(NOUNS))
    fr, gender, en_pl, fr_pl = NOUNS[noun]
    plural = rng.random() < 0.3
    adj = rng.choice(sorted(ADJECTIVES)) if rng.random() < 0.6 else None
    en = "the " + (adj + " " if adj else "") + (en_pl if plural else noun)
    if plural:
        article = "les "
    elif fr[0] in "aeiouh":
        article = "l'"
    else:
        article = "le " if gender == "m" else "la "
    word = fr_pl if plural else fr
    if adj:
        form = ADJECTIVES[adj][gender == "f"]
        if plural and not form.endswith("s"):
            form += "s"
        word += " " + form
    return en, article + word, plural


def sentence(rng: random.Random) -> tuple[str, str]:
    subj_en, subj_fr, plural = noun_phrase(rng)
    (en_sg, en_pl), (fr_sg, fr_pl) = rng.choice(sorted(VERBS.items()))
    obj_en, obj_fr, _ = noun_phrase(rng)
    en = f"{subj_en} {en_pl if plural else en_sg} {obj_en}."
    fr = f"{subj_fr} {fr_pl if plural else fr_sg} {obj_fr}."
    return en[0].upper() + en[1:], fr[0].upper() + fr[1:]


def main() -> None:
    rng = random.Random(2026)
    pairs, seen = [], set()
    while len(pairs) < 2400:
        en, fr = sentence(rng)
        if en not in seen:
            seen.add(en)
            pairs.append({"input": en, "target": fr})
    here = Path(__file__).parent
    for name, rows in (("en-fr.train.jsonl", pairs[:2000]), ("en-fr.eval.jsonl", pairs[2000:])):
        with open(here / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
