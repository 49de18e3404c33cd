"""Generate the shipped sample production prompt logs (``sample_prompt_logs.jsonl.gz``).

Reproducible: a fixed seed, fixed dates, gzip mtime 0. The text is real text that ships with Python:
module and function docstrings and source code of the standard library, the Zen of Python (``this``),
plus short hand-written support messages in a few languages. The output depends on the Python minor
version (docstrings change between releases); the committed file was made with CPython 3.11.

Shape: ~4000 OpenAI chat-completions requests (some plain ``{"prompt": ...}`` completions) over five
routes (chat-support, code-help, summarize, extract-json, translate), timestamps spread over four
weeks (2026-01-05 .. 2026-02-02 UTC, busier in working hours), PII planted on purpose (emails, phone
numbers, API keys, card numbers) so redaction has something to do, and ~3 % exact plus ~5 % near
duplicates (resent requests, small edits).

    python -m calibration.data.make_sample_logs [--out PATH] [--count N] [--seed S]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime as dt
import gzip
import importlib
import inspect
import io
import json
import random
import string
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "sample_prompt_logs.jsonl.gz"
START = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
DAYS = 28
ROUTE_WEIGHTS = {
    "chat-support": 0.34,
    "code-help": 0.24,
    "summarize": 0.14,
    "extract-json": 0.14,
    "translate": 0.14,
}
MODELS = ["acme-chat-8b", "acme-chat-8b", "acme-chat-8b", "acme-code-7b"]

MODULES = [
    "json",
    "re",
    "os",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "asyncio",
    "subprocess",
    "datetime",
    "csv",
    "sqlite3",
    "http.client",
    "urllib.parse",
    "logging",
    "argparse",
    "unittest",
    "typing",
    "dataclasses",
    "heapq",
    "bisect",
    "textwrap",
    "string",
    "random",
    "statistics",
    "decimal",
    "fractions",
    "smtplib",
    "zipfile",
    "tarfile",
    "shutil",
    "tempfile",
    "threading",
    "queue",
    "socket",
    "hashlib",
    "hmac",
    "secrets",
    "uuid",
    "pickle",
    "copy",
    "pprint",
    "enum",
    "contextlib",
    "abc",
    "inspect",
    "ast",
    "calendar",
    "difflib",
    "html",
    "base64",
    "struct",
    "glob",
    "fnmatch",
    "configparser",
    "shelve",
    "gzip",
    "bz2",
    "lzma",
    "timeit",
    "doctest",
    "weakref",
    "types",
    "operator",
    "numbers",
    "math",
    "ipaddress",
    "mimetypes",
    "sched",
    "selectors",
    "signal",
    "tokenize",
    "traceback",
    "warnings",
    "zlib",
    "email.message",
    "email.utils",
    "xml.etree.ElementTree",
    "urllib.request",
    "wave",
    "colorsys",
    "graphlib",
]

FIRST = [
    "Anna",
    "Ben",
    "Chloé",
    "David",
    "Elif",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kavya",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Yuki",
]
LAST = [
    "Müller",
    "Garcia",
    "Smith",
    "Dubois",
    "Rossi",
    "Kowalski",
    "Tanaka",
    "Okafor",
    "Silva",
    "Novak",
    "Berg",
    "Haddad",
    "Chen",
    "Ivanova",
    "Murphy",
    "Larsen",
]
DOMAINS = ["example.com", "example.org", "mail.test", "acme-corp.example", "posteo.example"]
PRODUCTS = [
    "Acme Cloud Storage",
    "the mobile app",
    "the billing portal",
    "Acme Analytics",
    "the API",
    "the desktop sync client",
    "the team workspace",
]
ISSUES = [
    "I was charged twice for my subscription this month",
    "I cannot log in since the last update, the page just reloads",
    "my files stopped syncing yesterday evening",
    "the invoice shows the wrong company address",
    "I want to cancel my plan and get a refund for the unused months",
    "the export to CSV produces an empty file",
    "two-factor authentication codes are rejected",
    "my API requests return 429 Too Many Requests even at low volume",
    "I need to change the email address on my account",
    "the dashboard is extremely slow for our team",
    "I was locked out after resetting my password",
    "the webhook deliveries fail with a timeout",
]
# Hand-written support messages in other languages (real people write like this).
FOREIGN_SUPPORT = {
    "de": [
        "Hallo, ich wurde diesen Monat zweimal belastet. Können Sie das bitte prüfen?",
        "Seit dem letzten Update kann ich mich nicht mehr anmelden. Was soll ich tun?",
        "Meine Dateien werden seit gestern nicht mehr synchronisiert.",
        "Bitte kündigen Sie mein Abo zum Monatsende und bestätigen Sie das per E-Mail.",
    ],
    "fr": [
        "Bonjour, j'ai été débité deux fois ce mois-ci, pouvez-vous vérifier ?",
        "Je n'arrive plus à me connecter depuis la mise à jour.",
        "L'export CSV génère un fichier vide, que faire ?",
        "Merci de changer l'adresse e-mail de mon compte.",
    ],
    "es": [
        "Hola, me cobraron dos veces este mes. ¿Pueden revisarlo?",
        "No puedo iniciar sesión desde la última actualización.",
        "Mis archivos no se sincronizan desde ayer por la tarde.",
        "Quiero cancelar mi plan y recibir un reembolso.",
    ],
    "pt": [
        "Olá, fui cobrado duas vezes este mês. Podem verificar?",
        "Não consigo entrar na minha conta desde a atualização.",
    ],
    "ja": [
        "こんにちは。今月、料金が二重に請求されています。確認していただけますか？",
        "アップデート以降ログインできません。どうすればいいですか？",
    ],
}
LANGUAGES = ["French", "German", "Spanish", "Portuguese", "Italian", "Japanese", "Dutch", "Polish"]
SYSTEM_SUPPORT = (
    "You are a friendly support agent for Acme Cloud. Answer briefly, ask for missing "
    "details, and never reveal internal information."
)
SYSTEM_CODE = "You are a senior Python engineer. Explain clearly and show corrected code."
SYSTEM_JSON = "You extract structured data. Reply with a single JSON object and nothing else."


def _zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    return codecs.decode(this.s, "rot13")


def _collect_text() -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(long docstrings, (qualified name, source) of functions, sentences) from the stdlib."""
    long_docs: list[str] = []
    functions: list[tuple[str, str]] = []
    sentences: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(module) or ""
        if len(doc) > 400:
            long_docs.append(doc)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            obj_doc = inspect.getdoc(obj) or ""
            if len(obj_doc) > 600:
                long_docs.append(f"{name}.{attr}\n\n{obj_doc}")
            for sentence in obj_doc.replace("\n", " ").split(". "):
                sentence = " ".join(sentence.split())
                if 40 <= len(sentence) <= 220 and sentence[0].isupper() and ">>>" not in sentence:
                    sentences.append(sentence.rstrip(".") + ".")
            if inspect.isfunction(obj):
                try:
                    source = inspect.getsource(obj)
                except (OSError, TypeError):
                    continue
                if 4 <= source.count("\n") <= 80:
                    functions.append((f"{name}.{attr}", source))
    zen = _zen()
    sentences += [line for line in zen.splitlines() if len(line) > 30]
    long_docs.append(zen)
    return long_docs, functions, sentences


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for index, char in enumerate(reversed(body)):
        value = int(char)
        if index % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return body + str((10 - total % 10) % 10)


