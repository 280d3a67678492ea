from fusemerge.cli import main

main()
