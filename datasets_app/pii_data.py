"""Deterministic generator of labelled synthetic support conversations.

Used by the PII tests and the throughput/precision bench. Every message comes with the exact character
spans of the PII it contains (``spans``) and of the business identifiers that must survive scrubbing
(``business_ids``), so recall, precision and "identifiers kept" can be measured without hand labelling.

Conversations follow a few realistic support scenarios (late order, double charge, account lock-out,
firmware bug, tax form, plan change, return, outage). A conversation has one customer persona whose
details (name, e-mail, phone, card, IBAN, address ...) are reused across its messages, with the phone
number written in different formats, the way real chats do. Generic agent lines ("One moment please.")
repeat across conversations, as they do in real exports.

No randomness leaks from the global ``random`` module: ``generate(n, seed)`` always returns the same data.

``evaluate(data, predictions)`` scores predicted spans against the labels: per-type recall/precision
(a span counts when it overlaps a same-type span), precision regardless of type, the share of PII
characters covered, and the share of business identifiers left untouched (per kind).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Evaluation", "LabelledText", "TypeScore", "evaluate", "generate", "iban_valid", "luhn_valid"]


@dataclass
class LabelledText:
    """One chat message with gold annotations.

    ``spans``: (start, end, entity_type) of every PII value. ``business_ids``: (start, end) of every
    business identifier that must NOT be scrubbed; ``business_kinds`` names each one (parallel list).
    """

    text: str
    spans: list[tuple[int, int, str]]
    business_ids: list[tuple[int, int]]
    business_kinds: list[str] = field(default_factory=list)
    conversation: int = 0
    role: str = "customer"


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    """Comma-separated vocabulary -> list (keeps multi-word entries such as "Van der Berg")."""
    return [item.strip() for item in text.split(",") if item.strip()]


FIRST_NAMES = _csv(
    "James, Maria, Wei, Aisha, Oluwaseun, Priya, Mohammed, Sofia, Hiroshi, Olga, Carlos, Fatima, "
    "Liam, Chloe, Mateo, Yuki, Ananya, Kwame, Ingrid, Dmitri, Mei, Santiago, Amara, Lars, Noor, "
    "Elena, Rajesh, Thabo, Camille, Giulia, Kenji, Zanele, Hannah, Omar, Leila, Tomasz, Siobhan, "
    "Arjun, Nadia, Jorge, Emily, Daniel, Sarah, Michael, Jennifer, David, Ahmed, Ji-woo, Minh, Aroha, "
    "Bjorn, Chiamaka, Isabella, Lucas, Anastasia, Ravi, Sione, Valentina, Emeka, Astrid, Farid, "
    "Keiko, Marcus, Rosa, Tariq, Ewa, Diego, Laura, Patrick, Yasmin"
)

LAST_NAMES = _csv(
    "Smith, Garcia, Chen, Okafor, Patel, Nguyen, Kowalski, Muller, Rossi, Tanaka, Ivanova, Hernandez, "
    "Khan, O'Brien, Johansson, Dubois, Kim, Silva, Mensah, Cohen, Haddad, Novak, Yilmaz, Andersen, "
    "Fernandes, Abubakar, Nakamura, Schmidt, Williams, Johnson, Brown, Lopez, Singh, Ali, Murphy, "
    "Wang, Zhang, Sato, Park, Popescu, Horvath, Van der Berg, Adeyemi, Gonzalez, Moreau, Bianchi, "
    "Kaur, Mahlangu, Takahashi, Petrov, Lindqvist, Rahman, Martinez, Walsh, Costa, Dlamini, Fischer, "
    "Reyes, Hughes"
)

TITLES = _csv("Mr., Ms., Mrs., Dr.")

CITIES = _csv(
    "Chicago, Berlin, Lagos, Mumbai, Toronto, Sao Paulo, Sydney, Madrid, Osaka, Nairobi, Seattle, "
    "Austin, Dublin, Warsaw, Manila, Cairo, Lisbon, Denver, Boston, Paris, London, Singapore, "
    "Melbourne, Hamburg, Rotterdam, Johannesburg, Vancouver, Atlanta, Manchester, Lyon, Milan, Accra, "
    "Bangalore, Auckland, Phoenix, San Diego, Portland"
)

COUNTRIES = _csv(
    "Germany, Nigeria, India, Canada, Brazil, Australia, Spain, Japan, Kenya, Ireland, Poland, "
    "Mexico, France, Italy, the Netherlands, South Africa, New Zealand, Ghana, Portugal, Sweden, the "
    "United States, the United Kingdom, Egypt, the Philippines"
)

STREET_NAMES = _csv(
    "Baker, Elm, Maple, Oak, Pennsylvania, Cedar, Pine, Washington, Lake, Hill, Park, Main, Church, "
    "High, Sunset, Riverside, Willow, Highland, Jefferson, Mill, Spring, Lincoln, Chestnut, Victoria, "
    "Queen, King, Harbor, Meadow, Forest, Walnut"
)

STREET_SUFFIXES = _csv(
    "Street, St., Avenue, Ave, Road, Rd, Boulevard, Blvd, Lane, Drive, Dr., Court, Place, Way, Terrace"
)

UNIT_FORMS = _csv("Apt {n}, Apt. {n}, Suite {n}, Unit {n}, Apartment {n}")

DIRECTIONS = _csv("NW, NE, SW, SE")

EMAIL_DOMAINS = _csv(
    "gmail.com, outlook.com, yahoo.com, hotmail.co.uk, icloud.com, proton.me, gmx.de, example.org, "
    "web.de, mail.com, company.io, fastmail.fm"
)

US_AREA_CODES = _csv("212, 415, 312, 617, 206, 303, 512, 646, 718, 305, 404, 213, 702")

PRODUCTS = _csv(
    "Router X200, Mesh Extender M5, SmartCam C310, ProBook 450, Headset H7 Pro, Thermostat T9, "
    "AirPurifier AP300, Soundbar S40, Dashcam D2, Smart Plug P110, Tablet Tab 10, Printer LX-500, "
    "Keyboard K380, Monitor U2720, Doorbell V5, Scanner SX90"
)

# Generic tier names plus branded ones (Horizon Flex, Aurora ...) that no built-in vocabulary knows.
PLANS = _csv(
    "Business Plus, Pro Annual, Family Unlimited, Starter Monthly, Enterprise Gold, Basic, Premium "
    "Yearly, Team Standard, Horizon Flex, Aurora, Nimbus Max, Orbit Lite, Sierra Home"
)

ERROR_TEMPLATES = _csv("E-{d4}, E{d3}, ERR-{d4}, 0x8007{h4}, ERR_CONNECTION_RESET, ERR_SSL_PROTOCOL")

MONTHS = _csv(
    "January, February, March, April, May, June, July, August, September, October, November, December"
)


# --------------------------------------------------------------------------------------------------
# Value generators
# --------------------------------------------------------------------------------------------------


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return bool(digits) and total % 10 == 0


def _luhn_check_digit(partial: str) -> str:
    for check in string.digits:
        if luhn_valid(partial + check):
            return check
    raise AssertionError("unreachable: one of ten check digits is always valid")


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "").upper()
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))


def _card(rng: random.Random) -> str:
    kind = rng.choice(["visa", "visa", "mc", "amex", "discover"])
    if kind == "amex":
        body = rng.choice(["34", "37"]) + _digits(rng, 12)
        number = body + _luhn_check_digit(body)
        groups = [number[:4], number[4:10], number[10:]]
    else:
        prefix = {"visa": "4", "mc": "5" + rng.choice("12345"), "discover": "6011"}[kind]
        body = prefix + _digits(rng, 15 - len(prefix))
        number = body + _luhn_check_digit(body)
        groups = [number[i : i + 4] for i in range(0, 16, 4)]
    style = rng.random()
    if style < 0.55:
        return " ".join(groups)
    if style < 0.8:
        return "-".join(groups)
    return "".join(groups)


_IBAN_BBAN: dict[str, Callable[[random.Random], str]] = {
    "DE": lambda r: _digits(r, 18),
    "GB": lambda r: _letters(r, 4) + _digits(r, 14),
    "NL": lambda r: _letters(r, 4) + _digits(r, 10),
    "FR": lambda r: _digits(r, 23),
    "ES": lambda r: _digits(r, 20),
    "BE": lambda r: _digits(r, 12),
    "IT": lambda r: _letters(r, 1) + _digits(r, 22),
}


def _iban(rng: random.Random) -> str:
    country = rng.choice(sorted(_IBAN_BBAN))
    bban = _IBAN_BBAN[country](rng)
    rearranged = bban + country + "00"
    check = 98 - int("".join(str(int(c, 36)) for c in rearranged)) % 97
    compact = f"{country}{check:02d}{bban}"
    if rng.random() < 0.6:
        return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return compact


def _ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        if area != 666:
            break
    number = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    return number if rng.random() < 0.85 else number.replace("-", " ")


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.35:
        return f"192.168.{rng.randint(0, 20)}.{rng.randint(2, 254)}"
    first = rng.choice([23, 31, 45, 62, 73, 81, 89, 98, 104, 151, 176, 185, 203, 212])
    return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


@dataclass
class _Phone:
    """A phone number that can be written in several formats (same number, same pseudonym)."""

    country: str  # "US", "GB" or "DE"
    parts: tuple[str, ...]

    def render(self, rng: random.Random) -> str:
        if self.country == "US":
            area, exchange, line = self.parts
            return rng.choice(
                [
                    f"({area}) {exchange}-{line}",
                    f"{area}-{exchange}-{line}",
                    f"{area}.{exchange}.{line}",
                    f"+1 {area} {exchange} {line}",
                    f"+1-{area}-{exchange}-{line}",
                    f"{area} {exchange} {line}",
                ]
            )
        if self.country == "GB":
            area, local_a, local_b = self.parts
            return rng.choice([f"+44 {area} {local_a} {local_b}", f"0{area} {local_a} {local_b}"])
        area, local = self.parts
        return rng.choice([f"+49 {area} {local}", f"0{area} {local}"])


def _phone(rng: random.Random) -> _Phone:
    roll = rng.random()
    if roll < 0.65:
        exchange = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        while exchange in {
            "555",
            "911",
            "211",
            "311",
            "411",
            "511",
            "611",
            "711",
            "811",
            "950",
            "958",
            "959",
        }:
            exchange = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        return _Phone("US", (rng.choice(US_AREA_CODES), exchange, _digits(rng, 4)))
    if roll < 0.85:
        if rng.random() < 0.5:
            return _Phone("GB", ("20", "7" + _digits(rng, 3), _digits(rng, 4)))
        return _Phone("GB", ("7" + rng.choice("4579") + _digits(rng, 2), _digits(rng, 3), _digits(rng, 3)))
    return _Phone("DE", (rng.choice(["30", "40", "89", "69"]), _digits(rng, 7)))


def _street(rng: random.Random) -> str:
    number = str(rng.randint(1, 9999))
    if rng.random() < 0.1:
        number += rng.choice("ABC")
    if rng.random() < 0.12:
        return f"PO Box {rng.randint(10, 99999)}"
    street = f"{number} {rng.choice(STREET_NAMES)} {rng.choice(STREET_SUFFIXES)}"
    if rng.random() < 0.15:
        street += " " + rng.choice(DIRECTIONS)
    if rng.random() < 0.3:
        street += ", " + rng.choice(UNIT_FORMS).format(n=rng.randint(1, 40))
    return street


def _email(rng: random.Random, first: str, last: str) -> str:
    f = re.sub(r"[^a-z]", "", first.lower())
    ln = re.sub(r"[^a-z]", "", last.lower())
    local = rng.choice(
        [
            f"{f}.{ln}",
            f"{f[0]}{ln}",
            f"{f}{ln}{rng.randint(1, 99)}",
            f"{f}_{ln}",
            f"{ln}.{f}",
            f"{f}{rng.randint(1970, 2005)}",
            rng.choice(["sunny", "blue", "tiger", "quiet", "rocket", "pixel"]) + str(rng.randint(10, 999)),
        ]
    )
    return f"{local}@{rng.choice(EMAIL_DOMAINS)}"


def _order(rng: random.Random) -> str:
    return rng.choice(
        [f"ORD-{_digits(rng, 6)}", f"#{rng.randint(1000000, 9999999)}", f"ORD{_digits(rng, 8)}"]
    )


def _sku(rng: random.Random) -> str:
    size = rng.choice(["XS", "S", "M", "L", "XL", "XXL", "BLK", "WHT", "32"])
    return rng.choice(
        [
            f"SKU-{_letters(rng, 2)}-{_digits(rng, 4)}",
            f"{_letters(rng, 2)}-{_digits(rng, 5)}-{size}",
            f"SKU {_digits(rng, 6)}",
        ]
    )


def _tracking(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:  # UPS
        return f"1Z{''.join(rng.choices(string.ascii_uppercase + string.digits, k=6))}{_digits(rng, 10)}"
    if kind < 0.75:  # FedEx
        number = _digits(rng, 12)
        return number if rng.random() < 0.5 else " ".join(number[i : i + 4] for i in range(0, 12, 4))
    number = rng.choice(["9400", "9205", "9361"]) + _digits(rng, 18)  # USPS
    return number if rng.random() < 0.5 else " ".join(number[i : i + 4] for i in range(0, 22, 4))


def _ticket(rng: random.Random) -> str:
    return rng.choice([f"TCK-{_digits(rng, 5)}", f"INC{_digits(rng, 7)}", f"CASE-{_digits(rng, 6)}"])


def _jira(rng: random.Random) -> str:
    return f"{rng.choice(['PROJ', 'SUP', 'FW', 'BILL', 'NET', 'APP'])}-{rng.randint(10, 9999)}"


def _invoice(rng: random.Random) -> str:
    return rng.choice([f"INV-{rng.randint(2021, 2025)}-{_digits(rng, 4)}", f"INV{_digits(rng, 7)}"])


def _error(rng: random.Random) -> str:
    template = rng.choice(ERROR_TEMPLATES)
    return template.format(
        d4=_digits(rng, 4), d3=_digits(rng, 3), h4="".join(rng.choices("0123456789ABCDEF", k=4))
    )


def _version(rng: random.Random) -> str:
    core = f"{rng.randint(1, 12)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}"
    return rng.choice([f"v{core}", core, f"v{rng.randint(1, 9)}.{rng.randint(0, 9)}"])


def _amount(rng: random.Random) -> str:
    value = rng.choice([9.99, 14.99, 29, 49.99, 79.5, 120, 249, 1249, 19.95, 5])
    form = rng.choice(["${v:,.2f}", "€{v:,.2f}", "£{v:,.2f}", "{v:,.2f} USD", "${v:,.0f}"])
    return form.format(v=value)


def _date(rng: random.Random) -> str:
    month = rng.randint(1, 12)
    day = rng.randint(1, 28)
    return rng.choice(
        [
            f"{MONTHS[month - 1]} {day}",
            f"{MONTHS[month - 1]} {day}, {rng.randint(2023, 2025)}",
            f"{rng.randint(2023, 2025)}-{month:02d}-{day:02d}",
            f"{month:02d}/{day:02d}/{rng.randint(2023, 2025)}",
            rng.choice(["last Tuesday", "yesterday", "this morning", "Monday"]),
        ]
    )


@dataclass
class _Persona:
    first: str
    last: str
    title: str
    email: str
    phone: _Phone
    card: str
    iban: str
    ssn: str
    ip: str
    home_ip: str
    city: str
    country: str
    street: str
    agent_first: str
    agent_last: str
    order: str
    product: str
    plan: str
    other_plan: str
    invoice: str
    sku: str
    ticket: str
    version: str
    new_version: str
    error: str
    amount: str


def _persona(rng: random.Random) -> _Persona:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    agent_first = rng.choice([n for n in FIRST_NAMES if n != first])
    plan, other_plan = rng.sample(PLANS, 2)
    return _Persona(
        first=first,
        last=last,
        title=rng.choice(TITLES),
        email=_email(rng, first, last),
        phone=_phone(rng),
        card=_card(rng),
        iban=_iban(rng),
        ssn=_ssn(rng),
        ip=_ip(rng),
        home_ip=_ip(rng),
        city=rng.choice(CITIES),
        country=rng.choice(COUNTRIES),
        street=_street(rng),
        agent_first=agent_first,
        agent_last=rng.choice(LAST_NAMES),
        order=_order(rng),
        product=rng.choice(PRODUCTS),
        plan=plan,
        other_plan=other_plan,
        invoice=_invoice(rng),
        sku=_sku(rng),
        ticket=_ticket(rng),
        version=_version(rng),
        new_version=_version(rng),
        error=_error(rng),
        amount=_amount(rng),
    )


# Slot name -> (value factory, PII entity type or None, business kind or None).
# Factories take (rng, persona). Slots whose value is fixed per conversation read the persona; the
# others draw a fresh value each time.
_Slot = tuple[Callable[[random.Random, _Persona], str], str | None, str | None]
_SLOTS: dict[str, _Slot] = {
    "full": (lambda r, p: f"{p.first} {p.last}", "PERSON", None),
    "first": (lambda r, p: p.first, "PERSON", None),
    "last": (lambda r, p: p.last, "PERSON", None),
    "agent": (lambda r, p: p.agent_first, "PERSON", None),
    "agent_full": (lambda r, p: f"{p.agent_first} {p.agent_last}", "PERSON", None),
    "other_person": (lambda r, p: f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}", "PERSON", None),
    "colleague": (lambda r, p: r.choice(FIRST_NAMES), "PERSON", None),
    "email": (lambda r, p: p.email, "EMAIL_ADDRESS", None),
    "phone": (lambda r, p: p.phone.render(r), "PHONE_NUMBER", None),
    "card": (lambda r, p: p.card, "CREDIT_CARD", None),
    "iban": (lambda r, p: p.iban, "IBAN_CODE", None),
    "ssn": (lambda r, p: p.ssn, "US_SSN", None),
    "ip": (lambda r, p: p.ip, "IP_ADDRESS", None),
    "home_ip": (lambda r, p: p.home_ip, "IP_ADDRESS", None),
    "city": (lambda r, p: p.city, "LOCATION", None),
    "other_city": (lambda r, p: r.choice(CITIES), "LOCATION", None),
    "country": (lambda r, p: p.country, "LOCATION", None),
    "street": (lambda r, p: p.street, "STREET_ADDRESS", None),
    "order": (lambda r, p: p.order, None, "order"),
    "new_order": (lambda r, p: _order(r), None, "order"),
    "sku": (lambda r, p: p.sku, None, "sku"),
    "ticket": (lambda r, p: p.ticket, None, "ticket"),
    "tracking": (lambda r, p: _tracking(r), None, "tracking"),
    "reference": (lambda r, p: str(r.randint(100000000, 999999999)), None, "reference"),
    "full_lower": (lambda r, p: f"{p.first} {p.last}".lower(), "PERSON", None),
    "jira": (lambda r, p: _jira(r), None, "issue_key"),
    "invoice": (lambda r, p: p.invoice, None, "invoice"),
    "product": (lambda r, p: p.product, None, "product"),
    "plan": (lambda r, p: p.plan, None, "plan"),
    "other_plan": (lambda r, p: p.other_plan, None, "plan"),
    "error": (lambda r, p: p.error, None, "error_code"),
    "version": (lambda r, p: p.version, None, "version"),
    "new_version": (lambda r, p: p.new_version, None, "version"),
    "amount": (lambda r, p: p.amount, None, "amount"),
    "date": (lambda r, p: _date(r), None, "date"),
}

# --------------------------------------------------------------------------------------------------
# Conversation scripts: each step is a (role, list of alternative templates)
# --------------------------------------------------------------------------------------------------

GREETINGS_AGENT = [
    "Hi {first}, thanks for reaching out! My name is {agent} and I'll be helping you today.",
    "Hello {first}, this is {agent} from the support team. Let me take a look.",
    "Thanks for contacting us, {first}. I'm {agent_full}, happy to help.",
    "Hi there! {agent} here. Sorry to hear about the trouble.",
    "Good morning {title} {last}, thank you for your patience.",
    "Hi! Thanks for getting in touch. Let me check that for you.",
]
CLOSING_CUSTOMER = [
    "Thanks!",
    "Thanks {agent}!",
    "Cheers {agent}, that solved it.",
    "Thank you so much for your help.",
    "Great, thanks a lot.",
    "Perfect, that worked.",
    "ok thanks",
    "Appreciate it, have a good day.",
    "Thanks {agent}, you've been really helpful.",
    "That's all, thank you!",
]
CLOSING_AGENT = [
    "You're welcome! Is there anything else I can help you with today?",
    "Happy to help. Have a great day!",
    "Glad we could sort it out. Take care!",
    "You're welcome, {first}. Have a lovely rest of your day.",
    "No problem at all. If anything else comes up, just reply to this chat.",
    "Thanks for your patience. This chat will close automatically in a few minutes.",
]
ADDRESS_PREFIXES = ["Thanks {first}, ", "{first}, ", "Thank you {title} {last}, ", "Okay {first}, "]
VERIFY_AGENT = [
    "Before we continue, could you confirm your full name and the email on the account?",
    "For security, please confirm the name and phone number on the account.",
    "Can I get the email address associated with your account?",
    "Could you verify the billing address for me?",
]
VERIFY_CUSTOMER = [
    "Sure, it's {full}, {email}.",
    "{full}, and the email is {email}",
    "Name is {full}, phone {phone}.",
    "{email}",
    "It's {email}.",
    "The billing address is {street}, {city}.",
    "{full}. My number is {phone}.",
    "Sure: {street}, {city}, {country}.",
]
HOLD_AGENT = [
    "One moment please.",
    "Let me check that for you.",
    "Give me a minute while I pull up your account.",
    "Thanks, checking now.",
    "I'm looking into it, please bear with me.",
]

SCENARIOS: dict[str, list[tuple[str, list[str]]]] = {
    "order_delay": [
        (
            "customer",
            [
                "Hi, my name is {full}. My order {order} still hasn't arrived and it's been over a week.",
                "Hello! I ordered the {product} on {date} (order {order}) but tracking hasn't updated since.",
                "hey, order {order} says delivered but there's nothing at my door",
                "hi its {full_lower}, tracking {tracking} hasn't moved since {date}",
                "Tracking number {tracking} still shows 'label created'. Order {order}.",
                "Hi there, I'm {full} and I'm still waiting on order {order} for a {product}.",
                "Good afternoon. Where is my order {order}? I paid {amount} for express shipping.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        ("agent", HOLD_AGENT),
        (
            "agent",
            [
                "Could you confirm the shipping address on the order, please?",
                "I can see order {order} in our system. Can you confirm the delivery address?",
                "Thanks. To verify your identity, please confirm the email address on the account.",
            ],
        ),
        (
            "customer",
            [
                "Sure, it's {street}, {city}.",
                "It should go to {street} in {city}, {country}.",
                "The address is {street}, {city}. The email is {email}.",
                "{street}, {city}",
                "It's {email}, and I live at {street}.",
            ],
        ),
        (
            "agent",
            [
                (
                    "Thanks. The package is being held at the depot in {city}. "
                    "I've opened ticket {ticket} with the carrier."
                ),
                "Got it. It looks like the courier missed a scan on {date}; I've raised {ticket} for you.",
                (
                    "Thank you. "
                    "I've escalated this as {ticket} and requested a replacement under order {new_order}."
                ),
            ],
        ),
        (
            "customer",
            [
                "You can reach me on {phone} if the courier needs anything.",
                "If they need to call, my number is {phone}.",
                "Ok. Can the driver text me at {phone} before arriving?",
                "Email me at {email} if the courier needs anything.",
                "Thanks, please keep me posted.",
            ],
        ),
        (
            "agent",
            [
                "Noted. I've added {phone} to the delivery instructions.",
                "Will do. You'll get an update on {ticket} within 24 hours.",
                "Done, the carrier has the note. Expected delivery is {date}.",
                "The new tracking number is {tracking}; expected delivery {date}.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "double_charge": [
        (
            "customer",
            [
                "Hi, I was charged twice for invoice {invoice} ({amount}).",
                (
                    "Hello, this is {full}. "
                    "My card was billed {amount} two times this month for the {plan} plan."
                ),
                "why did you charge me twice?? invoice {invoice}",
                "{colleague} from your billing team said the second charge of {amount} would be refunded.",
                "Hi, I see two charges of {amount} on my statement from {date}.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "I'm sorry about that. Could you tell me which card the charge was made on?",
                "Let me look into it. Which payment card do you have on file?",
                "Sorry for the trouble! Please confirm the card number so I can find the transaction.",
            ],
        ),
        (
            "customer",
            [
                "It was my Visa card {card}.",
                "The card number is {card}, expiry 08/27.",
                "card {card}",
                "I paid with {card}, under the name {full}.",
            ],
        ),
        ("agent", HOLD_AGENT),
        (
            "agent",
            [
                (
                    "I can see two payments of {amount} for the {plan} plan. "
                    "I've refunded the duplicate on invoice {invoice}."
                ),
                "Confirmed, the second charge was a processing error. Refund reference {ticket}.",
                "Confirmed, the second charge was an error. Your refund reference is {reference}.",
                "Refunds can take up to 10 days depending on your bank. Reference {ticket}.",
                (
                    "You're right, sorry about that {first}. "
                    "A refund of {amount} is on its way, 5-7 business days."
                ),
            ],
        ),
        (
            "customer",
            [
                "Could you refund it to my bank account instead? IBAN {iban}.",
                "Please send the refund to IBAN {iban}, account holder {full}.",
                "Billing said the same last month, so please double-check.",
                "Great, thanks.",
                "Can I get a copy of invoice {invoice} emailed to {email}?",
            ],
        ),
        (
            "agent",
            [
                "Sure, the refund will go to the account you provided. Reference {ticket}.",
                "Done! A corrected invoice {invoice} has been issued.",
                "No problem, I've sent it to {email}.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "account_locked": [
        (
            "customer",
            [
                "I can't log in to my account. The email on file is {email}.",
                "Hi, my account got locked after I reset my password. Username is {email}.",
                "hello I keep getting error {error} when I sign in",
                "Hi, this is {full}. I think someone tried to access my account.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "For verification, can you confirm the phone number on the account?",
                "I can help with that. Could you confirm your phone number and city?",
                "Before I unlock it, please confirm the mobile number we have for you.",
            ],
        ),
        (
            "customer",
            [
                "My number is {phone} and I live in {city}.",
                "It's {phone}.",
                "I usually log in from {city}, and my mobile is {phone}.",
                "call me at {phone}",
            ],
        ),
        (
            "agent",
            [
                "Thanks {first}. I see failed login attempts from IP {ip}. Was that you?",
                "I can see sign-in attempts from {ip} in {other_city}. Do you recognise that location?",
                "The last successful login came from {ip} on {date}.",
            ],
        ),
        (
            "customer",
            [
                "No, that wasn't me. My home IP is {home_ip}.",
                "That's not me, I've never been to {other_city}.",
                "Yes that was me, I was travelling in {country}.",
                "No idea, my laptop shows {home_ip}.",
            ],
        ),
        (
            "agent",
            [
                "I've locked those sessions and reset two-factor authentication. Reference: {ticket}.",
                "Understood. I've unlocked the account and logged the incident as {ticket}.",
                "Thanks. Please set a new password; the old sessions have been revoked.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "firmware_bug": [
        (
            "customer",
            [
                "My {product} keeps showing error {error} after updating to firmware {version}.",
                "Hi, since the {version} update my {product} reboots every few minutes.",
                "The {product} won't connect anymore, it just shows {error}.",
                "Hello, I'm getting {error} on the {product} (SKU {sku}).",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "Thanks for the details. Which firmware version were you on before the update?",
                "Could you tell me the SKU printed on the box and the current firmware version?",
                "Sorry about that! Can you send me the device's local IP address?",
            ],
        ),
        (
            "customer",
            [
                "I think it was {version}. The SKU on the box says {sku}.",
                "The router's IP is {ip} if that helps.",
                "It's on {version}, SKU {sku}, bought on {date}.",
                "Not sure, the app says {new_version}.",
            ],
        ),
        (
            "agent",
            [
                "This is a known issue tracked as {jira}. A fix ships in {new_version}.",
                "Thanks. Engineering is aware ({jira}); please roll back to {version} for now.",
                "That matches {jira}. I've linked your case {ticket} to it.",
                "Thanks for holding. {colleague} from our firmware team confirmed it is tracked as {jira}.",
            ],
        ),
        (
            "customer",
            [
                "When will {new_version} be released?",
                "Ok, I rolled back and the {error} is gone.",
                "Can you email the rollback steps to {email}?",
                "Can someone call me at {phone}? I'm not very technical.",
            ],
        ),
        (
            "agent",
            [
                "It's scheduled for {date}. I'll update ticket {ticket} when it's out.",
                "Great to hear! I'll keep {ticket} open until the fix is released.",
                "Sure, one of our technicians will follow up under {ticket}.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "tax_form": [
        (
            "customer",
            [
                "Hi, I need a W-9 for my contractor account. My name is {full}.",
                "Hello, you asked for my tax details to release the payout.",
                "Hi, this is {full}, I'm following up on case {ticket}.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "customer",
            [
                "For the tax form you asked for, my SSN is {ssn}.",
                "My social security number is {ssn}.",
                "SSN: {ssn}, address {street}, {city}.",
                "Here it is: {ssn}",
            ],
        ),
        (
            "agent",
            [
                (
                    "Thanks, {full}. "
                    "For future chats, please don't share the full number here; "
                    "we only need the last four digits."
                ),
                "Received, thank you. I've attached it to case {ticket}.",
                "Thank you {title} {last}. The payout of {amount} will be released on {date}.",
            ],
        ),
        (
            "customer",
            [
                "Ok. Also please update my mailing address to {street}, {city}.",
                "Please also change my email to {email}.",
                "Thanks. My accountant {other_person} may contact you as well.",
                "Got it.",
            ],
        ),
        (
            "agent",
            [
                "Done, your mailing address has been updated.",
                "Updated. You'll get a confirmation at the new address.",
                "Noted, I've added a note on {ticket}.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "plan_change": [
        (
            "customer",
            [
                "I'd like to upgrade from {plan} to {other_plan}. Is the price still {amount} a month?",
                "Hi, can I downgrade to the {other_plan} plan before my renewal on {date}?",
                "What's the difference between {plan} and {other_plan}?",
                "hi, how do I cancel {plan}?",
                "hello this is {full_lower}, can i switch to {other_plan} mid cycle?",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "Yes! {other_plan} is {amount} per month. Shall I switch you over now?",
                "Sure. The change takes effect on your next billing date, {date}.",
                "{other_plan} adds priority support and 5 extra seats compared to {plan}.",
            ],
        ),
        (
            "customer",
            [
                "Yes please, go ahead.",
                "Sounds good. Will I get a new invoice?",
                "Ok, please switch. The account email is {email}.",
                "Let me think about it and get back to you.",
            ],
        ),
        (
            "agent",
            [
                "All set. You'll see a prorated charge on invoice {invoice}.",
                "Done, you're now on {other_plan}. Confirmation number {ticket}.",
                "Done. Your confirmation number is {reference}.",
                "No problem, take your time.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "return": [
        (
            "customer",
            [
                "I need to exchange {sku} for a different size, order {order}.",
                "Hi, the {product} I received is damaged. Order {order}.",
                "Can I return item {sku}? It doesn't fit.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "Of course. I've created return label {ticket}; please drop the parcel at any post office.",
                "Sorry about that! I've arranged a replacement, new order number {new_order}.",
                "Sure. Which address should we send the replacement to?",
            ],
        ),
        (
            "customer",
            [
                "Please send it to {street}, {city}.",
                "Same address as before, thanks.",
                "Can the courier collect it from {street}? I'm home after 5pm.",
                "Ok will do.",
            ],
        ),
        (
            "agent",
            [
                "Confirmed. The refund of {amount} will be issued once the warehouse receives {sku}.",
                "Done. Tracking for order {new_order} will be sent by email.",
                "Great, pickup is booked for {date}.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
    "outage": [
        (
            "customer",
            [
                "We're seeing {error} on all our devices since {date}. Our incident number is {ticket}.",
                "Is there an outage in {city}? Nothing has worked since this morning.",
                "Our whole office lost connectivity, {product} shows {error}.",
            ],
        ),
        ("agent", GREETINGS_AGENT),
        (
            "agent",
            [
                "There is a regional outage affecting {city}; engineers are working on it under {jira}.",
                "We're not aware of an outage. Could you share the public IP of the site?",
                "Thanks for reporting. Status updates are posted under {jira}.",
            ],
        ),
        (
            "customer",
            [
                "Our public IP is {ip}.",
                "The gateway is at {ip}, firmware {version}.",
                "Please call our IT lead {other_person} on {phone}.",
                "Ok, thanks for the update.",
            ],
        ),
        (
            "agent",
            [
                "Service should be restored by {date}. I'll post updates on {jira}.",
                "Thanks, I've added that to {ticket}.",
                "Noted, we'll call as soon as there's news.",
            ],
        ),
        ("customer", CLOSING_CUSTOMER),
        ("agent", CLOSING_AGENT),
    ],
}

_SLOT_RE = re.compile(r"\{(\w+)\}")


def _render(
    template: str, rng: random.Random, persona: _Persona, conversation: int, role: str
) -> LabelledText:
    parts: list[str] = []
    spans: list[tuple[int, int, str]] = []
    business: list[tuple[int, int]] = []
    kinds: list[str] = []
    pos = 0
    length = 0
    for match in _SLOT_RE.finditer(template):
        literal = template[pos : match.start()]
        parts.append(literal)
        length += len(literal)
        name = match.group(1)
        if name == "title":
            value, entity, kind = persona.title, None, None
        else:
            factory, entity, kind = _SLOTS[name]
            value = factory(rng, persona)
        if entity:
            spans.append((length, length + len(value), entity))
        if kind:
            business.append((length, length + len(value)))
            kinds.append(kind)
        parts.append(value)
        length += len(value)
        pos = match.end()
    parts.append(template[pos:])
    return LabelledText(
        text="".join(parts),
        spans=spans,
        business_ids=business,
        business_kinds=kinds,
        conversation=conversation,
        role=role,
    )


def _conversation(rng: random.Random, index: int) -> list[LabelledText]:
    persona = _persona(rng)
    script = SCENARIOS[rng.choice(sorted(SCENARIOS))]
    messages = []
    for role, templates in script:
        # Real chats skip steps: hold lines and the closing pleasantries are often absent.
        if templates is HOLD_AGENT and rng.random() < 0.7:
            continue
        if (templates is CLOSING_CUSTOMER or templates is CLOSING_AGENT) and rng.random() < 0.5:
            continue
        template = rng.choice(templates)
        if role == "agent" and templates is not GREETINGS_AGENT:
            template = _address_customer(template, rng)
        messages.append(_render(template, rng, persona, index, role))
        if templates is GREETINGS_AGENT and rng.random() < 0.6:
            # Identity check, as most support desks do before touching an account.
            question = _address_customer(rng.choice(VERIFY_AGENT), rng)
            messages.append(_render(question, rng, persona, index, "agent"))
            messages.append(_render(rng.choice(VERIFY_CUSTOMER), rng, persona, index, "customer"))
    return messages


def _address_customer(template: str, rng: random.Random) -> str:
    """Agents address the customer by name in a good share of replies."""
    if any(slot in template for slot in ("{first}", "{last}", "{full}")) or rng.random() > 0.65:
        return template
    for opener in ("Thanks. ", "Thank you. ", "Thanks, "):
        if template.startswith(opener):
            return f"{opener[:-2]} {{first}}{opener[-2:]}{template[len(opener) :]}"
    if template.startswith(("Thank", "Hi", "Hello", "Good")):
        return template
    first_word = template.split(" ", 1)[0]
    if first_word != "I" and not first_word.startswith("I'") and not first_word.startswith("{"):
        template = template[0].lower() + template[1:]
    return rng.choice(ADDRESS_PREFIXES) + template


def generate(n: int, seed: int = 0) -> list[LabelledText]:
    """Return ``n`` labelled chat messages drawn from consecutive synthetic conversations."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    out: list[LabelledText] = []
    index = 0
    while len(out) < n:
        out.extend(_conversation(rng, index))
        index += 1
    return out[:n]


