#!/usr/bin/env python3
"""Generate lowvram_ft's shipped sample data set (Multilingual-Thinking schema).

Every row is built from this file's own parameterised templates: a question in English, a short
reasoning trace in the row's reasoning language (English, French, German, Spanish, Italian or
Japanese), and an English final answer. Numbers are computed here (arithmetic, unit conversions,
times, Python expressions evaluated with Python), so every stored `answer` is correct.

    python scripts/make_sample_data.py [--out-dir DIR]

writes DIR/sample_train.jsonl and DIR/sample_heldout.jsonl (default DIR: lowvram_ft/assets).
The output is deterministic: a fixed seed and a fixed row order, so re-running rewrites the files
byte for byte. Rows whose block index (row // 6) ends in 9 form the held-out part (10%, every
language and every task family); the rest is the training part.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SEED = 20250806
N_ROWS = 720
LANGS = ["English", "French", "German", "Spanish", "Italian", "Japanese"]
FAMILIES = ["arithmetic", "conversion", "scheduling", "advice", "code"]
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lowvram_ft" / "assets"
COMMA_DECIMAL = {"French", "German", "Spanish", "Italian"}

# Recurring connectives: each language's traces lean on these, so a small model can pick up the
# language from them. Templates below use {FIRST}, {THEN}, {SO}, {CHECK}, {FINALLY}.
CONN = {
    "English": {"FIRST": ["First, ", "First of all, "], "THEN": ["Then, ", "Next, "],
                "SO": ["So ", "Therefore, "], "CHECK": ["As a check, ", "To double-check, "],
                "FINALLY": ["Finally, "]},
    "French": {"FIRST": ["D'abord, ", "Tout d'abord, "], "THEN": ["Ensuite, ", "Puis "],
               "SO": ["Donc ", "Ainsi, "], "CHECK": ["Pour vérifier, ", "En vérifiant, "],
               "FINALLY": ["Enfin, "]},
    "German": {"FIRST": ["Zuerst ", "Zunächst "], "THEN": ["Dann ", "Danach ", "Anschließend "],
               "SO": ["Also ", "Somit "], "CHECK": ["Zur Kontrolle: ", "Zur Probe: "],
               "FINALLY": ["Schließlich "]},
    "Spanish": {"FIRST": ["Primero, ", "En primer lugar, "], "THEN": ["Luego, ", "Después, "],
                "SO": ["Por lo tanto, ", "Así que "], "CHECK": ["Para comprobarlo, ", "Como comprobación, "],
                "FINALLY": ["Por último, "]},
    "Italian": {"FIRST": ["Innanzitutto, ", "Per prima cosa, "], "THEN": ["Poi, ", "In seguito, "],
                "SO": ["Quindi ", "Dunque "], "CHECK": ["Per verificare, ", "Come controllo, "],
                "FINALLY": ["Infine, "]},
    "Japanese": {"FIRST": ["まず、", "最初に、"], "THEN": ["次に、", "それから、"],
                 "SO": ["したがって、", "つまり、"], "CHECK": ["確認すると、", "念のため確かめると、"],
                 "FINALLY": ["最後に、"]},
}
OPENERS = {
    "English": ["Let me work through this step by step.", "I will solve this carefully, one step at a time."],
    "French": ["Je vais résoudre cela étape par étape.", "Procédons calmement, étape par étape."],
    "German": ["Ich gehe das Schritt für Schritt durch.", "Ich löse die Aufgabe der Reihe nach."],
    "Spanish": ["Voy a resolver esto paso a paso.", "Lo haré con calma, paso a paso."],
    "Italian": ["Risolvo il problema passo dopo passo.", "Procedo con ordine, un passo alla volta."],
    "Japanese": ["順を追って考えます。", "一つずつ確かめながら解きます。"],
}
CLOSERS = {
    "English": ["Now I can state the answer clearly.", "That gives me the final answer."],
    "French": ["Je peux maintenant donner la réponse.", "Cela me donne la réponse finale."],
    "German": ["Damit kann ich die Antwort klar formulieren.", "Das ist mein Ergebnis."],
    "Spanish": ["Ahora puedo dar la respuesta.", "Con esto tengo la respuesta final."],
    "Italian": ["Ora posso dare la risposta.", "Così ho la risposta finale."],
    "Japanese": ["これで答えをまとめられます。", "以上で答えが出ました。"],
}
DEVELOPERS = {
    "arithmetic": ["You are a patient math tutor. Explain each step briefly, then give the answer.",
                   "You are a helpful assistant who checks every calculation twice."],
    "conversion": ["You are a precise assistant for unit conversions. Always state the conversion factor.",
                   "You are a science teacher who uses exact factors and rounds sensibly."],
    "scheduling": ["You are a friendly planning assistant who helps people organise their day.",
                   "You are a punctual assistant. Work with 24-hour times."],
    "advice": ["You are a warm, practical coach who gives short, concrete advice.",
               "You are an encouraging assistant who keeps advice simple and actionable."],
    "code": ["You are a senior Python developer who answers questions concisely.",
             "You are a programming tutor. Explain what Python does, step by step."],
    "any": ["You are a helpful assistant.", "Answer accurately and keep the final answer short.",
            "You are a knowledgeable assistant. Think before you answer."],
}


# --------------------------------------------------------------------------- helpers
def dec(x, lang: str) -> str:
    """A number as written in `lang` (decimal comma for fr/de/es/it), trailing zeros dropped."""
    s = x if isinstance(x, str) else fmt(x)
    return s.replace(".", ",") if lang in COMMA_DECIMAL else s


def fmt(x, places: int = 2) -> str:
    """Round half-up to `places` decimals and drop trailing zeros ("26.10" -> "26.1", "4.00" -> "4")."""
    d = Decimal(str(x)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    s = f"{d:f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def cents(c: int) -> str:
    """Money from integer cents, always two decimals: 940 -> "9.40"."""
    return f"{c // 100}.{c % 100:02d}"


def hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def dur(minutes: int, lang: str) -> str:
    """A duration in the trace language: "1 h 25 min" / "1時間25分"."""
    h, m = divmod(minutes, 60)
    if lang == "Japanese":
        return (f"{h}時間" if h else "") + (f"{m}分" if m or not h else "")
    return " ".join(([f"{h} h"] if h else []) + ([f"{m} min"] if m or not h else []))


def dur_en(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    parts = ([f"{h} hour" + ("s" if h > 1 else "")] if h else []) + ([f"{m} minutes"] if m else [])
    return " and ".join(parts)


def pick(rng: random.Random, variants):
    return variants if isinstance(variants, str) else rng.choice(variants)


def render(rng: random.Random, lang: str, steps: list, params: dict) -> list[str]:
    """Fill each step (a string or a list of alternative phrasings) with connectives and values."""
    out = []
    for step in steps:
        conn = {k: rng.choice(v) for k, v in CONN[lang].items()}
        out.append(pick(rng, step).format(**conn, **params))
    return out


def trace(rng: random.Random, lang: str, body: list[str]) -> str:
    """Wrap the family's sentences with an optional opener and closer (3–6 sentences in all)."""
    sentences = list(body)
    short = 100 if lang == "Japanese" else 200  # Japanese packs the same content in fewer characters
    if rng.random() < 0.5 or sum(map(len, sentences)) < short:
        sentences.insert(0, rng.choice(OPENERS[lang]))
    if len(sentences) < 6 and (rng.random() < 0.5 or sum(map(len, sentences)) < short):
        sentences.append(rng.choice(CLOSERS[lang]))
    return ("" if lang == "Japanese" else " ").join(sentences)


# --------------------------------------------------------------------------- arithmetic
NAMES = ["Anna", "Marco", "Yuki", "Lena", "Pablo", "Chloé", "Tom", "Sofia", "Jonas", "Amara", "Luca", "Mei",
         "Omar", "Clara", "Felix", "Nadia", "Hugo", "Ines", "Ravi", "Elena"]
ITEMS = ["notebooks", "apples", "pens", "coffees", "bus tickets", "muffins", "postcards", "candles", "mangoes",
         "batteries", "plant pots", "sandwiches", "lemons", "stamps", "croissants", "tennis balls"]
GOODS = ["jacket", "pair of headphones", "bicycle helmet", "backpack", "desk lamp", "pair of boots", "coffee maker",
         "rain coat", "board game", "blender", "suitcase", "camera bag"]
VEHICLES = {"train": (60, 160), "bus": (30, 90), "cyclist": (12, 30), "delivery van": (30, 100), "ferry": (15, 45),
            "car": (40, 120), "motorbike": (40, 120), "tram": (15, 40)}  # plausible speeds in km/h

