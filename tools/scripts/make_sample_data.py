#!/usr/bin/env python3
"""Writes mmoc's small, synthetic sample data sets (nothing is downloaded).

  data/sample/xsum_sample.jsonl  {"document": ..., "summary": ...} news-like records in the XSum shape
                                 (one-sentence summary of a short article), generated from templates with
                                 varied entities, places and numbers so that a model can learn to copy the
                                 salient facts into the summary.
  data/sample/tiny_tokens.jsonl  pre-tokenised {"input_ids", "labels"} examples for the tiny test model
                                 (vocab 101, bos=1, eos=2): a prompt of random tokens (labels -100) followed by
                                 the prompt reversed (labelled) and eos; a few lines omit "labels".

Deterministic: a fixed seed and Python's random.Random (whose integer draws are stable across Python 3
versions), stable key order and "\\n" line ends, so re-running reproduces the same bytes.
Usage: python3 tools/scripts/make_sample_data.py [--out data/sample] [--records 300]
"""
import argparse
import json
import os
import random

FIRST = ["Amira", "Bjorn", "Carmen", "Declan", "Elena", "Farid", "Greta", "Hamish", "Ines", "Jonas", "Keira",
         "Lukas", "Maya", "Niall", "Olga", "Pavel", "Rhian", "Sanjay", "Tilda", "Ulrich", "Vera", "Wyn"]
LAST = ["Abbott", "Brennan", "Castillo", "Dunmore", "Evans", "Fraser", "Gallagher", "Hughes", "Iqbal", "Jenkins",
        "Kowalski", "Lindqvist", "McBride", "Novak", "O'Neill", "Price", "Quinn", "Roberts", "Sinclair", "Thomas"]
CITIES = ["Aberdeen", "Belfast", "Cardiff", "Dundee", "Exeter", "Galway", "Harrogate", "Inverness", "Leeds",
          "Norwich", "Oxford", "Plymouth", "Swansea", "Truro", "York", "Bangor", "Derry", "Stirling"]
ORGS = ["the city council", "the local health board", "a regional bus company", "the university",
        "a family-run bakery", "the football club", "a wind energy firm", "the fire service", "the water company",
        "a software start-up", "the rail operator", "the national museum"]
