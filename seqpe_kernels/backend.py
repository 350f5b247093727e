"""Backend selection placeholder (being written)."""


def available_backends():
    return {"torch": (True, "eager reference")}
