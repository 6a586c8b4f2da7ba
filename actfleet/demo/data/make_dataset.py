"""Generate actfleet/demo/data/tiny_tales.jsonl, the small dataset `actfleet local` (and `make demo`) uses.

Every line is written by this script from the word lists below with a seeded RNG, so the dataset is the
project's own work, free to redistribute under the project's license, and reproducible byte for byte:

    python actfleet/demo/data/make_dataset.py            # rewrites actfleet/demo/data/tiny_tales.jsonl
    python actfleet/demo/data/make_dataset.py --check    # exits 1 if the committed file differs

Rows are JSON objects {"text": ...} (the `text` format of `actfleet prepare`): short tales, weather
reports, counting and arithmetic lines and small dialogues, from a sentence to a paragraph long, so the
extractor sees a spread of sequence lengths like a real corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "tiny_tales.jsonl"
ROWS = 2000
SEED = 20261122

NAMES = [
    "Ada",
    "Bo",
    "Cleo",
    "Dev",
    "Esme",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "Juno",
    "Kai",
    "Lena",
    "Milo",
    "Nia",
    "Otto",
    "Pia",
    "Quin",
    "Rosa",
    "Sami",
    "Tove",
    "Uma",
    "Vik",
    "Wren",
    "Yara",
    "Zed",
]
ANIMALS = ["cat", "dog", "fox", "owl", "hare", "goat", "duck", "mole", "crow", "frog", "bee", "seal"]
PLACES = [
    "the river",
    "the market",
    "a small garden",
    "the old mill",
    "the hill",
    "the library",
    "the harbour",
    "a quiet forest",
    "the bakery",
    "the station",
    "the beach",
    "the meadow",
]
THINGS = [
    "a red kite",
    "a lantern",
    "a map",
    "a loaf of bread",
    "a blue stone",
    "a kettle",
    "a wooden boat",
    "a letter",
    "a bell",
    "a basket of apples",
    "a compass",
    "a spool of thread",
]
FEELINGS = ["happy", "tired", "curious", "worried", "proud", "sleepy", "brave", "puzzled", "calm", "excited"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "bright and cold", "warm and humid"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
VERBS = ["found", "lost", "carried", "painted", "fixed", "shared", "hid", "counted", "followed", "opened"]
ENDINGS = [
    "and everyone went home for supper.",
    "and the day ended with a song.",
    "and nobody ever forgot it.",
    "so they decided to try again tomorrow.",
    "and that was the end of the trouble.",
    "and the stars came out one by one.",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def tale(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    animal, place, thing = r.choice(ANIMALS), r.choice(PLACES), r.choice(THINGS)
    parts = [f"Once, {a} the {animal} went to {place}."]
    for _ in range(r.randint(1, 6)):
        parts.append(
            r.choice(
                [
                    f"There {a} {r.choice(VERBS)} {r.choice(THINGS)}.",
                    f"{b} arrived and felt {r.choice(FEELINGS)}.",
                    f"The sky over {r.choice(PLACES)} was {r.choice(WEATHER)}.",
                    f'"Look at {thing}!" said {r.choice([a, b])}.',
                    f"They walked to {r.choice(PLACES)} together.",
                    f"{a} felt {r.choice(FEELINGS)} because {b} had {r.choice(VERBS)} {r.choice(THINGS)}.",
                ]
            )
        )
    parts.append(f"In the end {a} and {b} {r.choice(VERBS)} {thing}, {r.choice(ENDINGS)}")
    return " ".join(parts)


def weather(r: random.Random) -> str:
    day, place = r.choice(DAYS), r.choice(PLACES)
    lo = r.randint(-5, 20)
    hi = lo + r.randint(2, 12)
    return (
        f"Weather for {day} near {place}: {r.choice(WEATHER)} in the morning, {r.choice(WEATHER)} later. "
        f"Low {lo} degrees, high {hi} degrees. Wind from the {r.choice(['north', 'south', 'east', 'west'])}."
    )


def arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(1, 5)):
        x, y = r.randint(0, 99), r.randint(0, 99)
        op = r.choice(["+", "-", "*"])
        value = {"+": x + y, "-": x - y, "*": x * y}[op]
        lines.append(f"{x} {op} {y} = {value}.")
    return " ".join(lines)


def counting(r: random.Random) -> str:
    n = r.randint(2, 12)
    animal = r.choice(ANIMALS)
    return (
        f"{r.choice(NAMES)} counted the {animal}s: "
        + ", ".join(NUMBER_WORDS[1 : n + 1])
        + f". That makes {NUMBER_WORDS[n]} {animal}s near {r.choice(PLACES)}."
    )


def dialogue(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    turns = [f'{a}: "Have you seen {r.choice(THINGS)}?"', f'{b}: "I think it is near {r.choice(PLACES)}."']
    for _ in range(r.randint(0, 4)):
        speaker = r.choice([a, b])
        turns.append(
            r.choice(
                [
                    f'{speaker}: "I feel {r.choice(FEELINGS)} today."',
                    f'{speaker}: "The weather is {r.choice(WEATHER)}."',
                    f'{speaker}: "Let us go to {r.choice(PLACES)}."',
                    f'{speaker}: "Did the {r.choice(ANIMALS)} take it?"',
                ]
            )
        )
    return " ".join(turns)


KINDS = [(tale, 5), (weather, 2), (arithmetic, 2), (counting, 1), (dialogue, 2)]


def generate(rows: int = ROWS, seed: int = SEED) -> bytes:
    r = random.Random(seed)
    makers = [m for m, weight in KINDS for _ in range(weight)]
    lines = [json.dumps({"text": r.choice(makers)(r)}, ensure_ascii=False) for _ in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file differs from a fresh run")
    args = ap.parse_args(argv)
    data = generate()
    if args.check:
        same = OUTPUT.is_file() and OUTPUT.read_bytes() == data
        print(f"{OUTPUT.name}: {'up to date' if same else 'differs from the generator'}")
        return 0 if same else 1
    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT} ({ROWS} rows, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