# --------------------------------------------------------------------------------------------------
# Scoring predictions against the labels
# --------------------------------------------------------------------------------------------------


@dataclass
class TypeScore:
    """Partial-match counts for one entity type (a span counts when it overlaps a same-type span)."""

    gold: int = 0
    gold_found: int = 0
    predicted: int = 0
    predicted_correct: int = 0

    @property
    def recall(self) -> float:
        return self.gold_found / self.gold if self.gold else 1.0

    @property
    def precision(self) -> float:
        return self.predicted_correct / self.predicted if self.predicted else 1.0


@dataclass
class Evaluation:
    per_type: dict[str, TypeScore]
    overall: TypeScore
    # predictions overlapping gold PII of any type (a mistyped finding still removes the PII)
    predicted_on_pii: int
    pii_chars: int
    pii_chars_covered: int
    business_total: int
    business_kept: int
    business_by_kind: dict[str, tuple[int, int]]  # kind -> (kept, total)
    messages_with_false_positive: int

    @property
    def precision_any_type(self) -> float:
        return self.predicted_on_pii / self.overall.predicted if self.overall.predicted else 1.0

    @property
    def char_recall(self) -> float:
        return self.pii_chars_covered / self.pii_chars if self.pii_chars else 1.0

    @property
    def business_kept_share(self) -> float:
        return self.business_kept / self.business_total if self.business_total else 1.0


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def evaluate(data: list[LabelledText], predictions: list[list[tuple[int, int, str]]]) -> Evaluation:
    """Score ``predictions`` ((start, end, entity_type) per message) against the gold labels."""
    if len(data) != len(predictions):
        raise ValueError("one prediction list per message is required")
    per_type: dict[str, TypeScore] = {}
    overall = TypeScore()
    on_pii = 0
    pii_chars = covered = 0
    business_total = business_kept = 0
    by_kind: dict[str, list[int]] = {}
    fp_messages = 0
    for item, predicted in zip(data, predictions, strict=True):
        for start, end, entity_type in item.spans:
            score = per_type.setdefault(entity_type, TypeScore())
            score.gold += 1
            overall.gold += 1
            if any(t == entity_type and _overlaps(start, end, s, e) for s, e, t in predicted):
                score.gold_found += 1
                overall.gold_found += 1
            pii_chars += end - start
            covered += sum(1 for pos in range(start, end) if any(s <= pos < e for s, e, _ in predicted))
        has_fp = False
        for start, end, entity_type in predicted:
            score = per_type.setdefault(entity_type, TypeScore())
            score.predicted += 1
            overall.predicted += 1
            if any(t == entity_type and _overlaps(start, end, s, e) for s, e, t in item.spans):
                score.predicted_correct += 1
                overall.predicted_correct += 1
            if any(_overlaps(start, end, s, e) for s, e, _ in item.spans):
                on_pii += 1
            else:
                has_fp = True
        fp_messages += has_fp
        kinds = item.business_kinds or ["business_id"] * len(item.business_ids)
        for (start, end), kind in zip(item.business_ids, kinds, strict=True):
            kept = not any(_overlaps(start, end, s, e) for s, e, _ in predicted)
            business_total += 1
            business_kept += kept
            counts = by_kind.setdefault(kind, [0, 0])
            counts[0] += kept
            counts[1] += 1
    return Evaluation(
        per_type=per_type,
        overall=overall,
        predicted_on_pii=on_pii,
        pii_chars=pii_chars,
        pii_chars_covered=covered,
        business_total=business_total,
        business_kept=business_kept,
        business_by_kind={k: (v[0], v[1]) for k, v in sorted(by_kind.items())},
        messages_with_false_positive=fp_messages,
    )
