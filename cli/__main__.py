"""``python -m cli`` and ``torchrun ... -m cli``: the dafl-compress command."""

from cli.main import entry_point

if __name__ == "__main__":
    entry_point()
