"""``python -m fastapi_eventbus``: the ``fastapi-eventbus`` command line."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="fastapi-eventbus")
