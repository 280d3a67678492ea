from fusemerge.cli import entry_point

entry_point()
