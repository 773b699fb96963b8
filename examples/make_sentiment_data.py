"""Writes examples/data/sentiment.jsonl: a small labelled sentiment task with negation, for the
fine-tuning comparison (examples/finetune_minilm.py). Deterministic (seeded); the file is kept
in the repo, this script says how it was made.

Each sentence rates a subject with an adjective, sometimes negated ("was not good", "was far
from terrible"): the label is the adjective's polarity, flipped by a negation. A frozen
sentence encoder maps "good" and "not good" close together, so the task rewards adapting the
encoder itself. Train and test use disjoint subjects, so a method cannot memorize them.
"""
from __future__ import annotations

import json
import os
import random

SUBJECTS_TRAIN = ["the movie", "the pizza", "the hotel room", "the concert", "the new phone", "the lecture",
                  "the customer service", "the novel", "the flight", "the coffee", "the laptop battery",
                  "the museum tour", "the app update", "the soup", "the football match", "the hiking trail"]
SUBJECTS_TEST = ["the restaurant", "the play", "the train ride", "the keyboard", "the documentary",
                 "the workshop"]
POSITIVE = ["good", "great", "excellent", "wonderful", "pleasant", "delightful", "impressive", "enjoyable"]
NEGATIVE = ["bad", "terrible", "awful", "disappointing", "boring", "dreadful", "unpleasant", "mediocre"]
NEGATIONS = ["not", "not at all", "far from", "hardly", "never"]
ADVERBS = ["", "really ", "quite ", "very ", "truly "]
FRAMES = ["{s} was {n}{a}{adj}.", "honestly, {s} was {n}{a}{adj}.", "I thought {s} was {n}{a}{adj}.",
          "everyone agreed {s} was {n}{a}{adj}."]


def sentence(rng: random.Random, subjects: list[str]) -> dict:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    neg = rng.choice(NEGATIONS) + " " if negated else ""
    adv = "" if negated else rng.choice(ADVERBS)
    text = rng.choice(FRAMES).format(s=rng.choice(subjects), n=neg, a=adv, adj=adj)
    return {"text": text[0].upper() + text[1:], "label": int(positive != negated)}


def main() -> None:
    rng = random.Random(20261128)
    rows = [dict(sentence(rng, SUBJECTS_TRAIN), split="train") for _ in range(640)]
    rows += [dict(sentence(rng, SUBJECTS_TEST), split="test") for _ in range(256)]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sentiment.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} rows ({sum(r['split'] == 'train' for r in rows)} train, "
          f"{sum(r['split'] == 'test' for r in rows)} test) to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