ARITH = {
    "shop": {
        "English": [["{FIRST}I find the total cost: {n} × {price} = {total} dollars.", "{FIRST}I multiply the number of items by the unit price: {n} × {price} = {total} dollars."],
                    ["{THEN}I subtract that from the {bill} dollars handed over: {bill} − {total} = {change}.", "{THEN}the change is the amount paid minus the total, {bill} − {total} = {change} dollars."],
                    "{CHECK}{total} + {change} = {bill}, which matches.",
                    ["{SO}the change is {change} dollars.", "{SO}{name} gets {change} dollars back."]],
        "French": [["{FIRST}je calcule le coût total : {n} × {price} = {total} dollars.", "{FIRST}je multiplie le nombre d'articles par le prix unitaire : {n} × {price} = {total} dollars."],
                   ["{THEN}je retire ce total des {bill} dollars donnés : {bill} − {total} = {change}.", "{THEN}la monnaie correspond à la somme versée moins le total, soit {bill} − {total} = {change} dollars."],
                   "{CHECK}{total} + {change} = {bill}, ce qui est cohérent.",
                   ["{SO}la monnaie rendue est de {change} dollars.", "{SO}{name} récupère {change} dollars."]],
        "German": [["{FIRST}berechne ich die Gesamtkosten: {n} × {price} = {total} Dollar.", "{FIRST}multipliziere ich die Anzahl mit dem Stückpreis: {n} × {price} = {total} Dollar."],
                   ["{THEN}ziehe ich diesen Betrag von den gezahlten {bill} Dollar ab: {bill} − {total} = {change}.", "{THEN}ergibt sich das Wechselgeld als {bill} − {total} = {change} Dollar."],
                   "{CHECK}{total} + {change} = {bill}, das passt.",
                   ["{SO}beträgt das Wechselgeld {change} Dollar.", "{SO}bekommt {name} {change} Dollar zurück."]],
        "Spanish": [["{FIRST}calculo el coste total: {n} × {price} = {total} dólares.", "{FIRST}multiplico el número de artículos por el precio unitario: {n} × {price} = {total} dólares."],
                    ["{THEN}resto ese total de los {bill} dólares entregados: {bill} − {total} = {change}.", "{THEN}el cambio es lo pagado menos el total, es decir, {bill} − {total} = {change} dólares."],
                    "{CHECK}{total} + {change} = {bill}, y cuadra.",
                    ["{SO}el cambio es de {change} dólares.", "{SO}{name} recibe {change} dólares de cambio."]],
        "Italian": [["{FIRST}calcolo il costo totale: {n} × {price} = {total} dollari.", "{FIRST}moltiplico il numero di articoli per il prezzo unitario: {n} × {price} = {total} dollari."],
                    ["{THEN}sottraggo questo totale dai {bill} dollari consegnati: {bill} − {total} = {change}.", "{THEN}il resto è la somma pagata meno il totale, cioè {bill} − {total} = {change} dollari."],
                    "{CHECK}{total} + {change} = {bill}, e i conti tornano.",
                    ["{SO}il resto è di {change} dollari.", "{SO}{name} riceve {change} dollari di resto."]],
        "Japanese": [["{FIRST}合計金額を計算します。{n} × {price} = {total}ドルです。", "{FIRST}個数に単価を掛けます。{n} × {price} = {total}ドルになります。"],
                     ["{THEN}支払った{bill}ドルから合計を引きます。{bill} − {total} = {change}です。", "{THEN}お釣りは支払額から合計を引いた額なので、{bill} − {total} = {change}ドルです。"],
                     "{CHECK}{total} + {change} = {bill}となり、合っています。",
                     ["{SO}お釣りは{change}ドルです。", "{SO}{name}さんは{change}ドルを受け取ります。"]],
    },
    "speed": {
        "English": [["{FIRST}I convert the time to hours: {h} h {m} min = {t} h.", "{FIRST}I write the time in hours: {m} minutes is {f} of an hour, so the time is {t} h."],
                    ["{THEN}I multiply speed by time: {v} × {t} = {d} km.", "{THEN}distance equals speed times time, {v} km/h × {t} h = {d} km."],
                    ["{SO}the distance covered is {d} km.", "{SO}it travels {d} km."]],
        "French": [["{FIRST}je convertis la durée en heures : {h} h {m} min = {t} h.", "{FIRST}j'exprime le temps en heures : {m} minutes font {f} heure, donc la durée est de {t} h."],
                   ["{THEN}je multiplie la vitesse par le temps : {v} × {t} = {d} km.", "{THEN}la distance est égale à la vitesse fois le temps, {v} km/h × {t} h = {d} km."],
                   ["{SO}la distance parcourue est de {d} km.", "{SO}le trajet couvre {d} km."]],
        "German": [["{FIRST}rechne ich die Zeit in Stunden um: {h} h {m} min = {t} h.", "{FIRST}drücke ich die Zeit in Stunden aus: {m} Minuten sind {f} Stunden, also {t} h."],
                   ["{THEN}multipliziere ich Geschwindigkeit und Zeit: {v} × {t} = {d} km.", "{THEN}gilt Strecke gleich Geschwindigkeit mal Zeit, {v} km/h × {t} h = {d} km."],
                   ["{SO}beträgt die Strecke {d} km.", "{SO}werden {d} km zurückgelegt."]],
        "Spanish": [["{FIRST}paso el tiempo a horas: {h} h {m} min = {t} h.", "{FIRST}expreso el tiempo en horas: {m} minutos son {f} de hora, así que son {t} h."],
                    ["{THEN}multiplico la velocidad por el tiempo: {v} × {t} = {d} km.", "{THEN}la distancia es la velocidad por el tiempo, {v} km/h × {t} h = {d} km."],
                    ["{SO}la distancia recorrida es de {d} km.", "{SO}recorre {d} km."]],
        "Italian": [["{FIRST}converto il tempo in ore: {h} h {m} min = {t} h.", "{FIRST}esprimo il tempo in ore: {m} minuti sono {f} di ora, quindi il tempo è {t} h."],
                    ["{THEN}moltiplico la velocità per il tempo: {v} × {t} = {d} km.", "{THEN}la distanza è velocità per tempo, {v} km/h × {t} h = {d} km."],
                    ["{SO}la distanza percorsa è di {d} km.", "{SO}percorre {d} km."]],
        "Japanese": [["{FIRST}時間を時間単位に直します。{h}時間{m}分は{t}時間です。", "{FIRST}{m}分は{f}時間なので、全体の時間は{t}時間になります。"],
                     ["{THEN}速さに時間を掛けます。{v} × {t} = {d} kmです。", "{THEN}距離は速さ×時間なので、{v} km/h × {t} h = {d} kmです。"],
                     ["{SO}進む距離は{d} kmです。", "{SO}{d} km進むことになります。"]],
    },
    "discount": {
        "English": [["{FIRST}I work out the discount: {pct}% of {p} is {p} × {pct} / 100 = {disc} dollars.", "{FIRST}the reduction is {pct}% of {p}, which is {disc} dollars."],
                    ["{THEN}I subtract it from the original price: {p} − {disc} = {sale}.", "{THEN}the new price is {p} − {disc} = {sale} dollars."],
                    "{CHECK}{p} × {rest} / 100 also gives {sale}.",
                    ["{SO}the sale price is {sale} dollars.", "{SO}it now costs {sale} dollars."]],
        "French": [["{FIRST}je calcule la remise : {pct} % de {p} font {p} × {pct} / 100 = {disc} dollars.", "{FIRST}la réduction vaut {pct} % de {p}, c'est-à-dire {disc} dollars."],
                   ["{THEN}je la soustrais du prix initial : {p} − {disc} = {sale}.", "{THEN}le nouveau prix est {p} − {disc} = {sale} dollars."],
                   "{CHECK}{p} × {rest} / 100 donne aussi {sale}.",
                   ["{SO}le prix soldé est de {sale} dollars.", "{SO}l'article coûte maintenant {sale} dollars."]],
        "German": [["{FIRST}berechne ich den Rabatt: {pct} % von {p} sind {p} × {pct} / 100 = {disc} Dollar.", "{FIRST}bestimme ich die Ermäßigung, nämlich {pct} % von {p}, also {disc} Dollar."],
                   ["{THEN}ziehe ich ihn vom ursprünglichen Preis ab: {p} − {disc} = {sale}.", "{THEN}ergibt sich der neue Preis als {p} − {disc} = {sale} Dollar."],
                   "{CHECK}{p} × {rest} / 100 ergibt ebenfalls {sale}.",
                   ["{SO}beträgt der reduzierte Preis {sale} Dollar.", "{SO}kostet der Artikel jetzt {sale} Dollar."]],
        "Spanish": [["{FIRST}calculo el descuento: el {pct} % de {p} es {p} × {pct} / 100 = {disc} dólares.", "{FIRST}la rebaja es el {pct} % de {p}, es decir, {disc} dólares."],
                    ["{THEN}lo resto del precio original: {p} − {disc} = {sale}.", "{THEN}el nuevo precio es {p} − {disc} = {sale} dólares."],
                    "{CHECK}{p} × {rest} / 100 también da {sale}.",
                    ["{SO}el precio rebajado es de {sale} dólares.", "{SO}ahora cuesta {sale} dólares."]],
        "Italian": [["{FIRST}calcolo lo sconto: il {pct}% di {p} è {p} × {pct} / 100 = {disc} dollari.", "{FIRST}la riduzione è il {pct}% di {p}, cioè {disc} dollari."],
                    ["{THEN}la sottraggo dal prezzo originale: {p} − {disc} = {sale}.", "{THEN}il nuovo prezzo è {p} − {disc} = {sale} dollari."],
                    "{CHECK}anche {p} × {rest} / 100 dà {sale}.",
                    ["{SO}il prezzo scontato è di {sale} dollari.", "{SO}ora costa {sale} dollari."]],
        "Japanese": [["{FIRST}割引額を求めます。{p}の{pct}%は{p} × {pct} / 100 = {disc}ドルです。", "{FIRST}値引きは{p}ドルの{pct}%なので、{disc}ドルです。"],
                     ["{THEN}元の値段から引きます。{p} − {disc} = {sale}です。", "{THEN}新しい値段は{p} − {disc} = {sale}ドルです。"],
                     "{CHECK}{p} × {rest} / 100 でも{sale}になります。",
                     ["{SO}セール価格は{sale}ドルです。", "{SO}今は{sale}ドルで買えます。"]],
    },
    "split": {
        "English": [["{FIRST}I add the tip: {tip}% of {b} is {tipamt}, so the total is {b} + {tipamt} = {total} dollars.", "{FIRST}the tip is {tip}% of {b}, that is {tipamt}, which makes {total} dollars in total."],
                    ["{THEN}I divide by the {n} people: {total} ÷ {n} {eq} {each}.", "{THEN}splitting {total} dollars among {n} people gives {total} ÷ {n} {eq} {each}."],
                    ["{SO}each person pays {each} dollars.", "{SO}everyone's share is {each} dollars."]],
        "French": [["{FIRST}j'ajoute le pourboire : {tip} % de {b} font {tipamt}, donc le total est {b} + {tipamt} = {total} dollars.", "{FIRST}le pourboire vaut {tip} % de {b}, soit {tipamt}, ce qui fait {total} dollars au total."],
                   ["{THEN}je divise par les {n} personnes : {total} ÷ {n} {eq} {each}.", "{THEN}partager {total} dollars entre {n} personnes donne {total} ÷ {n} {eq} {each}."],
                   ["{SO}chaque personne paie {each} dollars.", "{SO}la part de chacun est de {each} dollars."]],
        "German": [["{FIRST}addiere ich das Trinkgeld: {tip} % von {b} sind {tipamt}, also insgesamt {b} + {tipamt} = {total} Dollar.",
                    "{FIRST}berechne ich das Trinkgeld, {tip} % von {b}, also {tipamt}; zusammen sind das {total} Dollar."],
                   ["{THEN}teile ich durch die {n} Personen: {total} ÷ {n} {eq} {each}.", "{THEN}verteile ich {total} Dollar auf {n} Personen: {total} ÷ {n} {eq} {each}."],
                   ["{SO}zahlt jede Person {each} Dollar.", "{SO}beträgt der Anteil pro Person {each} Dollar."]],
        "Spanish": [["{FIRST}sumo la propina: el {tip} % de {b} es {tipamt}, así que el total es {b} + {tipamt} = {total} dólares.", "{FIRST}la propina es el {tip} % de {b}, o sea {tipamt}, lo que da {total} dólares en total."],
                    ["{THEN}divido entre las {n} personas: {total} ÷ {n} {eq} {each}.", "{THEN}repartir {total} dólares entre {n} personas da {total} ÷ {n} {eq} {each}."],
                    ["{SO}cada persona paga {each} dólares.", "{SO}a cada uno le toca pagar {each} dólares."]],
        "Italian": [["{FIRST}aggiungo la mancia: il {tip}% di {b} è {tipamt}, quindi il totale è {b} + {tipamt} = {total} dollari.", "{FIRST}la mancia è il {tip}% di {b}, cioè {tipamt}, per un totale di {total} dollari."],
                    ["{THEN}divido per le {n} persone: {total} ÷ {n} {eq} {each}.", "{THEN}dividendo {total} dollari fra {n} persone ottengo {total} ÷ {n} {eq} {each}."],
                    ["{SO}ogni persona paga {each} dollari.", "{SO}la quota di ciascuno è di {each} dollari."]],
        "Japanese": [["{FIRST}チップを足します。{b}の{tip}%は{tipamt}なので、合計は{b} + {tipamt} = {total}ドルです。", "{FIRST}チップは{b}ドルの{tip}%で{tipamt}ドル、合計で{total}ドルになります。"],
                     ["{THEN}{n}人で割ります。{total} ÷ {n} {eq} {each}です。", "{THEN}{total}ドルを{n}人で分けると、{total} ÷ {n} {eq} {each}になります。"],
                     ["{SO}一人あたり{each}ドルを払います。", "{SO}一人の負担は{each}ドルです。"]],
    },
}
FRACTIONS = {15: "0.25", 30: "0.5", 45: "0.75"}


