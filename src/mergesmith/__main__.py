from mergesmith.cli import entry

entry()
