"""``python -m fs3.meta --cluster FILE --node NAME [--db URL]``: run a metadata server."""

from .service import main

if __name__ == "__main__":
    main()
