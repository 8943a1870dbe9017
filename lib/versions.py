"""``python -m lib.versions list|rollback``: the command of :mod:`lib.lifecycle.versions`, its home."""

if __name__ == "__main__":
    import sys

    from lib.lifecycle.versions import main

    sys.exit(main())
