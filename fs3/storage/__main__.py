"""``python -m fs3.storage --cluster FILE --node NAME``: run a storage server."""

from .service import main

if __name__ == "__main__":
    main()