def gen_arithmetic(rng: random.Random, lang: str) -> dict:
    kind = rng.choice(sorted(ARITH))
    if kind == "shop":
        name, item, n = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 9)
        price = rng.randrange(45, min(1300, 9900 // n), 5)
        total = n * price
        bill = rng.choice([b for b in (1000, 2000, 5000, 10000) if b > total])
        change = bill - total
        num = {"price": cents(price), "total": cents(total), "bill": str(bill // 100), "change": cents(change)}
        user = rng.choice([
            f"{name} buys {n} {item} at ${cents(price)} each and pays with a ${bill // 100} bill. How much change should {name} get?",
            f"If {n} {item} cost ${cents(price)} apiece and {name} hands over ${bill // 100}, how much change comes back?",
            f"{name} pays for {n} {item} priced at ${cents(price)} each using a ${bill // 100} note. What is the change?"])
        final = rng.choice([
            f"{name} should get ${cents(change)} in change: {n} × ${cents(price)} = ${cents(total)}, and ${bill // 100} − ${cents(total)} = ${cents(change)}.",
            f"The change is ${cents(change)} (the {item} cost ${cents(total)} in total, paid with ${bill // 100})."])
        params, answer = {"name": name, "n": n}, cents(change)
    elif kind == "speed":
        vehicle, h, m = rng.choice(sorted(VEHICLES)), rng.randint(1, 5), rng.choice([15, 30, 45])
        v = rng.randint(*VEHICLES[vehicle])
        t = Decimal(h) + Decimal(FRACTIONS[m])
        d = fmt(v * t)
        num = {"t": fmt(t), "f": FRACTIONS[m], "d": d}
        user = rng.choice([
            f"A {vehicle} travels at an average of {v} km/h for {h} hour{'s' if h > 1 else ''} and {m} minutes. How far does it go?",
            f"How many kilometres does a {vehicle} cover in {h} h {m} min at a steady {v} km/h?"])
        final = rng.choice([f"It covers {d} km ({v} km/h × {fmt(t)} h).",
                            f"The distance is {d} km: {h} h {m} min is {fmt(t)} h, and {v} × {fmt(t)} = {d}."])
        params, answer = {"v": v, "h": h, "m": m}, d
    elif kind == "discount":
        good, p, pct = rng.choice(GOODS), rng.randint(18, 480), rng.choice([10, 15, 20, 25, 30, 35, 40, 50])
        disc, sale = p * pct, p * (100 - pct)  # in cents
        num = {"disc": cents(disc), "sale": cents(sale)}
        user = rng.choice([f"A {good} costs ${p} and is on sale at {pct}% off. What is the sale price?",
                           f"What do I pay for a ${p} {good} with a {pct}% discount?",
                           f"The price of a {good} is ${p}. How much is it after a {pct}% reduction?"])
        final = rng.choice([f"The sale price is ${cents(sale)} (a discount of ${cents(disc)}).",
                            f"You pay ${cents(sale)}: {pct}% of ${p} is ${cents(disc)}, and ${p} − ${cents(disc)} = ${cents(sale)}."])
        params, answer = {"p": p, "pct": pct, "rest": 100 - pct}, cents(sale)
    else:  # split
        n, b, tip = rng.randint(2, 8), rng.randint(24, 360), rng.choice([10, 12, 15, 18, 20])
        tipamt = b * tip  # cents
        total = b * 100 + tipamt
        each = int((Decimal(total) / n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        num = {"tipamt": cents(tipamt), "total": cents(total), "each": cents(each)}
        user = rng.choice([f"{n} friends share a restaurant bill of ${b} and add {'an' if tip in (11, 18) else 'a'} {tip}% tip. How much does each person pay?",
                           f"A dinner for {n} costs ${b} before {'an' if tip in (11, 18) else 'a'} {tip}% tip. Split evenly, what is each share?"])
        final = rng.choice([f"Each person pays ${cents(each)}: the total with tip is ${cents(total)}, divided by {n}.",
                            f"About ${cents(each)} each (${b} + {tip}% tip = ${cents(total)}, split {n} ways)."])
        params, answer = {"n": n, "b": b, "tip": tip, "eq": "=" if total % n == 0 else "≈"}, cents(each)
    params.update({k: dec(v, lang) for k, v in num.items()})
    return {"task": f"arithmetic/{kind}", "user": user, "final": final, "answer": answer,
            "body": render(rng, lang, ARITH[kind][lang], params)}


# --------------------------------------------------------------------------- unit conversions
# unit key: (singular, plural, symbol)
UNITS = {"km": ("kilometre", "kilometres", "km"), "mi": ("mile", "miles", "mi"),
         "kg": ("kilogram", "kilograms", "kg"), "lb": ("pound", "pounds", "lb"),
         "L": ("litre", "litres", "L"), "gal": ("US gallon", "US gallons", "gal"),
         "cm": ("centimetre", "centimetres", "cm"), "in": ("inch", "inches", "in"),
         "m": ("metre", "metres", "m"), "ft": ("foot", "feet", "ft"),
         "g": ("gram", "grams", "g"), "oz": ("ounce", "ounces", "oz")}
# (big unit, small unit, exact factor: 1 big = factor small, value range for the question)
FACTORS = [("mi", "km", "1.609344", (3, 250)), ("lb", "kg", "0.45359237", (2, 180)),
           ("gal", "L", "3.785411784", (2, 120)), ("in", "cm", "2.54", (2, 90)),
           ("ft", "m", "0.3048", (3, 400)), ("oz", "g", "28.349523125", (2, 60))]
CONV = {
    "English": [["{FIRST}I recall the exact factor: 1 {big} = {f} {small}.", "{FIRST}the key fact is that 1 {big} equals {f} {small}."],
                {"mul": ["{THEN}I multiply: {x} × {f} {eq} {y_full}.", "{THEN}multiplying {x} {fu} by {f} gives {y_full} {tu}."],
                 "div": ["{THEN}I divide: {x} ÷ {f} {eq} {y_full}.", "{THEN}dividing {x} {fu} by {f} gives {y_full} {tu}."]},
                ["{SO}{x} {fu} is about {y} {tu}.", "{SO}rounded to two decimals, {x} {fu} ≈ {y} {tu}."], "{CHECK}going back, {y} {back} {f} ≈ {xb}, which matches {x} {fu}."],
    "French": [["{FIRST}je rappelle le facteur exact : 1 {big} = {f} {small}.", "{FIRST}le point clé est que 1 {big} vaut {f} {small}."],
               {"mul": ["{THEN}je multiplie : {x} × {f} {eq} {y_full}.", "{THEN}en multipliant {x} {fu} par {f}, on obtient {y_full} {tu}."],
                "div": ["{THEN}je divise : {x} ÷ {f} {eq} {y_full}.", "{THEN}en divisant {x} {fu} par {f}, on obtient {y_full} {tu}."]},
               ["{SO}{x} {fu} font environ {y} {tu}.", "{SO}arrondi à deux décimales, {x} {fu} ≈ {y} {tu}."], "{CHECK}en sens inverse, {y} {back} {f} ≈ {xb}, ce qui correspond bien à {x} {fu}."],
    "German": [["{FIRST}erinnere ich mich an den genauen Faktor: 1 {big} = {f} {small}.", "{FIRST}halte ich fest, dass 1 {big} genau {f} {small} entspricht."],
               {"mul": ["{THEN}multipliziere ich: {x} × {f} {eq} {y_full}.", "{THEN}ergibt {x} {fu} mal {f} rund {y_full} {tu}."],
                "div": ["{THEN}dividiere ich: {x} ÷ {f} {eq} {y_full}.", "{THEN}ergibt {x} {fu} geteilt durch {f} etwa {y_full} {tu}."]},
               ["{SO}sind {x} {fu} ungefähr {y} {tu}.", "{SO}entsprechen {x} {fu} gerundet {y} {tu}."], "{CHECK}{y} {back} {f} ≈ {xb}, das passt zu {x} {fu}."],
    "Spanish": [["{FIRST}recuerdo el factor exacto: 1 {big} = {f} {small}.", "{FIRST}el dato clave es que 1 {big} equivale a {f} {small}."],
                {"mul": ["{THEN}multiplico: {x} × {f} {eq} {y_full}.", "{THEN}al multiplicar {x} {fu} por {f} obtengo {y_full} {tu}."],
                 "div": ["{THEN}divido: {x} ÷ {f} {eq} {y_full}.", "{THEN}al dividir {x} {fu} entre {f} obtengo {y_full} {tu}."]},
                ["{SO}{x} {fu} son aproximadamente {y} {tu}.", "{SO}redondeando a dos decimales, {x} {fu} ≈ {y} {tu}."], "{CHECK}a la inversa, {y} {back} {f} ≈ {xb}, que coincide con {x} {fu}."],
    "Italian": [["{FIRST}ricordo il fattore esatto: 1 {big} = {f} {small}.", "{FIRST}il dato chiave è che 1 {big} equivale a {f} {small}."],
                {"mul": ["{THEN}moltiplico: {x} × {f} {eq} {y_full}.", "{THEN}moltiplicando {x} {fu} per {f} ottengo {y_full} {tu}."],
                 "div": ["{THEN}divido: {x} ÷ {f} {eq} {y_full}.", "{THEN}dividendo {x} {fu} per {f} ottengo {y_full} {tu}."]},
                ["{SO}{x} {fu} sono circa {y} {tu}.", "{SO}arrotondando a due decimali, {x} {fu} ≈ {y} {tu}."], "{CHECK}al contrario, {y} {back} {f} ≈ {xb}, che corrisponde a {x} {fu}."],
    "Japanese": [["{FIRST}正確な換算係数を確認します。1 {big} = {f} {small}です。", "{FIRST}1 {big}がちょうど{f} {small}であることを使います。"],
                 {"mul": ["{THEN}掛け算をします。{x} × {f} {eq} {y_full}です。", "{THEN}{x} {fu}に{f}を掛けると{y_full} {tu}になります。"],
                  "div": ["{THEN}割り算をします。{x} ÷ {f} {eq} {y_full}です。", "{THEN}{x} {fu}を{f}で割ると{y_full} {tu}になります。"]},
                 ["{SO}{x} {fu}は約{y} {tu}です。", "{SO}小数第2位までに丸めると、{x} {fu} ≈ {y} {tu}です。"], "{CHECK}逆に{y} {back} {f} ≈ {xb}となり、{x} {fu}と合っています。"],
}
TEMP = {
    "English": {"C": ["{FIRST}I use the formula °F = °C × 9/5 + 32.", "{FIRST}to go from Celsius to Fahrenheit I multiply by 9/5 and add 32."],
                "F": ["{FIRST}I use the formula °C = (°F − 32) × 5/9.", "{FIRST}to go from Fahrenheit to Celsius I subtract 32 and multiply by 5/9."],
                "stepC": "{THEN}{x} × 9/5 = {mid}, and {mid} + 32 = {y}.", "stepF": "{THEN}{x} − 32 = {mid}, and {mid} × 5/9 ≈ {y}.",
                "end": ["{SO}{x} {fu} is {y} {tu}.", "{SO}the temperature is {y} {tu}."]},
    "French": {"C": ["{FIRST}j'utilise la formule °F = °C × 9/5 + 32.", "{FIRST}pour passer des Celsius aux Fahrenheit, je multiplie par 9/5 et j'ajoute 32."],
               "F": ["{FIRST}j'utilise la formule °C = (°F − 32) × 5/9.", "{FIRST}pour passer des Fahrenheit aux Celsius, je retire 32 et je multiplie par 5/9."],
               "stepC": "{THEN}{x} × 9/5 = {mid}, et {mid} + 32 = {y}.", "stepF": "{THEN}{x} − 32 = {mid}, et {mid} × 5/9 ≈ {y}.",
               "end": ["{SO}{x} {fu} correspondent à {y} {tu}.", "{SO}la température est de {y} {tu}."]},
    "German": {"C": ["{FIRST}verwende ich die Formel °F = °C × 9/5 + 32.", "{FIRST}multipliziere ich für Fahrenheit mit 9/5 und addiere 32."],
               "F": ["{FIRST}verwende ich die Formel °C = (°F − 32) × 5/9.", "{FIRST}ziehe ich für Celsius 32 ab und multipliziere mit 5/9."],
               "stepC": "{THEN}rechne ich {x} × 9/5 = {mid} und {mid} + 32 = {y}.", "stepF": "{THEN}rechne ich {x} − 32 = {mid} und {mid} × 5/9 ≈ {y}.",
               "end": ["{SO}entsprechen {x} {fu} rund {y} {tu}.", "{SO}beträgt die Temperatur {y} {tu}."]},
    "Spanish": {"C": ["{FIRST}uso la fórmula °F = °C × 9/5 + 32.", "{FIRST}para pasar de Celsius a Fahrenheit multiplico por 9/5 y sumo 32."],
                "F": ["{FIRST}uso la fórmula °C = (°F − 32) × 5/9.", "{FIRST}para pasar de Fahrenheit a Celsius resto 32 y multiplico por 5/9."],
                "stepC": "{THEN}{x} × 9/5 = {mid}, y {mid} + 32 = {y}.", "stepF": "{THEN}{x} − 32 = {mid}, y {mid} × 5/9 ≈ {y}.",
                "end": ["{SO}{x} {fu} equivalen a {y} {tu}.", "{SO}la temperatura es de {y} {tu}."]},
    "Italian": {"C": ["{FIRST}uso la formula °F = °C × 9/5 + 32.", "{FIRST}per passare da Celsius a Fahrenheit moltiplico per 9/5 e aggiungo 32."],
                "F": ["{FIRST}uso la formula °C = (°F − 32) × 5/9.", "{FIRST}per passare da Fahrenheit a Celsius tolgo 32 e moltiplico per 5/9."],
                "stepC": "{THEN}{x} × 9/5 = {mid}, e {mid} + 32 = {y}.", "stepF": "{THEN}{x} − 32 = {mid}, e {mid} × 5/9 ≈ {y}.",
                "end": ["{SO}{x} {fu} corrispondono a {y} {tu}.", "{SO}la temperatura è di {y} {tu}."]},
    "Japanese": {"C": ["{FIRST}°F = °C × 9/5 + 32 という式を使います。", "{FIRST}摂氏から華氏にするには、9/5を掛けて32を足します。"],
                 "F": ["{FIRST}°C = (°F − 32) × 5/9 という式を使います。", "{FIRST}華氏から摂氏にするには、32を引いて5/9を掛けます。"],
                 "stepC": "{THEN}{x} × 9/5 = {mid}、{mid} + 32 = {y}です。", "stepF": "{THEN}{x} − 32 = {mid}、{mid} × 5/9 ≈ {y}です。",
                 "end": ["{SO}{x} {fu}は{y} {tu}です。", "{SO}温度は{y} {tu}になります。"]},
}


def gen_conversion(rng: random.Random, lang: str) -> dict:
    if rng.random() < 0.2:  # temperature
        if rng.random() < 0.5:
            x = rng.randint(-25, 45)
            mid = Decimal(x) * 9 / 5
            y = fmt(mid + 32, 1)
            fu, tu, fe, te, key = "°C", "°F", "degrees Celsius", "degrees Fahrenheit", "C"
        else:
            x = rng.randint(-10, 110)
            mid = Decimal(x - 32)
            y = fmt(mid * 5 / 9, 1)
            fu, tu, fe, te, key = "°F", "°C", "degrees Fahrenheit", "degrees Celsius", "F"
        user = rng.choice([f"Convert {x} {fe} to {te}.", f"What is {x} {fu} in {te}?",
                           f"The forecast says {x} {fu}. What is that in {te}?"])
        final = rng.choice([f"{x} {fu} is {y} {tu}.", f"It is {y} {tu} (using {'°F = °C × 9/5 + 32' if key == 'C' else '°C = (°F − 32) × 5/9'})."])
        t = TEMP[lang]
        steps = [t[key], t["step" + key], t["end"]]
        params = {"x": dec(str(x), lang), "mid": dec(fmt(mid, 2), lang), "y": dec(y, lang), "fu": fu, "tu": tu}
        return {"task": f"conversion/{'c_to_f' if key == 'C' else 'f_to_c'}", "user": user, "final": final,
                "answer": y, "body": render(rng, lang, steps, params)}
    big, small, f, (lo, hi) = rng.choice(FACTORS)
    forward = rng.random() < 0.5  # big -> small multiplies, small -> big divides
    src, dst = (big, small) if forward else (small, big)
    x = Decimal(rng.randint(lo * 2, hi * 2)) / 2 if rng.random() < 0.3 else Decimal(rng.randint(lo, hi))
    exact = x * Decimal(f) if forward else x / Decimal(f)
    y, y_full = fmt(exact, 2), fmt(exact, 4)
    xs = fmt(x)
    fe, te = UNITS[src][1], UNITS[dst][1]
    user = rng.choice([f"How many {te} are in {xs} {fe}?", f"Convert {xs} {fe} to {te}.",
                       f"What is {xs} {fe} in {te}?", f"I have {xs} {fe}. How much is that in {te}?"])
    final = rng.choice([f"{xs} {fe} is about {y} {te} (1 {UNITS[big][0]} = {f} {UNITS[small][1]}).",
                        f"About {y} {te}: {xs} {'×' if forward else '÷'} {f} = {y_full}, since 1 {UNITS[big][0]} = {f} {UNITS[small][1]}."])
    c = CONV[lang]
    steps = [c[0], c[1]["mul" if forward else "div"], c[2]]
    back = Decimal(y) / Decimal(f) if forward else Decimal(y) * Decimal(f)
    if abs(back - x) <= x / 500 and rng.random() < 0.6:  # the round trip lands within 0.2%: worth showing
        steps.insert(2, c[3])
    params = {"x": dec(xs, lang), "f": dec(f, lang), "y": dec(y, lang), "y_full": dec(y_full, lang), "eq": "=" if Decimal(y_full) == exact else "≈",
              "back": "÷" if forward else "×", "xb": dec(fmt(Decimal(y) / Decimal(f) if forward else Decimal(y) * Decimal(f)), lang),
              "big": UNITS[big][2], "small": UNITS[small][2], "fu": UNITS[src][2], "tu": UNITS[dst][2]}
    return {"task": f"conversion/{src}_to_{dst}", "user": user, "final": final, "answer": y,
            "body": render(rng, lang, steps, params)}


# --------------------------------------------------------------------------- scheduling
EVENTS = ["workshop", "team meeting", "film", "exam", "football match", "yoga class", "webinar", "rehearsal",
          "concert", "board meeting", "cooking class", "lecture"]
PLACES = ["the airport", "the station", "work", "the dentist", "a job interview", "the cinema", "school",
          "the stadium", "my friend's house", "the museum"]
ROUTINES = {"cooking": ("I start cooking at {s}: {a} minutes of preparation, {b} minutes in the oven and {c} minutes of resting. When is the meal ready?",
                        "the meal is ready"),
            "laundry": ("I start the laundry at {s}: a {a}-minute wash, {b} minutes of drying and {c} minutes of folding. When will I be done?",
                        "the laundry is done"),
            "bread": ("I begin baking bread at {s}: {a} minutes of kneading, {b} minutes of rising and {c} minutes of baking. When is the bread ready?",
                      "the bread is ready"),
            "painting": ("I start painting a room at {s}: {a} minutes of taping, {b} minutes of painting and {c} minutes of cleaning up. When will I finish?",
                         "the room is finished")}
SCHED = {
    "end": {
        "English": [["{FIRST}I add the hours: {start} + {h} h = {mid}.", "{FIRST}I move {h} h forward from {start}, which gives {mid}."],
                    ["{THEN}I add the {m} minutes: {mid} + {m} min = {end}.", "{THEN}{m} more minutes after {mid} brings me to {end}."],
                    ["{SO}it ends at {end}.", "{SO}the end time is {end}."]],
        "French": [["{FIRST}j'ajoute les heures : {start} + {h} h = {mid}.", "{FIRST}j'avance de {h} h à partir de {start}, ce qui donne {mid}."],
                   ["{THEN}j'ajoute les {m} minutes : {mid} + {m} min = {end}.", "{THEN}{m} minutes de plus après {mid} mènent à {end}."],
                   ["{SO}cela se termine à {end}.", "{SO}l'heure de fin est {end}."]],
        "German": [["{FIRST}addiere ich die Stunden: {start} + {h} h = {mid}.", "{FIRST}gehe ich von {start} aus {h} h weiter und lande bei {mid}."],
                   ["{THEN}addiere ich die {m} Minuten: {mid} + {m} min = {end}.", "{THEN}komme ich mit {m} weiteren Minuten nach {mid} auf {end}."],
                   ["{SO}endet es um {end}.", "{SO}ist das Ende um {end}."]],
        "Spanish": [["{FIRST}sumo las horas: {start} + {h} h = {mid}.", "{FIRST}avanzo {h} h desde las {start}, lo que da {mid}."],
                    ["{THEN}sumo los {m} minutos: {mid} + {m} min = {end}.", "{THEN}{m} minutos más después de {mid} llevan a {end}."],
                    ["{SO}termina a las {end}.", "{SO}la hora de fin es {end}."]],
        "Italian": [["{FIRST}aggiungo le ore: {start} + {h} h = {mid}.", "{FIRST}vado avanti di {h} h a partire dalle {start} e arrivo alle {mid}."],
                    ["{THEN}aggiungo i {m} minuti: {mid} + {m} min = {end}.", "{THEN}altri {m} minuti dopo le {mid} portano alle {end}."],
                    ["{SO}finisce alle {end}.", "{SO}l'orario di fine è {end}."]],
        "Japanese": [["{FIRST}時間を足します。{start} + {h}時間 = {mid}です。", "{FIRST}{start}から{h}時間進めると{mid}になります。"],
                     ["{THEN}{m}分を足します。{mid} + {m}分 = {end}です。", "{THEN}{mid}からさらに{m}分進めると{end}です。"],
                     ["{SO}終わるのは{end}です。", "{SO}終了時刻は{end}になります。"]],
    },
    "leave": {
        "English": [["{FIRST}I add the travel time and the buffer: {d} + {b} = {tot} minutes.", "{FIRST}the total time I need is {d} min of travel plus {b} min spare, {tot} minutes."],
                    ["{THEN}I go back {totd} from {arrive}, which gives {leave}.", "{THEN}{arrive} minus {totd} is {leave}."],
                    ["{SO}the latest time to leave is {leave}.", "{SO}I should leave at {leave}."]],
        "French": [["{FIRST}j'additionne le trajet et la marge : {d} + {b} = {tot} minutes.", "{FIRST}il me faut {d} min de trajet plus {b} min de marge, soit {tot} minutes."],
                   ["{THEN}je recule de {totd} à partir de {arrive}, ce qui donne {leave}.", "{THEN}{arrive} moins {totd} donne {leave}."],
                   ["{SO}il faut partir au plus tard à {leave}.", "{SO}le départ doit avoir lieu à {leave}."]],
        "German": [["{FIRST}addiere ich Fahrzeit und Puffer: {d} + {b} = {tot} Minuten.", "{FIRST}brauche ich {d} min Fahrt und {b} min Reserve, zusammen {tot} Minuten."],
                   ["{THEN}gehe ich von {arrive} um {totd} zurück und erhalte {leave}.", "{THEN}ergibt {arrive} minus {totd} genau {leave}."],
                   ["{SO}muss ich spätestens um {leave} losgehen.", "{SO}ist {leave} die späteste Abfahrtszeit."]],
        "Spanish": [["{FIRST}sumo el trayecto y el margen: {d} + {b} = {tot} minutos.", "{FIRST}necesito {d} min de viaje más {b} min de margen, en total {tot} minutos."],
                    ["{THEN}retrocedo {totd} desde las {arrive}, lo que da {leave}.", "{THEN}{arrive} menos {totd} da {leave}."],
                    ["{SO}hay que salir a más tardar a las {leave}.", "{SO}la hora de salida es {leave}."]],
        "Italian": [["{FIRST}sommo il viaggio e il margine: {d} + {b} = {tot} minuti.", "{FIRST}mi servono {d} min di viaggio più {b} min di margine, in tutto {tot} minuti."],
                    ["{THEN}torno indietro di {totd} dalle {arrive} e ottengo {leave}.", "{THEN}{arrive} meno {totd} dà {leave}."],
                    ["{SO}bisogna partire al più tardi alle {leave}.", "{SO}l'orario di partenza è {leave}."]],
        "Japanese": [["{FIRST}移動時間と余裕を足します。{d} + {b} = {tot}分です。", "{FIRST}移動に{d}分、余裕に{b}分なので、合わせて{tot}分必要です。"],
                     ["{THEN}{arrive}から{totd}戻すと{leave}になります。", "{THEN}{arrive}から{totd}を引くと{leave}です。"],
                     ["{SO}遅くとも{leave}に出発すればよいです。", "{SO}出発時刻は{leave}です。"]],
    },
    "chain": {
        "English": [["{FIRST}I add up the three steps: {a} + {b} + {c} = {tot} minutes.", "{FIRST}the steps take {a}, {b} and {c} minutes, {tot} minutes in all."],
                    ["{THEN}{tot} minutes is {totd}, and {start} + {totd} = {end}.", "{THEN}adding {totd} to {start} gives {end}."],
                    ["{SO}everything is done at {end}.", "{SO}the finishing time is {end}."]],
        "French": [["{FIRST}j'additionne les trois étapes : {a} + {b} + {c} = {tot} minutes.", "{FIRST}les étapes durent {a}, {b} et {c} minutes, soit {tot} minutes en tout."],
                   ["{THEN}{tot} minutes font {totd}, et {start} + {totd} = {end}.", "{THEN}en ajoutant {totd} à {start}, on arrive à {end}."],
                   ["{SO}tout est terminé à {end}.", "{SO}l'heure de fin est {end}."]],
        "German": [["{FIRST}addiere ich die drei Schritte: {a} + {b} + {c} = {tot} Minuten.", "{FIRST}dauern die Schritte {a}, {b} und {c} Minuten, insgesamt {tot} Minuten."],
                   ["{THEN}sind {tot} Minuten gleich {totd}, und {start} + {totd} = {end}.", "{THEN}ergibt {start} plus {totd} genau {end}."],
                   ["{SO}ist alles um {end} fertig.", "{SO}ist die Endzeit {end}."]],
        "Spanish": [["{FIRST}sumo los tres pasos: {a} + {b} + {c} = {tot} minutos.", "{FIRST}los pasos duran {a}, {b} y {c} minutos, {tot} minutos en total."],
                    ["{THEN}{tot} minutos son {totd}, y {start} + {totd} = {end}.", "{THEN}al sumar {totd} a las {start} llego a {end}."],
                    ["{SO}todo está listo a las {end}.", "{SO}la hora de fin es {end}."]],
        "Italian": [["{FIRST}sommo le tre fasi: {a} + {b} + {c} = {tot} minuti.", "{FIRST}le fasi durano {a}, {b} e {c} minuti, in tutto {tot} minuti."],
                    ["{THEN}{tot} minuti sono {totd}, e {start} + {totd} = {end}.", "{THEN}aggiungendo {totd} alle {start} arrivo alle {end}."],
                    ["{SO}tutto è pronto alle {end}.", "{SO}l'orario di fine è {end}."]],
        "Japanese": [["{FIRST}三つの作業の時間を足します。{a} + {b} + {c} = {tot}分です。", "{FIRST}作業はそれぞれ{a}分、{b}分、{c}分なので、合計{tot}分です。"],
                     ["{THEN}{tot}分は{totd}なので、{start} + {totd} = {end}です。", "{THEN}{start}に{totd}を足すと{end}になります。"],
                     ["{SO}すべて終わるのは{end}です。", "{SO}完了時刻は{end}です。"]],
    },
    "between": {
        "English": [["{FIRST}I write both times in minutes after midnight: {dep} is {dm} and {arr} is {am}.", "{FIRST}I convert the times to minutes: {dep} → {dm}, {arr} → {am}."],
                    ["{THEN}I subtract: {am} − {dm} = {diff} minutes.", "{THEN}the difference is {am} − {dm} = {diff} minutes."],
                    ["{SO}the journey takes {durl}.", "{SO}that is {durl}."]],
        "French": [["{FIRST}j'écris les deux heures en minutes depuis minuit : {dep} donne {dm} et {arr} donne {am}.", "{FIRST}je convertis les heures en minutes : {dep} → {dm}, {arr} → {am}."],
                   ["{THEN}je soustrais : {am} − {dm} = {diff} minutes.", "{THEN}la différence est {am} − {dm} = {diff} minutes."],
                   ["{SO}le trajet dure {durl}.", "{SO}cela fait {durl}."]],
        "German": [["{FIRST}schreibe ich beide Zeiten in Minuten nach Mitternacht: {dep} ist {dm} und {arr} ist {am}.", "{FIRST}rechne ich die Uhrzeiten in Minuten um: {dep} → {dm}, {arr} → {am}."],
                   ["{THEN}subtrahiere ich: {am} − {dm} = {diff} Minuten.", "{THEN}beträgt die Differenz {am} − {dm} = {diff} Minuten."],
                   ["{SO}dauert die Fahrt {durl}.", "{SO}sind das {durl}."]],
        "Spanish": [["{FIRST}paso las dos horas a minutos desde medianoche: {dep} son {dm} y {arr} son {am}.", "{FIRST}convierto las horas a minutos: {dep} → {dm}, {arr} → {am}."],
                    ["{THEN}resto: {am} − {dm} = {diff} minutos.", "{THEN}la diferencia es {am} − {dm} = {diff} minutos."],
                    ["{SO}el viaje dura {durl}.", "{SO}eso son {durl}."]],
        "Italian": [["{FIRST}scrivo i due orari in minuti dalla mezzanotte: {dep} è {dm} e {arr} è {am}.", "{FIRST}converto gli orari in minuti: {dep} → {dm}, {arr} → {am}."],
                    ["{THEN}sottraggo: {am} − {dm} = {diff} minuti.", "{THEN}la differenza è {am} − {dm} = {diff} minuti."],
                    ["{SO}il viaggio dura {durl}.", "{SO}sono {durl}."]],
        "Japanese": [["{FIRST}両方の時刻を0時からの分に直します。{dep}は{dm}分、{arr}は{am}分です。", "{FIRST}時刻を分に換算します。{dep} → {dm}、{arr} → {am}です。"],
                     ["{THEN}引き算をします。{am} − {dm} = {diff}分です。", "{THEN}差は{am} − {dm} = {diff}分です。"],
                     ["{SO}所要時間は{durl}です。", "{SO}{durl}かかります。"]],
    },
}


def gen_scheduling(rng: random.Random, lang: str) -> dict:
    kind = rng.choice(sorted(SCHED))
    if kind == "end":
        event, start = rng.choice(EVENTS), rng.randrange(7 * 60, 19 * 60, 5)
        h, m = rng.randint(1, 3), rng.randrange(5, 60, 5)
        end = start + 60 * h + m
        user = rng.choice([f"A {event} starts at {hhmm(start)} and lasts {dur_en(60 * h + m)}. What time does it end?",
                           f"If the {event} begins at {hhmm(start)} and runs for {60 * h + m} minutes, when is it over?"])
        final = rng.choice([f"It ends at {hhmm(end)}.", f"The {event} finishes at {hhmm(end)} ({hhmm(start)} + {h} h {m} min)."])
        params, answer = {"start": hhmm(start), "h": h, "m": m, "mid": hhmm(start + 60 * h), "end": hhmm(end)}, hhmm(end)
    elif kind == "leave":
        place, arrive = rng.choice(PLACES), rng.randrange(7 * 60, 22 * 60, 5)
        d, b = rng.randrange(10, 150, 5), rng.choice([5, 10, 15, 20, 30])
        leave = arrive - d - b
        user = rng.choice([f"I need to be at {place} by {hhmm(arrive)}. The trip takes {d} minutes and I want {b} minutes to spare. When should I leave?",
                           f"Getting to {place} takes {d} minutes, and I like a {b}-minute buffer. If I must arrive by {hhmm(arrive)}, what time do I leave?"])
        final = rng.choice([f"Leave by {hhmm(leave)}: {d} + {b} = {d + b} minutes before {hhmm(arrive)}.",
                            f"You should leave at {hhmm(leave)} at the latest."])
        params = {"place": place, "arrive": hhmm(arrive), "d": d, "b": b, "tot": d + b, "totd": dur(d + b, lang),
                  "leave": hhmm(leave)}
        answer = hhmm(leave)
    elif kind == "chain":
        routine = rng.choice(sorted(ROUTINES))
        start, a, b, c = rng.randrange(6 * 60, 19 * 60, 5), rng.randrange(10, 45, 5), rng.randrange(15, 90, 5), rng.randrange(5, 30, 5)
        tot, end = a + b + c, start + a + b + c
        q, done = ROUTINES[routine]
        user = q.format(s=hhmm(start), a=a, b=b, c=c)
        final = rng.choice([f"At {hhmm(end)}: the steps take {tot} minutes in total.",
                            f"{done[0].upper() + done[1:]} at {hhmm(end)} ({a} + {b} + {c} = {tot} minutes after {hhmm(start)})."])
        params = {"start": hhmm(start), "a": a, "b": b, "c": c, "tot": tot, "totd": dur(tot, lang), "end": hhmm(end)}
        answer = hhmm(end)
    else:
        dep = rng.randrange(5 * 60, 16 * 60)
        arr = dep + rng.randint(25, 7 * 60)
        diff = arr - dep
        mode = rng.choice(["train", "flight", "bus", "ferry"])
        user = rng.choice([f"A {mode} leaves at {hhmm(dep)} and arrives at {hhmm(arr)}. How long is the journey?",
                           f"My {mode} departs {hhmm(dep)} and gets in at {hhmm(arr)}. How long am I travelling?"])
        final = rng.choice([f"The journey takes {dur_en(diff)}.", f"{dur_en(diff)[0].upper() + dur_en(diff)[1:]} ({diff} minutes)."])
        params = {"dep": hhmm(dep), "arr": hhmm(arr), "dm": dep, "am": arr, "diff": diff, "durl": dur(diff, lang)}
        answer = dur_en(diff)
    return {"task": f"scheduling/{kind}", "user": user, "final": final, "answer": answer,
            "body": render(rng, lang, SCHED[kind][lang], params)}


# --------------------------------------------------------------------------- code
WORDS = ["banana", "python", "keyboard", "window", "planet", "coffee", "lantern", "rocket", "garden", "pepper",
         "mountain", "river", "bottle", "letter", "umbrella", "giraffe", "balloon", "cabinet", "kitten", "mirror",
         "jazz", "tomato", "compass", "bridge", "puzzle", "harbour", "marmalade", "cinnamon", "orbit", "papaya"]
ORDER = {"English": ("ascending", "descending"), "French": ("croissant", "décroissant"),
         "German": ("aufsteigender", "absteigender"), "Spanish": ("ascendente", "descendente"),
         "Italian": ("crescente", "decrescente"), "Japanese": ("昇順", "降順")}
CODE_END = {
    "English": ["{SO}the expression returns {res}.", "{SO}Python evaluates it to {res}."],
    "French": ["{SO}l'expression renvoie {res}.", "{SO}Python l'évalue à {res}."],
    "German": ["{SO}liefert der Ausdruck {res}.", "{SO}wertet Python den Ausdruck zu {res} aus."],
    "Spanish": ["{SO}la expresión devuelve {res}.", "{SO}Python la evalúa como {res}."],
    "Italian": ["{SO}l'espressione restituisce {res}.", "{SO}Python la valuta come {res}."],
    "Japanese": ["{SO}この式は{res}を返します。", "{SO}Pythonの評価結果は{res}です。"],
}
CODE = {  # kind -> language -> (what the construct does, the intermediate step)
    "slice": {
        "English": ("{FIRST}list indices start at 0, and the slice [{a}:{b}] takes positions {a} to {bm1}; position {b} is excluded.", "{THEN}those positions hold {items}, which form a new list."),
        "French": ("{FIRST}les indices commencent à 0, et la tranche [{a}:{b}] prend les positions {a} à {bm1} ; la position {b} est exclue.", "{THEN}ces positions contiennent {items}, ce qui forme une nouvelle liste."),
        "German": ("{FIRST}beginnen Listenindizes bei 0, und der Slice [{a}:{b}] nimmt die Positionen {a} bis {bm1}; Position {b} gehört nicht dazu.", "{THEN}stehen an diesen Positionen {items}, daraus entsteht eine neue Liste."),
        "Spanish": ("{FIRST}los índices empiezan en 0, y la porción [{a}:{b}] toma las posiciones {a} a {bm1}; la posición {b} queda fuera.", "{THEN}en esas posiciones están {items}, que forman una lista nueva."),
        "Italian": ("{FIRST}gli indici partono da 0 e la slice [{a}:{b}] prende le posizioni da {a} a {bm1}; la posizione {b} è esclusa.", "{THEN}in quelle posizioni ci sono {items}, che formano una nuova lista."),
        "Japanese": ("{FIRST}リストの添字は0から始まり、スライス[{a}:{b}]は位置{a}から{bm1}までを取ります。位置{b}は含まれません。", "{THEN}その位置にある要素は{items}で、これが新しいリストになります。")},
    "len": {
        "English": ("{FIRST}len counts the characters of the string \"{w}\".", "{THEN}spelling it out, {spelled} gives {res} characters."),
        "French": ("{FIRST}len compte les caractères de la chaîne \"{w}\".", "{THEN}en l'épelant, {spelled} donne {res} caractères."),
        "German": ("{FIRST}zählt len die Zeichen der Zeichenkette \"{w}\".", "{THEN}ergibt das Buchstabieren {spelled} genau {res} Zeichen."),
        "Spanish": ("{FIRST}len cuenta los caracteres de la cadena \"{w}\".", "{THEN}al deletrearla, {spelled} da {res} caracteres."),
        "Italian": ("{FIRST}len conta i caratteri della stringa \"{w}\".", "{THEN}scandendola, {spelled} dà {res} caratteri."),
        "Japanese": ("{FIRST}lenは文字列\"{w}\"の文字数を数えます。", "{THEN}{spelled}と一文字ずつ数えると{res}文字です。")},
    "sorted": {
        "English": ("{FIRST}sorted builds a new list in {order} order and leaves the original unchanged.", "{THEN}ordering {lst} this way gives {res}."),
        "French": ("{FIRST}sorted construit une nouvelle liste dans l'ordre {order} sans modifier l'originale.", "{THEN}en rangeant {lst} ainsi, on obtient {res}."),
        "German": ("{FIRST}erzeugt sorted eine neue Liste in {order} Reihenfolge, ohne das Original zu ändern.", "{THEN}ergibt {lst} so geordnet {res}."),
        "Spanish": ("{FIRST}sorted crea una lista nueva en orden {order} sin cambiar la original.", "{THEN}al ordenar {lst} así, obtengo {res}."),
        "Italian": ("{FIRST}sorted crea una nuova lista in ordine {order} senza modificare l'originale.", "{THEN}ordinando {lst} in questo modo ottengo {res}."),
        "Japanese": ("{FIRST}sortedは元のリストを変えずに、{order}に並べた新しいリストを作ります。", "{THEN}{lst}をそのように並べると{res}になります。")},
    "join": {
        "English": ("{FIRST}str.join puts the separator {sep} between the items of the list.", "{THEN}joining {items} with it gives {res}."),
        "French": ("{FIRST}str.join place le séparateur {sep} entre les éléments de la liste.", "{THEN}en reliant {items} ainsi, on obtient {res}."),
        "German": ("{FIRST}setzt str.join das Trennzeichen {sep} zwischen die Elemente der Liste.", "{THEN}ergibt das Verbinden von {items} damit {res}."),
        "Spanish": ("{FIRST}str.join coloca el separador {sep} entre los elementos de la lista.", "{THEN}al unir {items} con él obtengo {res}."),
        "Italian": ("{FIRST}str.join mette il separatore {sep} tra gli elementi della lista.", "{THEN}unendo {items} in questo modo ottengo {res}."),
        "Japanese": ("{FIRST}str.joinはリストの要素の間に区切り文字{sep}を入れます。", "{THEN}{items}をつなげると{res}になります。")},
    "sumrange": {
        "English": ("{FIRST}range({a}, {b}) gives the integers from {a} to {bm1}; the end value {b} is excluded.", "{THEN}there are {cnt} numbers, and their sum is {cnt} × ({a} + {bm1}) / 2 = {res}."),
        "French": ("{FIRST}range({a}, {b}) donne les entiers de {a} à {bm1} ; la borne {b} est exclue.", "{THEN}il y a {cnt} nombres, et leur somme vaut {cnt} × ({a} + {bm1}) / 2 = {res}."),
        "German": ("{FIRST}liefert range({a}, {b}) die ganzen Zahlen von {a} bis {bm1}; der Endwert {b} ist ausgeschlossen.", "{THEN}sind das {cnt} Zahlen mit der Summe {cnt} × ({a} + {bm1}) / 2 = {res}."),
        "Spanish": ("{FIRST}range({a}, {b}) produce los enteros de {a} a {bm1}; el valor final {b} queda excluido.", "{THEN}son {cnt} números, y su suma es {cnt} × ({a} + {bm1}) / 2 = {res}."),
        "Italian": ("{FIRST}range({a}, {b}) produce gli interi da {a} a {bm1}; il valore finale {b} è escluso.", "{THEN}sono {cnt} numeri e la loro somma è {cnt} × ({a} + {bm1}) / 2 = {res}."),
        "Japanese": ("{FIRST}range({a}, {b})は{a}から{bm1}までの整数を作ります。終わりの{b}は含まれません。", "{THEN}数は{cnt}個あり、合計は{cnt} × ({a} + {bm1}) / 2 = {res}です。")},
    "divmod": {
        "English": ("{FIRST}// is floor division and % gives the remainder.", "{THEN}{a} = {q} × {b} + {r}, which means {a} {op} {b} is {res}."),
        "French": ("{FIRST}// est la division entière et % donne le reste.", "{THEN}{a} = {q} × {b} + {r}, d'où {a} {op} {b} = {res}."),
        "German": ("{FIRST}ist // die ganzzahlige Division, und % liefert den Rest.", "{THEN}gilt {a} = {q} × {b} + {r}, daher ist {a} {op} {b} gleich {res}."),
        "Spanish": ("{FIRST}// es la división entera y % da el resto.", "{THEN}{a} = {q} × {b} + {r}, por eso {a} {op} {b} vale {res}."),
        "Italian": ("{FIRST}// è la divisione intera e % dà il resto.", "{THEN}{a} = {q} × {b} + {r}, perciò {a} {op} {b} vale {res}."),
        "Japanese": ("{FIRST}//は切り捨て除算で、%は余りを返します。", "{THEN}{a} = {q} × {b} + {r}なので、{a} {op} {b}は{res}です。")},
    "reverse": {
        "English": ("{FIRST}the slice [::-1] walks through the string backwards with a step of -1.", "{THEN}reading \"{w}\" from the last character to the first gives {res}."),
        "French": ("{FIRST}la tranche [::-1] parcourt la chaîne à l'envers avec un pas de -1.", "{THEN}en lisant \"{w}\" du dernier caractère au premier, on obtient {res}."),
        "German": ("{FIRST}durchläuft der Slice [::-1] die Zeichenkette rückwärts mit Schrittweite -1.", "{THEN}ergibt \"{w}\" vom letzten bis zum ersten Zeichen gelesen {res}."),
        "Spanish": ("{FIRST}la porción [::-1] recorre la cadena al revés con paso -1.", "{THEN}al leer \"{w}\" del último carácter al primero obtengo {res}."),
        "Italian": ("{FIRST}la slice [::-1] percorre la stringa al contrario con passo -1.", "{THEN}leggendo \"{w}\" dall'ultimo carattere al primo ottengo {res}."),
        "Japanese": ("{FIRST}スライス[::-1]はステップ-1で文字列を逆向きにたどります。", "{THEN}\"{w}\"を最後の文字から読むと{res}になります。")},
    "comp": {
        "English": ("{FIRST}range({n}) gives 0 to {nm1}, and each value x becomes {body}.", "{THEN}computing it for every x gives {res}."),
        "French": ("{FIRST}range({n}) donne 0 à {nm1}, et chaque valeur x devient {body}.", "{THEN}en le calculant pour chaque x, on obtient {res}."),
        "German": ("{FIRST}liefert range({n}) die Werte 0 bis {nm1}, und jeder Wert x wird zu {body}.", "{THEN}ergibt die Berechnung für jedes x {res}."),
        "Spanish": ("{FIRST}range({n}) da los valores de 0 a {nm1}, y cada valor x se convierte en {body}.", "{THEN}al calcularlo para cada x obtengo {res}."),
        "Italian": ("{FIRST}range({n}) dà i valori da 0 a {nm1}, e ogni valore x diventa {body}.", "{THEN}calcolandolo per ogni x ottengo {res}."),
        "Japanese": ("{FIRST}range({n})は0から{nm1}までを作り、各xは{body}になります。", "{THEN}すべてのxについて計算すると{res}になります。")},
    "count": {
        "English": ("{FIRST}str.count counts how often \"{ch}\" occurs in \"{w}\".", "{THEN}going through the letters {spelled}, the count is {res}."),
        "French": ("{FIRST}str.count compte les occurrences de \"{ch}\" dans \"{w}\".", "{THEN}en parcourant les lettres {spelled}, le total est {res}."),
        "German": ("{FIRST}zählt str.count, wie oft \"{ch}\" in \"{w}\" vorkommt.", "{THEN}komme ich beim Durchgehen der Buchstaben {spelled} auf {res}."),
        "Spanish": ("{FIRST}str.count cuenta las apariciones de \"{ch}\" en \"{w}\".", "{THEN}al recorrer las letras {spelled}, el total es {res}."),
        "Italian": ("{FIRST}str.count conta le occorrenze di \"{ch}\" in \"{w}\".", "{THEN}scorrendo le lettere {spelled}, il totale è {res}."),
        "Japanese": ("{FIRST}str.countは\"{w}\"の中に\"{ch}\"が何回現れるかを数えます。", "{THEN}{spelled}と一文字ずつ見ていくと、{res}回です。")},
}


def gen_code(rng: random.Random, lang: str) -> dict:
    kind = rng.choice(sorted(CODE))
    p: dict = {}
    if kind == "slice":
        lst = rng.sample(range(1, 30), rng.randint(5, 8))
        a = rng.randint(0, len(lst) - 3)
        b = rng.randint(a + 2, len(lst))
        expr = f"{lst}[{a}:{b}]"
        p = {"a": a, "b": b, "bm1": b - 1, "items": ", ".join(map(str, lst[a:b]))}
        why = f"the slice takes indices {a} to {b - 1}; index {b} is excluded."
    elif kind in ("len", "reverse", "count"):
        w = rng.choice(WORDS)
        p = {"w": w, "spelled": "-".join(w)}
        if kind == "len":
            expr, why = f'len("{w}")', f'"{w}" has {len(w)} characters.'
        elif kind == "reverse":
            expr, why = f'"{w}"[::-1]', "a step of -1 reads the string backwards."
        else:
            ch = rng.choice(sorted(set(w)))
            expr, why = f'"{w}".count("{ch}")', f'"{ch}" occurs {w.count(ch)} time{"s" if w.count(ch) > 1 else ""} in "{w}".'
            p["ch"] = ch
    elif kind == "sorted":
        lst, rev = rng.sample(range(-9, 60), rng.randint(4, 7)), rng.random() < 0.4
        expr = f"sorted({lst}, reverse=True)" if rev else f"sorted({lst})"
        p = {"lst": str(lst), "order": ORDER[lang][rev]}
        why = f"sorted returns a new list in {('descending' if rev else 'ascending')} order."
    elif kind == "join":
        items, sep = rng.sample(WORDS, rng.randint(2, 4)), rng.choice(["-", ", ", "/", "_", " + ", ""])
        expr = f'"{sep}".join({items})'
        p = {"sep": repr(sep).replace("'", '"'), "items": ", ".join(items)}
        why = f"join puts {repr(sep)} between the items."
    elif kind == "sumrange":
        a, b = rng.randint(0, 12), rng.randint(14, 60)
        expr = f"sum(range({a}, {b}))"
        p = {"a": a, "b": b, "bm1": b - 1, "cnt": b - a}
        why = f"range({a}, {b}) covers {a} to {b - 1}, and {b - a} × ({a} + {b - 1}) / 2 = {sum(range(a, b))}."
    elif kind == "divmod":
        a, b, op = rng.randint(20, 250), rng.randint(3, 17), rng.choice(["//", "%"])
        expr = f"{a} {op} {b}"
        p = {"a": a, "b": b, "q": a // b, "r": a % b, "op": op}
        why = f"{a} = {a // b} × {b} + {a % b}."
    else:  # comp
        n, k = rng.randint(3, 7), rng.randint(2, 9)
        body = rng.choice([f"x * {k}", "x ** 2", f"x + {k}", f"x * x - {k}"])
        expr = f"[{body} for x in range({n})]"
        p = {"n": n, "nm1": n - 1, "body": body}
        why = f"x takes the values 0 to {n - 1}."
    res = repr(eval(expr, {"__builtins__": {}}, {"len": len, "sorted": sorted, "sum": sum, "range": range}))
    p["res"] = res
    user = rng.choice([f"What does the Python expression `{expr}` return?", f"In Python, what is the value of `{expr}`?",
                       f"What do you get when Python evaluates `{expr}`?"])
    final = rng.choice([f"`{expr}` returns `{res}`: {why}", f"It evaluates to `{res}`. In short, {why}"])
    steps = list(CODE[kind][lang]) + [CODE_END[lang]]
    return {"task": f"code/{kind}", "user": user, "final": final, "answer": res, "body": render(rng, lang, steps, p)}


# --------------------------------------------------------------------------- everyday advice
ADVICE = {
    "savings": {
        "English": [["{FIRST}I compute the monthly amount: {pct}% of {income} is {monthly} dollars.", "{FIRST}saving {pct}% of {income} dollars means {monthly} dollars a month."],
                    ["{THEN}over a year that adds up to {monthly} × 12 = {yearly} dollars.", "{THEN}twelve months of that make {yearly} dollars."],
                    ["{SO}my advice is to set up an automatic transfer of {monthly} dollars on payday.", "{SO}the most reliable habit is an automatic transfer on payday, before any spending."],
                    "{FINALLY}keeping the savings in a separate account makes them harder to spend."],
        "French": [["{FIRST}je calcule le montant mensuel : {pct} % de {income} font {monthly} dollars.", "{FIRST}épargner {pct} % de {income} dollars représente {monthly} dollars par mois."],
                   ["{THEN}sur un an, cela fait {monthly} × 12 = {yearly} dollars.", "{THEN}douze mois de ce montant donnent {yearly} dollars."],
                   ["{SO}je conseille un virement automatique de {monthly} dollars le jour de la paie.", "{SO}l'habitude la plus fiable est un virement automatique dès la paie, avant toute dépense."],
                   "{FINALLY}garder l'épargne sur un compte séparé la rend plus difficile à dépenser."],
        "German": [["{FIRST}berechne ich den Monatsbetrag: {pct} % von {income} sind {monthly} Dollar.", "{FIRST}bedeuten {pct} % von {income} Dollar genau {monthly} Dollar im Monat."],
                   ["{THEN}ergibt das im Jahr {monthly} × 12 = {yearly} Dollar.", "{THEN}kommen in zwölf Monaten {yearly} Dollar zusammen."],
                   ["{SO}rate ich zu einem Dauerauftrag über {monthly} Dollar am Zahltag.", "{SO}ist ein automatischer Dauerauftrag direkt am Zahltag die zuverlässigste Gewohnheit."],
                   "{FINALLY}ist das Geld auf einem separaten Konto schwerer auszugeben."],
        "Spanish": [["{FIRST}calculo la cantidad mensual: el {pct} % de {income} son {monthly} dólares.", "{FIRST}ahorrar el {pct} % de {income} dólares supone {monthly} dólares al mes."],
                    ["{THEN}en un año eso suma {monthly} × 12 = {yearly} dólares.", "{THEN}doce meses así dan {yearly} dólares."],
                    ["{SO}recomiendo una transferencia automática de {monthly} dólares el día de cobro.", "{SO}el hábito más fiable es una transferencia automática al cobrar, antes de gastar nada."],
                    "{FINALLY}guardar el ahorro en una cuenta aparte hace más difícil gastarlo."],
        "Italian": [["{FIRST}calcolo la cifra mensile: il {pct}% di {income} è {monthly} dollari.", "{FIRST}risparmiare il {pct}% di {income} dollari significa {monthly} dollari al mese."],
                    ["{THEN}in un anno si arriva a {monthly} × 12 = {yearly} dollari.", "{THEN}dodici mesi così fanno {yearly} dollari."],
                    ["{SO}consiglio un bonifico automatico di {monthly} dollari il giorno dello stipendio.", "{SO}l'abitudine più affidabile è un bonifico automatico appena arriva lo stipendio, prima di spendere."],
                    "{FINALLY}tenere i risparmi su un conto separato li rende più difficili da spendere."],
        "Japanese": [["{FIRST}毎月の金額を計算します。{income}の{pct}%は{monthly}ドルです。", "{FIRST}{income}ドルの{pct}%を貯めると、月に{monthly}ドルになります。"],
                     ["{THEN}1年では{monthly} × 12 = {yearly}ドルです。", "{THEN}12か月分で{yearly}ドルになります。"],
                     ["{SO}給料日に{monthly}ドルを自動で振り替える設定をおすすめします。", "{SO}使う前に給料日に自動で積み立てるのが一番確実です。"],
                     "{FINALLY}貯金を別の口座に分けておくと、使いにくくなります。"],
    },
    "study": {
        "English": [["{FIRST}I spread {hours} hours over {days} days: {hours} × 60 ÷ {days} ≈ {pd} minutes a day, rounded up.", "{FIRST}{hours} hours is {mins} minutes, and over {days} days that is about {pd} minutes a day."],
                    ["{THEN}in focused blocks of 50 minutes with short breaks, that is {blocks} blocks a day.", "{THEN}with 50-minute sessions and a 10-minute break after each, I need {blocks} sessions a day."],
                    ["{SO}I would suggest a fixed daily timetable and keeping the last day for review.", "{SO}the plan is to study at the same time every day and leave the final day for revision."]],
        "French": [["{FIRST}je répartis {hours} heures sur {days} jours : {hours} × 60 ÷ {days} ≈ {pd} minutes par jour, en arrondissant.", "{FIRST}{hours} heures font {mins} minutes, soit environ {pd} minutes par jour sur {days} jours."],
                   ["{THEN}en séances de 50 minutes avec de courtes pauses, cela fait {blocks} séances par jour.", "{THEN}avec des blocs de 50 minutes suivis de 10 minutes de pause, il faut {blocks} blocs par jour."],
                   ["{SO}je propose un horaire fixe chaque jour et de garder le dernier jour pour les révisions.", "{SO}le plan est d'étudier à la même heure chaque jour et de réserver le dernier jour à la révision."]],
        "German": [["{FIRST}verteile ich {hours} Stunden auf {days} Tage: {hours} × 60 ÷ {days} ≈ {pd} Minuten pro Tag, aufgerundet.", "{FIRST}sind {hours} Stunden genau {mins} Minuten, also etwa {pd} Minuten pro Tag bei {days} Tagen."],
                   ["{THEN}ergibt das bei Blöcken von 50 Minuten mit kurzen Pausen {blocks} Blöcke pro Tag.", "{THEN}brauche ich mit 50-Minuten-Einheiten und je 10 Minuten Pause {blocks} Einheiten am Tag."],
                   ["{SO}empfehle ich einen festen Tagesplan und den letzten Tag für die Wiederholung.", "{SO}ist der Plan, jeden Tag zur gleichen Zeit zu lernen und den letzten Tag für die Wiederholung freizuhalten."]],
        "Spanish": [["{FIRST}reparto {hours} horas en {days} días: {hours} × 60 ÷ {days} ≈ {pd} minutos al día, redondeando hacia arriba.", "{FIRST}{hours} horas son {mins} minutos, es decir, unos {pd} minutos al día durante {days} días."],
                    ["{THEN}en bloques de 50 minutos con pausas cortas, son {blocks} bloques al día.", "{THEN}con sesiones de 50 minutos y 10 minutos de descanso, necesito {blocks} sesiones al día."],
                    ["{SO}sugiero un horario fijo cada día y reservar el último día para repasar.", "{SO}el plan es estudiar a la misma hora cada día y dejar el último día para el repaso."]],
        "Italian": [["{FIRST}distribuisco {hours} ore su {days} giorni: {hours} × 60 ÷ {days} ≈ {pd} minuti al giorno, arrotondando per eccesso.", "{FIRST}{hours} ore sono {mins} minuti, cioè circa {pd} minuti al giorno per {days} giorni."],
                    ["{THEN}in blocchi di 50 minuti con brevi pause, sono {blocks} blocchi al giorno.", "{THEN}con sessioni di 50 minuti e 10 minuti di pausa, servono {blocks} sessioni al giorno."],
                    ["{SO}suggerisco un orario fisso ogni giorno e di tenere l'ultimo giorno per il ripasso.", "{SO}il piano è studiare alla stessa ora ogni giorno e lasciare l'ultimo giorno al ripasso."]],
        "Japanese": [["{FIRST}{hours}時間を{days}日に分けます。{hours} × 60 ÷ {days} ≈ {pd}分で、切り上げています。", "{FIRST}{hours}時間は{mins}分なので、{days}日で割ると1日約{pd}分です。"],
                     ["{THEN}50分の集中と短い休憩を組み合わせると、1日{blocks}コマになります。", "{THEN}50分ごとに10分休むやり方なら、1日に{blocks}回の学習が必要です。"],
                     ["{SO}毎日同じ時間に勉強し、最終日は復習に充てるのがよいでしょう。", "{SO}決まった時間割を作り、最後の日は見直しに使うことをおすすめします。"]],
    },
    "reading": {
        "English": [["{FIRST}I work out the total: {books} × {pages} = {total} pages.", "{FIRST}{books} books of about {pages} pages make {total} pages in all."],
                    ["{THEN}I divide by 365 days: {total} ÷ 365 ≈ {raw}, so about {pd} pages a day.", "{THEN}spread over 365 days, that is {total} ÷ 365 ≈ {raw}, rounded up to {pd} pages."],
                    ["{SO}my advice is to read {pd} pages at a fixed time each day, for example before bed.", "{SO}a small daily habit of {pd} pages, always at the same time, is enough."]],
        "French": [["{FIRST}je calcule le total : {books} × {pages} = {total} pages.", "{FIRST}{books} livres d'environ {pages} pages font {total} pages en tout."],
                   ["{THEN}je divise par 365 jours : {total} ÷ 365 ≈ {raw}, soit environ {pd} pages par jour.", "{THEN}réparti sur 365 jours, cela donne {total} ÷ 365 ≈ {raw}, arrondi à {pd} pages."],
                   ["{SO}je conseille de lire {pd} pages chaque jour à heure fixe, par exemple avant de dormir.", "{SO}une petite habitude de {pd} pages par jour, toujours au même moment, suffit."]],
        "German": [["{FIRST}berechne ich die Gesamtzahl: {books} × {pages} = {total} Seiten.", "{FIRST}ergeben {books} Bücher mit etwa {pages} Seiten insgesamt {total} Seiten."],
                   ["{THEN}teile ich durch 365 Tage: {total} ÷ 365 ≈ {raw}, also etwa {pd} Seiten pro Tag.", "{THEN}sind das über 365 Tage verteilt {total} ÷ 365 ≈ {raw}, aufgerundet {pd} Seiten."],
                   ["{SO}rate ich, jeden Tag zur gleichen Zeit {pd} Seiten zu lesen, etwa vor dem Schlafen.", "{SO}reicht eine kleine tägliche Gewohnheit von {pd} Seiten, immer zur gleichen Zeit."]],
        "Spanish": [["{FIRST}calculo el total: {books} × {pages} = {total} páginas.", "{FIRST}{books} libros de unas {pages} páginas suman {total} páginas."],
                    ["{THEN}divido entre 365 días: {total} ÷ 365 ≈ {raw}, es decir, unas {pd} páginas al día.", "{THEN}repartido en 365 días, da {total} ÷ 365 ≈ {raw}, que redondeo a {pd} páginas."],
                    ["{SO}aconsejo leer {pd} páginas cada día a una hora fija, por ejemplo antes de dormir.", "{SO}basta con un pequeño hábito de {pd} páginas diarias, siempre a la misma hora."]],
        "Italian": [["{FIRST}calcolo il totale: {books} × {pages} = {total} pagine.", "{FIRST}{books} libri di circa {pages} pagine fanno {total} pagine in tutto."],
                    ["{THEN}divido per 365 giorni: {total} ÷ 365 ≈ {raw}, cioè circa {pd} pagine al giorno.", "{THEN}distribuito su 365 giorni, fa {total} ÷ 365 ≈ {raw}, arrotondato a {pd} pagine."],
                    ["{SO}consiglio di leggere {pd} pagine ogni giorno alla stessa ora, per esempio prima di dormire.", "{SO}basta una piccola abitudine di {pd} pagine al giorno, sempre alla stessa ora."]],
        "Japanese": [["{FIRST}合計ページ数を出します。{books} × {pages} = {total}ページです。", "{FIRST}約{pages}ページの本が{books}冊なので、全部で{total}ページです。"],
                     ["{THEN}365日で割ります。{total} ÷ 365 ≈ {raw}なので、1日約{pd}ページです。", "{THEN}1年に分けると{total} ÷ 365 ≈ {raw}で、切り上げて{pd}ページです。"],
                     ["{SO}毎日決まった時間、たとえば寝る前に{pd}ページ読むのがおすすめです。", "{SO}毎日同じ時間に{pd}ページ読む小さな習慣で十分です。"]],
    },
    "running": {
        "English": [["{FIRST}the 10% rule means multiplying the distance by {g} each week.", "{FIRST}adding 10% per week means the distance grows by a factor of {g} every week."],
                    ["{THEN}{cur} × {g}^{w1} ≈ {d1} km is still short of {target} km, but {cur} × {g}^{w} ≈ {dw} km reaches it.", "{THEN}after {w1} weeks I would be at about {d1} km and after {w} weeks at about {dw} km, which passes {target} km."],
                    ["{SO}it takes about {w} weeks.", "{SO}the goal is reached in week {w}."],
                    "{FINALLY}I would keep most runs easy and plan a lighter week every fourth week."],
        "French": [["{FIRST}la règle des 10 % revient à multiplier la distance par {g} chaque semaine.", "{FIRST}ajouter 10 % par semaine signifie multiplier la distance par {g} chaque semaine."],
                   ["{THEN}{cur} × {g}^{w1} ≈ {d1} km reste en dessous de {target} km, mais {cur} × {g}^{w} ≈ {dw} km l'atteint.", "{THEN}après {w1} semaines je serais à environ {d1} km, et après {w} semaines à environ {dw} km, ce qui dépasse {target} km."],
                   ["{SO}il faut environ {w} semaines.", "{SO}l'objectif est atteint la semaine {w}."],
                   "{FINALLY}je garderais la plupart des sorties faciles, avec une semaine plus légère toutes les quatre semaines."],
        "German": [["{FIRST}bedeutet die 10-%-Regel, die Strecke jede Woche mit {g} zu multiplizieren.", "{FIRST}wächst die Strecke bei 10 % mehr pro Woche jede Woche um den Faktor {g}."],
                   ["{THEN}liegt {cur} × {g}^{w1} ≈ {d1} km noch unter {target} km, aber {cur} × {g}^{w} ≈ {dw} km erreicht das Ziel.", "{THEN}wäre ich nach {w1} Wochen bei etwa {d1} km und nach {w} Wochen bei etwa {dw} km, also über {target} km."],
                   ["{SO}dauert es etwa {w} Wochen.", "{SO}ist das Ziel in Woche {w} erreicht."],
                   "{FINALLY}sollten die meisten Läufe locker bleiben, mit einer leichteren Woche alle vier Wochen."],
        "Spanish": [["{FIRST}la regla del 10 % significa multiplicar la distancia por {g} cada semana.", "{FIRST}sumar un 10 % por semana hace que la distancia crezca por un factor de {g} cada semana."],
                    ["{THEN}{cur} × {g}^{w1} ≈ {d1} km aún no llega a {target} km, pero {cur} × {g}^{w} ≈ {dw} km sí.", "{THEN}tras {w1} semanas estaría en unos {d1} km y tras {w} semanas en unos {dw} km, lo que supera {target} km."],
                    ["{SO}se necesitan unas {w} semanas.", "{SO}el objetivo se alcanza en la semana {w}."],
                    "{FINALLY}mantendría suaves la mayoría de las carreras, con una semana más ligera cada cuatro."],
        "Italian": [["{FIRST}la regola del 10% significa moltiplicare la distanza per {g} ogni settimana.", "{FIRST}aggiungere il 10% a settimana fa crescere la distanza di un fattore {g} ogni settimana."],
                    ["{THEN}{cur} × {g}^{w1} ≈ {d1} km è ancora sotto i {target} km, ma {cur} × {g}^{w} ≈ {dw} km li raggiunge.", "{THEN}dopo {w1} settimane sarei a circa {d1} km e dopo {w} settimane a circa {dw} km, oltre i {target} km."],
                    ["{SO}servono circa {w} settimane.", "{SO}l'obiettivo si raggiunge nella settimana {w}."],
                    "{FINALLY}terrei facili la maggior parte delle uscite, con una settimana più leggera ogni quattro."],
        "Japanese": [["{FIRST}10%ルールとは、毎週距離を{g}倍にすることです。", "{FIRST}毎週10%ずつ増やすと、距離は毎週{g}倍になります。"],
                     ["{THEN}{cur} × {g}^{w1} ≈ {d1} kmではまだ{target} kmに届きませんが、{cur} × {g}^{w} ≈ {dw} kmで届きます。", "{THEN}{w1}週間後は約{d1} km、{w}週間後は約{dw} kmで、{target} kmを超えます。"],
                     ["{SO}約{w}週間かかります。", "{SO}{w}週目に目標に届きます。"],
                     "{FINALLY}ほとんどのランは楽なペースにして、4週に1回は軽めの週を入れるとよいでしょう。"],
    },
}


def gen_advice(rng: random.Random, lang: str) -> dict:
    kind = rng.choice(sorted(ADVICE))
    if kind == "savings":
        income, pct = rng.randrange(1200, 6000, 100), rng.choice([5, 10, 12, 15, 20, 25])
        monthly = income * pct // 100
        num = {"income": str(income), "monthly": str(monthly), "yearly": str(monthly * 12)}
        user = rng.choice([f"I earn ${income} a month after tax and want to save {pct}% of it. How much is that per year, and how do I make it stick?",
                           f"If I save {pct}% of a ${income} monthly income, how much do I put aside in a year, and how do I keep the habit?"])
        final = (f"Saving {pct}% of ${income} is ${monthly} a month, or ${monthly * 12} a year. Set up an automatic transfer on payday so "
                 "the money is saved before you can spend it, and keep it in a separate account.")
        params, answer = {"pct": pct}, str(monthly * 12)
    elif kind == "study":
        days = rng.randint(4, 30)
        hours = rng.randint(max(8, days), min(80, days * 4))
        pd = math.ceil(hours * 60 / days / 5) * 5
        blocks = math.ceil(pd / 50)
        num = {}
        user = rng.choice([f"My exam is in {days} days and I have about {hours} hours of material to review. How should I plan my study time?",
                           f"I have {days} days to get through roughly {hours} hours of revision. How much should I study each day?"])
        final = (f"About {pd} minutes a day ({hours} hours over {days} days). Work in {blocks} blocks of 50 minutes with "
                 f"10-minute breaks, at the same time each day, and keep the last day for review.")
        params, answer = {"hours": hours, "days": days, "mins": hours * 60, "pd": pd, "blocks": blocks}, f"{pd} minutes"
    elif kind == "reading":
        books, pages = rng.randint(6, 52), rng.randrange(150, 520, 10)
        total = books * pages
        pd = math.ceil(total / 365)
        num = {"raw": fmt(Decimal(total) / 365, 1)}
        user = rng.choice([f"I want to read {books} books this year, about {pages} pages each. How many pages a day is that, and any tips?",
                           f"My goal is {books} books of roughly {pages} pages in a year. How much should I read daily to get there?"])
        final = (f"{books} books × {pages} pages = {total} pages, so about {pd} pages a day. Read at a fixed time every day "
                 "(for example before bed) and keep the next book ready so there is no gap between books.")
        params, answer = {"books": books, "pages": pages, "total": total, "pd": pd}, f"{pd} pages"
    else:  # running
        for _ in range(50):
            cur = rng.randint(3, 12)
            target = rng.randint(cur + 3, min(42, cur * 3))
            w = next(k for k in range(1, 60) if cur * 1.1 ** k >= target)
            if w >= 2 and Decimal(fmt(cur * 1.1 ** (w - 1), 1)) < target:
                break
        d1, dw = fmt(cur * 1.1 ** (w - 1), 1), fmt(cur * 1.1 ** w, 1)
        num = {"d1": d1, "dw": dw, "g": "1.1"}
        user = rng.choice([f"I can comfortably run {cur} km and want to reach {target} km. If I increase my distance by 10% a week, how many weeks will it take?",
                           f"Using the 10% rule, how long would it take me to go from running {cur} km to {target} km?"])
        final = (f"About {w} weeks: {cur} km × 1.1^{w} ≈ {dw} km, which passes {target} km. Keep most runs easy, and every fourth "
                 "week cut back a little so your body can recover.")
        params, answer = {"cur": cur, "target": target, "w": w, "w1": w - 1}, f"{w} weeks"
    params.update({k: dec(v, lang) for k, v in num.items()})
    return {"task": f"advice/{kind}", "user": user, "final": final, "answer": answer,
            "body": render(rng, lang, ADVICE[kind][lang], params)}


GENERATORS = {"arithmetic": gen_arithmetic, "conversion": gen_conversion, "scheduling": gen_scheduling,
              "advice": gen_advice, "code": gen_code}


# --------------------------------------------------------------------------- assembly
def build_rows(seed: int = SEED, n_rows: int = N_ROWS) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for i in range(n_rows):
        lang = LANGS[i % len(LANGS)]
        block = i // len(LANGS)  # one row per language; the block's extra slot rotates over the families
        family = FAMILIES[(block + block // 10 + i % len(LANGS)) % len(FAMILIES)]
        gen = GENERATORS[family]
        for _ in range(200):
            item = gen(rng, lang)
            if item["user"] not in seen:
                break
        else:
            raise RuntimeError(f"row {i}: could not find a new {family} question")
        seen.add(item["user"])
        developer = rng.choice(DEVELOPERS[family] + DEVELOPERS["any"])
        analysis = trace(rng, lang, item["body"])
        row = {
            "id": f"mt-{i + 1:04d}", "reasoning_language": lang, "developer": developer, "user": item["user"],
            "analysis": analysis, "final": item["final"], "task": item["task"],
            "messages": [
                {"role": "system", "content": f"reasoning language: {lang}\n\n{developer}", "thinking": None},
                {"role": "user", "content": item["user"], "thinking": None},
                {"role": "assistant", "content": item["final"], "thinking": analysis},
            ],
        }
        if item.get("answer") is not None:
            row["answer"] = item["answer"]
        rows.append(row)
    return rows


def is_heldout(index: int) -> bool:
    """Every tenth block of six rows (one per language) is held out."""
    return (index // len(LANGS)) % 10 == 9


def write(out_dir: Path) -> tuple[int, int]:
    rows = build_rows()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"sample_train.jsonl": [], "sample_heldout.jsonl": []}
    for i, row in enumerate(rows):
        parts["sample_heldout.jsonl" if is_heldout(i) else "sample_train.jsonl"].append(row)
    for name, part in parts.items():
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in part)
        (out_dir / name).write_bytes(text.encode("utf-8"))
    return len(parts["sample_train.jsonl"]), len(parts["sample_heldout.jsonl"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                    help="folder for sample_train.jsonl and sample_heldout.jsonl (default: lowvram_ft/assets)")
    args = ap.parse_args(argv)
    train, heldout = write(args.out_dir)
    print(f"wrote {train} training rows and {heldout} held-out rows to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
