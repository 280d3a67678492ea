"""`python -m fusemerge` and the `fusemerge` command (pyproject.toml's console script): fusemerge/cli.py's
entry_point, with Ctrl-C handled from before the command line is imported (fusemerge/startup.py)."""

from fusemerge import startup


def entry_point() -> None:
    startup.begin()
    from fusemerge.cli import entry_point as cli_entry_point

    cli_entry_point()


if __name__ == "__main__":
    entry_point()
