"""Small tasks the project generates itself, so the demo and the tests need no downloaded data.

Each is seeded and short-answered, so exact match is a fair score, and different enough from the
others that a router can tell them apart.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .data import Example, Task

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Cuba": "Havana", "Mexico": "Mexico City", "Canada": "Ottawa",
    "Argentina": "Buenos Aires", "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad",
    "Turkey": "Ankara", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Czechia": "Prague",
    "Romania": "Bucharest", "Ukraine": "Kyiv", "Australia": "Canberra", "Brazil": "Brasilia",
    "Pakistan": "Islamabad", "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Saudi Arabia": "Riyadh",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Sri Lanka": "Colombo", "Mongolia": "Ulaanbaatar", "Afghanistan": "Kabul",
    "Switzerland": "Bern", "Croatia": "Zagreb", "Serbia": "Belgrade", "Bulgaria": "Sofia",
    "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Bolivia": "Sucre",
    "Zimbabwe": "Harare", "Uganda": "Kampala", "Senegal": "Dakar", "Angola": "Luanda",
}

WORDS = ("apple river stone cloud music garden silver window forest candle orange planet winter "
         "market bridge yellow pencil rocket summer castle dragon mirror ocean thunder violet").split()


def _capital(rng: random.Random, n: int) -> list[Example]:
    items = sorted(CAPITALS.items())
    rng.shuffle(items)
    return [Example("Give the capital city of the country. Answer with the city name only.", c, cap)
            for c, cap in (items * (n // len(items) + 1))[:n]]


def _add(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(Example("Add the two numbers. Answer with the sum only.", f"{a} + {b}", str(a + b)))
    return out


def _upper(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        out.append(Example("Rewrite the text in capital letters.", words, words.upper()))
    return out


def _acronym(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 4))
        out.append(Example("Make an acronym from the first letter of each word.", " ".join(words),
                           "".join(w[0] for w in words).upper()))
    return out


GENERATORS = {"capital": _capital, "add": _add, "upper": _upper, "acronym": _acronym}
DESCRIPTIONS = {
    "capital": "Name the capital city of a country.",
    "add": "Add two two-digit numbers.",
    "upper": "Rewrite words in capital letters.",
    "acronym": "Make an acronym from the first letters of words.",
}


def make_task(name: str, n: int = 200, seed: int = 0) -> Task:
    """A generated task by name (see GENERATORS); deterministic for (name, n, seed)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generated task {name!r}; have {sorted(GENERATORS)}")
    examples = GENERATORS[name](random.Random(f"{name}-{seed}"), n)
    for i, ex in enumerate(examples):
        ex.id = f"{name}-{i}"
    return Task(name=name, description=DESCRIPTIONS[name], examples=examples, format="jsonl")


def write_jsonl(task: Task, path: str | Path) -> Path:
    """Write a task as `{instruction, input, output}` JSON lines (the format `modulora train` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in task.examples:
            f.write(json.dumps({"instruction": ex.instruction, "input": ex.input, "output": ex.output}) + "\n")
    return path
