"""Random parts of the ids a2ad makes: queue ids, context ids, claim tokens.

They must not collide; they need not be secret, since none is a credential (a
caller reads only its own items, whatever ids it guesses; a claim token only
tells one claim from the next). So they come from a generator seeded once from
the OS rather than from os.urandom, a system call each, two per queued message.
"""

from __future__ import annotations

import random

_random = random.Random()  # seeded from os.urandom


def random_hex(bits: int) -> str:
    """`bits` random bits as lower-case hex, zero-padded to bits / 4 digits."""
    return f"{_random.getrandbits(bits):0{bits // 4}x}"


QUEUE_ID_PREFIX = "q-"  # a2ad's own task ids (store.models.new_queue_id)


def is_queue_id(value: str | None) -> bool:
    return value is not None and value.startswith(QUEUE_ID_PREFIX)