class PII:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def name(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"

    def email(self, name: str | None = None) -> str:
        name = name or self.name()
        local = name.lower().replace(" ", ".").replace("ü", "ue").replace("é", "e")
        return f"{local}{self.rng.choice(['', '', '42', '.work'])}@{self.rng.choice(DOMAINS)}"

    def phone(self) -> str:
        r = self.rng
        d = lambda n: "".join(r.choice(string.digits) for _ in range(n))  # noqa: E731
        return r.choice(
            [
                f"+1 415 555 {d(4)}",
                f"({r.randint(200, 989)}) 555-{d(4)}",
                f"+49 30 {d(8)}",
                f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
                f"+44 20 7946 {d(4)}",
                f"555.{d(3)}.{d(4)}",
            ]
        )

    def card(self) -> str:
        number = _luhn_complete(self.rng.choice(["4", "51", "55", "37"]), 16, self.rng)
        sep = self.rng.choice([" ", "-", ""])
        return sep.join(number[i : i + 4] for i in range(0, 16, 4))

    def api_key(self) -> str:
        r = self.rng
        alnum = string.ascii_letters + string.digits
        return r.choice(
            [
                "sk-proj-" + "".join(r.choice(alnum) for _ in range(40)),
                "AKIA"
                + "".join(r.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
                "ghp_" + "".join(r.choice(alnum) for _ in range(36)),
            ]
        )


def _support(rng: random.Random, pii: PII) -> list[dict[str, str]]:
    if rng.random() < 0.16:
        lang = rng.choice(sorted(FOREIGN_SUPPORT))
        user = rng.choice(FOREIGN_SUPPORT[lang])
        if rng.random() < 0.4:
            user += f" {pii.email()}"
    else:
        name = pii.name()
        user = f"Hi, {rng.choice(ISSUES)} ({rng.choice(PRODUCTS)})."
        extras = []
        if rng.random() < 0.35:
            extras.append(f"My account email is {pii.email(name)}.")
        if rng.random() < 0.2:
            extras.append(f"You can call me at {pii.phone()}.")
        if rng.random() < 0.1:
            extras.append(f"The card ending in question is {pii.card()}.")
        if rng.random() < 0.08:
            extras.append(f"Here is my key in case you need it: {pii.api_key()}")
        if rng.random() < 0.3:
            extras.append(f"Order number {rng.randint(100000, 999999)}.")
        user = " ".join(
            [user, *extras, rng.choice(["Thanks!", "Regards, " + name, "", "Please help."])]
        )
    messages = [
        {"role": "system", "content": SYSTEM_SUPPORT},
        {"role": "user", "content": user.strip()},
    ]
    if rng.random() < 0.25:  # a multi-turn conversation
        messages += [
            {
                "role": "assistant",
                "content": "Sorry to hear that. Could you tell me when it started?",
            },
            {
                "role": "user",
                "content": rng.choice(
                    [
                        "Since Monday.",
                        "About two days ago.",
                        "Right after I changed my plan.",
                        "Today.",
                    ]
                ),
            },
        ]
    return messages


def _code(rng: random.Random, pii: PII, functions: list[tuple[str, str]]) -> list[dict[str, str]]:
    qualname, source = rng.choice(functions)
    kind = rng.random()
    if kind < 0.45:
        user = f"What does `{qualname}` do? Explain it step by step:\n\n```python\n{source}```"
    elif kind < 0.75:
        user = (
            f"I copied `{qualname}` into my project and it is too slow for large inputs. "
            f"How would you optimise it?\n\n```python\n{source}```"
        )
    elif kind < 0.9:
        user = f"Write unit tests with pytest for this function:\n\n```python\n{source}```"
    else:
        key = pii.api_key()
        user = (
            f"My script fails with `KeyError` when calling the API. Config:\n\n```python\n"
            f'API_KEY = "{key}"\nclient = Client(api_key=API_KEY, timeout=30)\n'
            f"result = client.fetch('{qualname}')\n```\nWhat is wrong?"
        )
    return [{"role": "system", "content": SYSTEM_CODE}, {"role": "user", "content": user}]


def _summarize(rng: random.Random, long_docs: list[str]) -> str:
    parts = [rng.choice(long_docs)]
    while rng.random() < 0.45 and sum(map(len, parts)) < 9000:  # long documents
        parts.append(rng.choice(long_docs))
    instruction = rng.choice(
        [
            "Summarize the following documentation in three bullet points.",
            "Write a one-paragraph summary for a new team member.",
            "TL;DR of the text below, max 50 words.",
            "Summarise the key points and list any caveats mentioned.",
        ]
    )
    return f"{instruction}\n\n" + "\n\n---\n\n".join(parts)


def _extract(rng: random.Random, pii: PII, sentences: list[str]) -> list[dict[str, str]]:
    name = pii.name()
    order = rng.randint(100000, 999999)
    amount = f"{rng.randint(5, 2500)}.{rng.randint(0, 99):02d}"
    issue = rng.choice(ISSUES)
    product = rng.choice(PRODUCTS)
    note = rng.choice(sentences)
    body = rng.choice(
        [
            f"Dear support,\n{issue} ({product}). Please refund order #{order} ({amount} EUR). You can "
            f"reach me at {pii.email(name)} or {pii.phone()}.\nP.S. {note}\nBest,\n{name}",
            f"From: {name} <{pii.email(name)}>\nSubject: {issue[:40]}\n\nMy payment of ${amount} for "
            f"order {order} failed with card {pii.card()}. Phone: {pii.phone()}. Also: {note}",
            f"Call notes: customer {name} ({product}) says {issue}. Order {order}; callback number "
            f"{pii.phone()}, amount {amount} USD, status: {rng.choice(['pending', 'open', 'escalated'])}. "
            f"Agent remark: {note}",
        ]
    )
    user = (
        "Extract name, email, phone, order_id and amount from the message below. Use null for "
        f"missing fields.\n\n{body}"
    )
    return [{"role": "system", "content": SYSTEM_JSON}, {"role": "user", "content": user}]


def _translate(rng: random.Random, sentences: list[str]) -> list[dict[str, str]]:
    if rng.random() < 0.2:
        lang = rng.choice(sorted(FOREIGN_SUPPORT))
        user = f"Translate into English:\n\n{rng.choice(FOREIGN_SUPPORT[lang])}"
    else:
        count = rng.choice([1, 1, 2, 3, 5])
        text = " ".join(rng.choice(sentences) for _ in range(count))
        user = f"Translate into {rng.choice(LANGUAGES)}:\n\n{text}"
    return [{"role": "user", "content": user}]


def _timestamp(rng: random.Random) -> dt.datetime:
    day = rng.randrange(DAYS)
    hour = min(23, max(0, int(rng.gauss(14, 4))))  # busier during the working day
    return START + dt.timedelta(
        days=day,
        hours=hour,
        minutes=rng.randrange(60),
        seconds=rng.randrange(60),
        milliseconds=rng.randrange(1000),
    )


def _near_duplicate(record: dict, rng: random.Random, pii: PII) -> dict:
    """A small edit of ``record``: a greeting, a trailing thanks, another order number or email."""
    copy = json.loads(json.dumps(record))

    def edit(text: str) -> str:
        choice = rng.random()
        if choice < 0.3:
            return text + rng.choice([" Thanks!", " Thank you.", " :)", "!!"])
        if choice < 0.55:
            return text.replace("Hi,", "Hello,", 1) if "Hi," in text else "Hey. " + text
        if choice < 0.8:
            return text.replace("order", "Order", 1).replace("  ", " ")
        return (
            text.replace("@", f"{rng.randint(1, 9)}@", 1)
            if "@" in text
            else text + " " + pii.email()
        )

    if "messages" in copy:
        last_user = max(i for i, m in enumerate(copy["messages"]) if m["role"] == "user")
        copy["messages"][last_user]["content"] = edit(copy["messages"][last_user]["content"])
    else:
        copy["prompt"] = edit(copy["prompt"])
    copy["timestamp"] = _timestamp(rng).isoformat().replace("+00:00", "Z")
    return copy


def generate(count: int = 4000, seed: int = 20260105) -> list[dict]:
    """The sample requests, sorted by time."""
    rng = random.Random(seed)
    pii = PII(rng)
    long_docs, functions, sentences = _collect_text()
    routes = list(ROUTE_WEIGHTS)
    weights = [ROUTE_WEIGHTS[r] for r in routes]
    records: list[dict] = []
    while len(records) < count:
        if records and rng.random() < 0.03:  # exact duplicate: the same request resent later
            copy = json.loads(json.dumps(rng.choice(records)))
            copy["timestamp"] = _timestamp(rng).isoformat().replace("+00:00", "Z")
            records.append(copy)
            continue
        if records and rng.random() < 0.05:
            records.append(_near_duplicate(rng.choice(records), rng, pii))
            continue
        route = rng.choices(routes, weights)[0]
        when = _timestamp(rng)
        record: dict = {"model": rng.choice(MODELS)}
        if route == "chat-support":
            record["messages"] = _support(rng, pii)
        elif route == "code-help":
            record["model"] = "acme-code-7b"
            record["messages"] = _code(rng, pii, functions)
        elif route == "summarize":
            text = _summarize(rng, long_docs)
            if rng.random() < 0.3:  # legacy completions endpoint
                record["prompt"] = text
            else:
                record["messages"] = [{"role": "user", "content": text}]
        elif route == "extract-json":
            record["messages"] = _extract(rng, pii, sentences)
        else:
            record["messages"] = _translate(rng, sentences)
        if rng.random() < 0.15:  # some clients send the route at top level and Unix time
            record["route"] = route
            record["created"] = int(when.timestamp())
        else:
            record["metadata"] = {"route": route, "request_id": f"req_{rng.getrandbits(48):012x}"}
            record["timestamp"] = when.isoformat().replace("+00:00", "Z")
        records.append(record)

    def when_of(r: dict) -> float:
        if "created" in r:
            return float(r["created"])
        return dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()

    records.sort(key=when_of)
    return records


def write(records: list[dict], out: Path) -> None:
    """Write gzip JSONL atomically (temp file, then rename), byte-reproducible (mtime 0)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=20260105)
    args = parser.parse_args(argv)
    records = generate(args.count, args.seed)
    write(records, args.out)
    print(
        f"wrote {len(records)} requests to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) "
        f"with Python {sys.version.split()[0]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