THINGS = [("jobs", "job"), ("homes", "home"), ("buses", "bus"), ("beds", "bed"), ("classrooms", "classroom"),
          ("turbines", "turbine"), ("trains", "train"), ("nurses", "nurse"), ("parking spaces", "parking space")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ROLES = ["chief executive", "spokesperson", "council leader", "manager", "director", "chair"]
SPORTS_TEAMS = ["Rovers", "United", "Athletic", "City", "Wanderers", "Albion", "Town", "Rangers"]


def news_plan(r):
    city, org, (things, _thing) = r.choice(CITIES), r.choice(ORGS), r.choice(THINGS)
    n = r.randint(2, 950)
    person = f"{r.choice(FIRST)} {r.choice(LAST)}"
    role, day = r.choice(ROLES), r.choice(DAYS)
    cost = r.randint(2, 90)
    year = r.randint(2024, 2031)
    doc = [
        f"Plans for {n} new {things} in {city} have been announced by {org}.",
        f"The project, expected to cost about £{cost}m, was confirmed on {day} after months of talks.",
        f"{person}, the {role}, said the scheme would \"make a real difference to people in {city}\".",
        r.choice([f"Work is due to start next spring and finish by {year}.",
                  f"Some residents raised concerns about disruption during construction.",
                  f"Opposition members said the money could have been spent elsewhere."]),
        r.choice([f"A public consultation will run until the end of {r.choice(MONTHS)}.",
                  f"It is the largest investment of its kind in the area for a decade.",
                  f"Similar schemes have already been completed in {r.choice(CITIES)}."]),
    ]
    summ = f"{org[0].upper() + org[1:]} has announced plans for {n} new {things} in {city}, costing about £{cost}m."
    return doc, summ


def sport(r):
    home, away = r.sample(CITIES, 2)
    ht, at = r.choice(SPORTS_TEAMS), r.choice(SPORTS_TEAMS)
    hs, as_ = r.randint(0, 5), r.randint(0, 5)
    scorer = f"{r.choice(FIRST)} {r.choice(LAST)}"
    minute = r.randint(3, 90)
    crowd = r.randint(800, 30000)
    doc = [
        f"{home} {ht} and {away} {at} met on {r.choice(DAYS)} in front of {crowd} supporters.",
        f"{scorer} opened the scoring in the {minute}th minute with a low shot." if hs + as_ > 0
        else f"{scorer} came closest to a goal in the {minute}th minute but hit the post.",
        f"The final score was {home} {ht} {hs}, {away} {at} {as_}.",
        r.choice(["The visitors finished the match with ten men after a late red card.",
                  "Both managers praised the atmosphere inside the ground.",
                  "Heavy rain made conditions difficult for both sides."]),
    ]
    if hs > as_:
        summ = f"{home} {ht} beat {away} {at} {hs}-{as_}."
    elif hs < as_:
        summ = f"{away} {at} won {as_}-{hs} away at {home} {ht}."
    else:
        summ = f"{home} {ht} and {away} {at} drew {hs}-{as_}."
    return doc, summ


def weather(r):
    city = r.choice(CITIES)
    mm = r.randint(20, 180)
    homes = r.randint(10, 4000)
    hours = r.randint(6, 72)
    doc = [
        f"Heavy rain has caused flooding in parts of {city}, with {mm}mm falling in {hours} hours.",
        f"About {homes} homes lost power overnight, according to the network operator.",
        f"A yellow weather warning remains in place until {r.choice(DAYS)} evening.",
        r.choice(["Several roads were closed and drivers were urged not to travel.",
                  "Schools in the area opened late while crews cleared debris.",
                  "Volunteers handed out sandbags to residents near the river."]),
    ]
    summ = f"Flooding in {city} left about {homes} homes without power after {mm}mm of rain."
    return doc, summ


def court(r):
    person = f"{r.choice(FIRST)} {r.choice(LAST)}"
    age = r.randint(19, 78)
    city = r.choice(CITIES)
    fine = r.randint(1, 60) * 50
    offence = r.choice(["dangerous driving", "illegal dumping of waste", "stealing garden tools",
                        "breaching a noise order", "selling counterfeit tickets"])
    doc = [
        f"A {age}-year-old from {city} has been fined £{fine} for {offence}.",
        f"{person} admitted the offence at a hearing on {r.choice(DAYS)}.",
        r.choice([f"The court heard the incident happened in {r.choice(MONTHS)} last year.",
                  "The magistrate said it was a serious matter that put others at risk.",
                  "A lawyer for the defendant said their client was deeply sorry."]),
        f"{person} must also pay costs of £{r.randint(2, 20) * 10}.",
    ]
    summ = f"{person}, {age}, from {city}, has been fined £{fine} for {offence}."
    return doc, summ


KINDS = [news_plan, sport, weather, court]


def make_xsum(n, seed):
    r = random.Random(seed)
    out = []
    for i in range(n):
        doc, summ = KINDS[i % len(KINDS)](r)
        out.append({"id": f"sample-{i:04d}", "document": "\n".join(doc), "summary": summ})
    return out


def make_tiny(n, seed, vocab=101, bos=1, eos=2):
    r = random.Random(seed)
    out = []
    for i in range(n):
        k = r.randint(3, 14)
        prompt = [r.randint(3, vocab - 1) for _ in range(k)]
        # bos, prompt, separator token 3, reversed prompt, eos
        ids = [bos] + prompt + [3] + prompt[::-1] + [eos]
        labels = [-100] * (k + 2) + prompt[::-1] + [eos]
        rec = {"input_ids": ids}
        if i % 8 != 7:
            rec["labels"] = labels
        out.append(rec)
    return out


def write_jsonl(path, recs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False, separators=(", ", ": ")) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                  "data", "sample"))
    ap.add_argument("--records", type=int, default=300)
    ap.add_argument("--tiny", type=int, default=128)
    ap.add_argument("--seed", type=int, default=20240601)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    write_jsonl(os.path.join(a.out, "xsum_sample.jsonl"), make_xsum(a.records, a.seed))
    write_jsonl(os.path.join(a.out, "tiny_tokens.jsonl"), make_tiny(a.tiny, a.seed + 1))
    print(f"wrote {a.records} records to {os.path.normpath(a.out)}/xsum_sample.jsonl and {a.tiny} to tiny_tokens.jsonl")


if __name__ == "__main__":
    main()
